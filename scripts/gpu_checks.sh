#!/usr/bin/env bash
# Issue #10's GPU checks, prepared to run as one command on a lent GPU machine (never in CI).
#
#   scripts/gpu_checks.sh wheels   here, where the package registries are reachable: the packages
#                                  the GPU machine's image lacks, as wheels in .whl/ (git-ignored)
#   scripts/gpu_checks.sh run      on the GPU machine, in the repository root with .whl/ beside it:
#                                  every check below under its own time limit (410 s if every one
#                                  ran to its limit; a few minutes expected); the log and the
#                                  kernel figures are written to $OUT (default /tmp/gpu_checks)
#
# The device tool's call, from this machine:  run(command="bash scripts/gpu_checks.sh run",
# carry=[".whl"], timeout_s=540): with a machine's start, that leaves a 15-minute device budget
# room to rerun once. The image there has Python 3.12 with torch, triton and pytest but
# not hydra-core, omegaconf, antlr4 or mnist1d; sparsebench runs from the checkout (PYTHONPATH).
#
# Checks: the CUDA tests (the sparse backend's Functions against dense layers, CSR and BSR; 2:4
# inference against dense);
# benchmarks/bench_gpu.py (2:4 forward and training step, BSR/CSR forward, the sparse backend's
# per-layer step share); benchmarks/bench_training_step.py on CUDA (masked and sparse steps against
# dense, unstructured and 32x32 block masks); end-to-end runs: AMP, backend=sparse (CSR and BSR),
# a 2:4 run exported as semi_structured and benched, the same run trained on backend=sparse's 2:4 path, and a torchrun run over NCCL (one rank: NCCL
# wants a GPU per rank and the machine has one).
#
# GPU_CHECKS_DEVICE=cpu scripts/gpu_checks.sh run  runs the same plumbing on the CPU (toy kernel
# sizes, gloo instead of NCCL): a check of this script, not of the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

wheels() {
    mkdir -p .whl
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.1 mnist1d==0.0.2.post1
    python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # published as a source archive only
    ls .whl
}

# check NAME SECONDS COMMAND...: one check under `timeout`, its output in the log, its status summed up.
check() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - start)) s"
    SUMMARY+="$name: exit $status ($((SECONDS - start)) s)"$'\n'
}

run_checks() {
    OUT=${OUT:-/tmp/gpu_checks}
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_checks: the wheels in .whl/ did not install (run 'scripts/gpu_checks.sh wheels' first)"; exit 2; }
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SPARSEBENCH_CACHE=/tmp/sparsebench-cache
    local device=${GPU_CHECKS_DEVICE:-cuda} runs=/tmp/gpu_runs sb="python3 -m sparsebench" smoke=""
    [ "$device" = cpu ] && smoke=--smoke
    rm -rf "$runs"
    local mlp=(model=mlp 'model.hidden=[512,512,512]' dataset.num_samples=4000 epochs=2 progress=none device=$device)
    SUMMARY=""
    {
        check environment 20 bash -c 'nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), \"cusparselt\", torch.backends.cusparselt.is_available())"'
        check tests 60 python3 -m pytest -q -p no:cacheprovider -rs tests/test_export.py tests/test_backend.py \
            tests/test_two_four.py -k "cuda or semi_structured"
        check kernels 90 python3 benchmarks/bench_gpu.py $smoke --json "$OUT/gpu_kernels.json"
        check training_steps 90 bash -c "python3 benchmarks/bench_training_step.py --device $device --repeats 7 &&
            python3 benchmarks/bench_training_step.py --device $device --cases mlp-0.95 --block 32 --repeats 7"
        check amp 30 $sb train amp=true method=rigl results_root=$runs/amp "${mlp[@]}"
        check sparse_backend 45 bash -c "$sb train backend=sparse backend_layers=all method=rigl results_root=$runs/csr ${mlp[*]@Q} &&
            $sb train backend=sparse method=gmp distribution.structure=block distribution.block=32 results_root=$runs/bsr ${mlp[*]@Q}"
        check semi_structured 45 bash -c "$sb train method=gmp distribution.structure=nm sparsity=0.5 results_root=$runs/nm ${mlp[*]@Q} &&
            run=\$(dirname \$(find $runs/nm -name final.json | head -1)) &&
            $sb export \$run --format semi_structured && $sb bench \$run --device $device --repeats 9 &&
            $sb train backend=sparse backend_layers=all amp=true method=gmp distribution.structure=nm sparsity=0.5 results_root=$runs/nm_sparse ${mlp[*]@Q}"
        check nccl 30 torchrun --standalone --nproc_per_node=1 -m sparsebench train method=rigl \
            results_root=$runs/nccl "${mlp[@]}"
        echo "=== summary"
        printf '%s' "$SUMMARY"
    } 2>&1 | tee "$OUT/gpu_checks.log"
}

case "${1:-}" in
    wheels) wheels ;;
    run) run_checks ;;
    *) echo "usage: scripts/gpu_checks.sh wheels|run" >&2; exit 2 ;;
esac
