"""`sparsebench bench`: a sparse model's dense kernels against every available sparse backend.

    sparsebench bench RUN_DIR [--batch-sizes 1,64,256] [--repeats 15] [--threads 2] [--formats csr,bsr]
    sparsebench bench model=mlp sparsity=0.9 [distribution.structure=block distribution.block=32] [--out FILE]

With RUN_DIR, the finished run's model (export.read_run: model.pt read weights-only). Without a
run, the model that `sparsebench train` would build from the same overrides (``method=static``
unless a method is given; the dataset is loaded only to learn the input shape, unless
``--input-shape`` and ``--num-classes`` say it), with the config's per-layer densities and
uniformly random masks in the config's structure (MaskedModel.random_masks, seeded by ``seed``):
timing does not depend on which weights are kept, only on how many and in what pattern.

What is measured, each side by side in one process:

* inference latency and throughput at every batch size, for the dense model (masked weights are
  zeros in dense tensors, as training keeps them) and for every format of `kernels.FORMATS` this
  machine can run: csr, bsr (the run's block side for ``distribution.structure=block`` runs,
  else ``--block``, default 32; partially filled blocks are stored padded and their fill is
  reported), semi_structured (2:4, CUDA SM 8.0+ only, in float16/bfloat16 against a dense
  model of the same dtype). A format the hardware or the weights cannot use is listed as
  skipped with its one-line reason, never a traceback. Each repeat runs every model once, in
  a rotating order; latency is the median over repeats and speedup the median over repeats of
  (baseline time / format time) within the same repeat. Warm-up first; a fixed thread count
  (``--threads``, default 2); CUDA events on a GPU, perf_counter on the CPU.
* a training step (forward, backward, SGD step) at the largest batch size: ``dense`` (no masks)
  and ``masked`` (what the trainer does: gradients and weights multiplied by the masks). Sparse
  training backends plug in through ``sparsebench.sparse.backend`` (see `training_backends`).
* memory: ``weight_bytes`` (exact bytes of every parameter and buffer, sparse values and indices
  included) and ``peak_memory_bytes``: on CUDA the allocator's peak above its level before one
  forward pass at the largest batch size (torch.cuda.max_memory_allocated); on the CPU the peak
  resident memory that one warmed-up forward pass adds (VmHWM after it minus VmRSS before it,
  after resetting VmHWM with /proc/self/clear_refs and trimming malloc), in one child process
  that loads each exported file in turn. That child figure is approximate (it counts pages the
  process touches, so allocator reuse can hide some); it is null where /proc does not allow it.
* ``file_bytes``: the size of each format's export file (export.build_payload; for dense, the
  run's model.pt, or the same state_dict saved, without a run).
* forward FLOPs per example, dense and at the weights' actual densities (sparsebench.sparse.flops).

The table is printed and bench.json written atomically beside the run (``--out`` elsewhere; in
the no-run form only with ``--out``). bench.json, ``"schema": "sparsebench.bench/1"``:

    schema, created (UTC ISO time)
    source        {run_dir | null, overrides | null, model, model_options, input_shape, num_classes,
                   sparse_layers: [weight names], sparsity: zeros / weights over those layers,
                   structure: the config's distribution (structure, block, n, m, ...)}
    environment   {device, device_name, threads, torch, timer: "perf_counter" | "cuda_events",
                   load_average: [1, 5, 15 min] | null}
    settings      {batch_sizes, repeats, warmup, train_batch}
    flops         {dense_per_example, sparse_per_example, ratio}   (forward pass, conv/linear layers)
    formats       {name: entry}, names "dense", "csr", "bsr", "semi_structured" and, when 2:4 runs,
                  "dense_float16"/"dense_bfloat16" (its baseline). Entry:
                  {status: "ok" | "skipped", reason (skipped only), dtype, block (bsr) | null,
                   block_fill (bsr: non-zeros / stored values) | null, baseline (the dense entry
                   its speedups are against), weight_bytes, file_bytes, peak_memory_bytes | null,
                   inference: [{batch, latency_ms, throughput_per_s, speedup}, ...]}
    training      {status, reason | null, batch, steps: {name: {status, reason | null, step_ms,
                   speedup (dense step time / this step time)}}}
    memory_method one line saying how peak_memory_bytes was measured

A consumer such as ``sparsebench report`` reads formats[f].inference[i].speedup next to
flops.ratio (and final.json's train_flops_ratio next to training.steps[...].speedup).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sparsebench import results
from sparsebench.errors import UserError
from sparsebench.export import DTYPES, RunModel, block_fill, build_payload, choose_block, read_run
from sparsebench.sparse import kernels
from sparsebench.sparse.kernels import FORMATS, SparseFormatError
from sparsebench.sparse.masked import masked_training_step

PROG = "sparsebench bench"
BENCH_FILE = "bench.json"
SCHEMA = "sparsebench.bench/1"
DEFAULT_BATCH_SIZES = (1, 64, 256)
MEMORY_METHOD_CPU = ("peak resident memory one warmed-up forward pass at the largest batch adds (VmHWM - VmRSS, "
                     "after clear_refs and malloc_trim), in a child process loading each export file")
MEMORY_METHOD_CUDA = "torch.cuda.max_memory_allocated above the level before one forward pass at the largest batch"


# ---------------------------------------------------------------------------- timing
def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        def cuda_time(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3
        return cuda_time

    def cpu_time(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return cpu_time


def interleaved(functions: dict[str, Callable[[], object]], repeats: int, warmup: int,
                device: torch.device) -> dict[str, list[float]]:
    """Times of each function over `repeats` rounds; every round runs all of them once, the
    starting function rotating, so noise on a shared machine hits them alike."""
    measure = timer(device)
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            functions[name]()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(measure(functions[name]))
    return times


def paired_speedup(baseline: list[float], other: list[float]) -> float:
    """Median over rounds of baseline time / other time (same round)."""
    return statistics.median(b / o for b, o in zip(baseline, other))


# ---------------------------------------------------------------------------- training backends
def training_backends() -> dict[str, Callable]:
    """Training-step backends besides ``dense`` and ``masked``.

    Hook for the sparse training backend: if a module ``sparsebench.sparse.backend`` exists and
    defines ``BENCH_TRAIN_BACKENDS = {name: factory}``, each ``factory(model, masks)`` is called
    with a private copy of the dense model (masked weights zero, train mode, on the bench device)
    and ``masks`` ({weight name: bool tensor}); it returns ``step(x, y)``, one whole training
    step on the batch, or raises SparseFormatError/UserError (shown as skipped, with its line).
    """
    import importlib

    try:
        module = importlib.import_module("sparsebench.sparse.backend")
    except ModuleNotFoundError as error:
        if error.name == "sparsebench.sparse.backend":  # not written yet
            return {}
        raise
    return dict(getattr(module, "BENCH_TRAIN_BACKENDS", {}))


def _sgd_step_fn(model: nn.Module, masks: dict[str, torch.Tensor] | None):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    params = dict(model.named_parameters())
    keep = {name: masks[name].to(params[name].dtype) for name in masks} if masks else {}

    def step(x, y):
        masked_training_step(model, optimizer, keep, x, y)
    return step


# ---------------------------------------------------------------------------- the models
@dataclass
class Candidate:
    name: str
    fmt: str  # "dense" or a kernels format
    dtype: torch.dtype
    baseline: str
    model: nn.Module | None = None
    block: int | None = None
    fill: float | None = None
    reason: str | None = None
    payload: dict | None = None
    extra: dict = field(default_factory=dict)


def _sparsity(run: RunModel) -> float:
    params = dict(run.model.named_parameters())
    total = sum(params[n].numel() for n in run.sparse_names)
    zeros = sum(int((params[n] == 0).sum()) for n in run.sparse_names)
    return zeros / total if total else 0.0


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def candidates(
    run: RunModel, formats: list[str], block: int | None, device: torch.device, half: str
) -> list[Candidate]:
    """The dense model and each requested format, built or skipped with its reason."""
    out = [Candidate("dense", "dense", torch.float32, "dense", model=copy.deepcopy(run.model).to(device))]
    params = dict(run.model.named_parameters())
    for fmt in formats:
        if fmt == "semi_structured":
            dtype = DTYPES[half]
            candidate = Candidate(fmt, fmt, dtype, f"dense_{half}")
            problem = kernels.semi_structured_device_problem(device)
            if problem:
                candidate.reason = problem
                out.append(candidate)
                continue
            try:
                model = copy.deepcopy(run.model).to(device=device, dtype=dtype)
                candidate.model = kernels.sparsify(model, fmt, None, run.sparse_names)
            except SparseFormatError as error:
                candidate.reason = str(error)
                out.append(candidate)
                continue
            out.append(Candidate(f"dense_{half}", "dense", dtype, f"dense_{half}",
                                 model=copy.deepcopy(run.model).to(device=device, dtype=dtype)))
            candidate.payload = build_payload(run, fmt, None, half)
            out.append(candidate)
            continue
        candidate = Candidate(fmt, fmt, torch.float32, "dense")
        try:
            if fmt == "bsr":
                candidate.block, _ = choose_block(run, block)
                stored = values = 0
                for name in run.sparse_names:
                    matrix = kernels.weight_matrix(params[name])
                    kernels.check_block(tuple(matrix.shape), candidate.block, name)
                    count, _, _ = block_fill(matrix, candidate.block)
                    stored += count * candidate.block ** 2
                    values += int((matrix != 0).sum())
                candidate.fill = values / stored if stored else 1.0
            model = kernels.sparsify(copy.deepcopy(run.model), fmt, candidate.block, run.sparse_names)
            candidate.model = model.to(device)
            candidate.payload = build_payload(run, fmt, candidate.block)
        except SparseFormatError as error:
            candidate.reason = str(error)
        out.append(candidate)
    return out


def weight_bytes(model: nn.Module) -> int:
    return sum(kernels.storage_bytes(t) for t in [*model.parameters(), *model.buffers()])


# ---------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"no {key} in /proc/self/status")


def _memory_probe(files: list[str], batch: int, threads: int) -> list[int | None]:
    """In this (child) process: the peak resident bytes one forward pass adds, per export file."""
    from sparsebench.export import load_exported, weights_only_load

    torch.set_num_threads(threads)
    libc = ctypes.CDLL("libc.so.6")
    out: list[int | None] = []
    for path in files:
        model = load_exported(path)
        payload_shape = weights_only_load(path)["input_shape"]
        x = torch.randn(batch, *payload_shape)
        with torch.no_grad():
            model(x)  # warm-up: one-time buffers, thread pools
            libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            before = _status_kib("VmRSS")
            model(x)
            out.append((_status_kib("VmHWM") - before) * 1024)
        del model, x
        libc.malloc_trim(0)
    return out


def cpu_peak_memory(payloads: dict[str, dict], batch: int, threads: int) -> tuple[dict[str, int | None], str | None]:
    """{name: peak bytes} measured in one child process, or (nulls, the reason it could not run)."""
    with tempfile.TemporaryDirectory(prefix="sparsebench-bench-") as tmp:
        files = []
        for name, payload in payloads.items():
            path = Path(tmp) / f"{name}.pt"
            torch.save(payload, path)
            files.append(str(path))
        command = [sys.executable, "-m", "sparsebench.bench", "_memory_probe", str(batch), str(threads), *files]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        except (OSError, subprocess.TimeoutExpired) as error:
            return dict.fromkeys(payloads), _one_line(error)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return dict.fromkeys(payloads), (lines[-1] if lines else f"exit code {done.returncode}")[:300]
    values = json.loads(done.stdout.strip().splitlines()[-1])
    return dict(zip(payloads, values)), None


def cuda_peak_memory(model: nn.Module, x: torch.Tensor) -> int:
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    with torch.no_grad():
        model(x)
    torch.cuda.synchronize(x.device)
    return int(torch.cuda.max_memory_allocated(x.device) - before)


# ---------------------------------------------------------------------------- the benchmark
@dataclass
class Settings:
    batch_sizes: list[int]
    repeats: int
    warmup: int
    threads: int
    formats: list[str]
    block: int | None
    device: torch.device
    half: str
    memory: bool
    train: bool


def benchmark(run: RunModel, settings: Settings, source: dict) -> dict:
    device = settings.device
    shape = run.input_shape
    generator = torch.Generator().manual_seed(0)
    built = candidates(run, settings.formats, settings.block, device, settings.half)
    ok = [c for c in built if c.model is not None]

    # Inference: per batch size, per dtype group, everything interleaved with its baseline.
    inference: dict[str, list[dict]] = {c.name: [] for c in ok}
    for batch in settings.batch_sizes:
        x32 = torch.randn((batch, *shape), generator=generator)
        for dtype in dict.fromkeys(c.dtype for c in ok):
            group = [c for c in ok if c.dtype == dtype and c.reason is None]
            x = x32.to(device=device, dtype=dtype)
            for c in list(group):
                c.model.eval()
                try:  # one untimed call: a kernel this hardware or torch lacks is skipped, not a traceback
                    with torch.no_grad():
                        c.model(x)
                except (RuntimeError, NotImplementedError, ValueError) as error:
                    if c.fmt == "dense":
                        raise
                    c.reason = f"failed at batch {batch}: {_one_line(error)}"
                    group.remove(c)
            functions = {c.name: (lambda m=c.model: m(x)) for c in group}
            with torch.no_grad():
                times = interleaved(functions, settings.repeats, settings.warmup, device)
            for c in group:
                latency = statistics.median(times[c.name])
                inference[c.name].append({
                    "batch": batch, "latency_ms": latency * 1e3, "throughput_per_s": batch / latency,
                    "speedup": paired_speedup(times[c.baseline], times[c.name]),
                })

    ok = [c for c in ok if c.reason is None]  # without those that failed at some batch size
    training = measure_training(run, settings) if settings.train else {
        "status": "skipped", "reason": "--no-train", "batch": None, "steps": {}}

    # Memory and bytes on disk.
    biggest = max(settings.batch_sizes)
    peak: dict[str, int | None] = {}
    memory_method = "not measured (--memory none)"
    if settings.memory and device.type == "cuda":
        memory_method = MEMORY_METHOD_CUDA
        for c in ok:
            peak[c.name] = cuda_peak_memory(c.model, torch.randn((biggest, *shape), device=device, dtype=c.dtype))
    elif settings.memory:
        memory_method = MEMORY_METHOD_CPU
        payloads = {"dense": build_payload(run, "dense")}
        payloads.update({c.name: c.payload for c in ok if c.payload is not None and c.dtype == torch.float32})
        peak, problem = cpu_peak_memory(payloads, biggest, settings.threads)
        if problem:
            memory_method += f"; failed: {problem}"
    files = {c.name: _saved_size(c.payload) for c in ok if c.payload is not None}
    dense_file = (run.run_dir / results.MODEL_FILE) if run.run_dir else None
    if dense_file and dense_file.is_file():
        files["dense"] = dense_file.stat().st_size
    else:
        files["dense"] = _saved_size(run.model.state_dict())

    formats = {}
    for c in built:
        entry = {"status": "ok" if c.model is not None and c.reason is None else "skipped", "reason": c.reason,
                 "dtype": str(c.dtype).replace("torch.", ""), "block": c.block, "block_fill": c.fill,
                 "baseline": c.baseline}
        if entry["status"] == "ok":
            entry.update(weight_bytes=weight_bytes(c.model), file_bytes=files.get(c.name),
                         peak_memory_bytes=peak.get(c.name), inference=inference[c.name])
        formats[c.name] = entry
    dense_flops, sparse_flops = forward_flops(run)
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") and device.type == "cpu" else None
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {**source, "model": run.name, "model_options": run.options, "input_shape": list(shape),
                   "num_classes": run.num_classes, "sparse_layers": run.sparse_names, "sparsity": _sparsity(run),
                   "structure": run.structure},
        "environment": {"device": str(device), "device_name": _device_name(device), "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "timer": "cuda_events" if device.type == "cuda" else "perf_counter",
                        "load_average": load},
        "settings": {"batch_sizes": settings.batch_sizes, "repeats": settings.repeats, "warmup": settings.warmup,
                     "train_batch": training.get("batch")},
        "flops": {"dense_per_example": dense_flops, "sparse_per_example": sparse_flops,
                  "ratio": sparse_flops / dense_flops if dense_flops else None},
        "formats": formats,
        "training": training,
        "memory_method": memory_method,
    }


def measure_training(run: RunModel, settings: Settings) -> dict:
    device = settings.device
    batch = max(settings.batch_sizes)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((batch, *run.input_shape), generator=generator).to(device)
    y = torch.randint(0, run.num_classes, (batch,), generator=generator).to(device)
    params = dict(run.model.named_parameters())
    masks = {name: (params[name] != 0).to(device) for name in run.sparse_names}
    steps: dict[str, Callable[[], None]] = {}
    entries: dict[str, dict] = {}
    makers = {"dense": lambda m: _sgd_step_fn(m, None), "masked": lambda m: _sgd_step_fn(m, masks)}
    for name, factory in training_backends().items():
        makers[name] = lambda m, factory=factory: factory(m, masks)
    for name, make in makers.items():
        model = copy.deepcopy(run.model).to(device).train()
        try:
            step = make(model)
            step(x, y)  # one untimed step: what this hardware or torch lacks is skipped, not a traceback
        except UserError as error:
            entries[name] = {"status": "skipped", "reason": str(error), "step_ms": None, "speedup": None}
            continue
        except (RuntimeError, NotImplementedError) as error:
            if name == "dense":
                raise
            entries[name] = {"status": "skipped", "reason": _one_line(error), "step_ms": None, "speedup": None}
            continue
        steps[name] = lambda step=step: step(x, y)
    times = interleaved(steps, settings.repeats, settings.warmup, device)
    for name in steps:
        entries[name] = {"status": "ok", "reason": None, "step_ms": statistics.median(times[name]) * 1e3,
                         "speedup": paired_speedup(times["dense"], times[name])}
    return {"status": "ok", "reason": None, "batch": batch, "steps": entries}


def forward_flops(run: RunModel) -> tuple[int, int]:
    from sparsebench.sparse.flops import layer_forward_flops

    flops = layer_forward_flops(run.model, run.input_shape)
    params = dict(run.model.named_parameters())
    sparse = 0.0
    for name, count in flops.items():
        if name in run.sparse_names:
            sparse += count * int((params[name] != 0).sum()) / params[name].numel()
        else:
            sparse += count
    return int(sum(flops.values())), int(round(sparse))


def _saved_size(obj) -> int:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


# ---------------------------------------------------------------------------- a model without a run
def model_from_overrides(
    overrides: list[str], input_shape: tuple[int, ...] | None, num_classes: int | None
) -> RunModel:
    """The model `sparsebench train` would build from `overrides`, with random masks (see the docstring)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sparsebench.cli import compose_config, one_line, resolve
    from sparsebench.config import validate
    from sparsebench.data import load_dataset
    from sparsebench.models import create_model
    from sparsebench.sparse.masked import MaskedModel
    from sparsebench.train import sparsity_target

    if not any(o.lstrip("+~").startswith("method=") for o in overrides):
        overrides = ["method=static", *overrides]  # structured masks need a method that keeps them
    try:
        resolved = resolve(compose_config(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(one_line(error)) from None
    cfg = validate(resolved)
    if input_shape is None or num_classes is None:
        data = load_dataset(cfg.dataset, **cfg.dataset_options)
        input_shape, num_classes = input_shape or data.input_shape, num_classes or data.num_classes
    torch.manual_seed(cfg.run.seed)
    model = create_model(cfg.model, input_shape, num_classes, **cfg.model_options)
    d = cfg.distribution_options
    try:
        engine = MaskedModel(model, d.dense_first, d.dense_last, d.dense_layers, d.sparsity_structure())
    except ValueError as error:
        raise UserError(f"distribution: {error} (model {cfg.model})") from None
    target = sparsity_target(cfg, engine)
    densities = target.densities or {n: 1.0 - cfg.run.sparsity for n in engine.names}  # global: uniform
    densities = engine.round_densities(densities)
    generator = torch.Generator().manual_seed(cfg.run.seed + 1)
    engine.set_masks(engine.random_masks(densities, generator), densities)
    model.float().eval()
    distribution = dict(resolved.get("distribution") or {})
    options = dict(cfg.model_options)
    return RunModel(model, cfg.model, options, tuple(input_shape), int(num_classes), list(engine.names), distribution)


# ---------------------------------------------------------------------------- output
def table(report: dict) -> str:
    lines = []
    env = report["environment"]
    load = env["load_average"]
    lines.append(f"device {env['device']} ({env['device_name']}), {env['threads']} threads, torch {env['torch']}"
                 + (f", load average {load[0]:.2f}" if load else ""))
    flops = report["flops"]
    if flops["ratio"] is not None:
        lines.append(f"forward FLOPs: {flops['ratio']:.3f}x dense "
                     f"({report['source']['sparsity']:.4f} of the sparse layers' weights are zero)")
    lines.append(f"{'format':<16} {'dtype':<9} {'batch':>5} {'latency ms':>11} {'per second':>11} {'speedup':>8}")
    for name, entry in report["formats"].items():
        if entry["status"] != "ok":
            continue
        label = name + (f" {entry['block']}x{entry['block']}" if entry["block"] else "")
        for row in entry["inference"]:
            lines.append(f"{label:<16} {entry['dtype']:<9} {row['batch']:>5} {row['latency_ms']:>11.3f} "
                         f"{row['throughput_per_s']:>11.1f} {row['speedup']:>7.2f}x")
    training = report["training"]
    if training["status"] == "ok":
        steps = ", ".join(f"{n} {s['step_ms']:.2f} ms ({s['speedup']:.2f}x)"
                          for n, s in training["steps"].items() if s["status"] == "ok")
        lines.append(f"training step, batch {training['batch']}: {steps}")
    lines.append(f"{'format':<16} {'weight bytes':>13} {'file bytes':>11} {'peak memory':>12}")
    for name, entry in report["formats"].items():
        if entry["status"] != "ok":
            continue
        peak = entry["peak_memory_bytes"]
        file_bytes = entry["file_bytes"] if entry["file_bytes"] is not None else "-"
        lines.append(f"{name:<16} {entry['weight_bytes']:>13} {file_bytes:>11} {peak if peak is not None else '-':>12}")
    lines.append(f"peak memory: {report['memory_method']}")
    for name, entry in report["formats"].items():
        if entry["status"] != "ok":
            lines.append(f"skipped {name}: {entry['reason']}")
        elif entry.get("block_fill") is not None and entry["block_fill"] < 1.0:
            lines.append(f"note {name}: stored blocks are {entry['block_fill']:.1%} non-zero (padded with zeros)")
    if training["status"] == "ok":
        lines.extend(f"skipped training step {n}: {s['reason']}" for n, s in training["steps"].items()
                     if s["status"] != "ok")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message} (see {PROG} --help)")


def _int_list(text: str) -> list[int]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or not all(v.isdigit() and int(v) >= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive whole numbers, got {text!r}")
    return [int(v) for v in values]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


# Upper bounds: beyond them torch fails inside its allocator (a batch of 10^8) or crashes (10^5
# OpenMP threads), where a one-line refusal belongs.
MAX_BATCH, MAX_THREADS = 65_536, 1024


def _batch_sizes(text: str) -> list[int]:
    sizes = _int_list(text)
    if max(sizes) > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"batch sizes are at most {MAX_BATCH}, got {max(sizes)}")
    return sizes


def _threads(text: str) -> int:
    threads = _positive(text)
    if threads > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"at most {MAX_THREADS} threads, got {threads}")
    return threads


def _formats(text: str) -> list[str]:
    values = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [v for v in values if v not in FORMATS]
    if unknown or not values:
        bad = unknown[0] if unknown else text
        raise argparse.ArgumentTypeError(f"unknown format {bad!r}; choose from {', '.join(FORMATS)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Dense against every available sparse backend, measured side by side.")
    parser.add_argument("target", nargs="+", metavar="RUN_DIR | key=value",
                        help="a completed run directory, or train overrides "
                             "(model=... sparsity=... distribution.structure=...)")
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=list(DEFAULT_BATCH_SIZES), metavar="B,B,...",
                        help="inference batch sizes (default 1,64,256; at most 65536); the training step uses the largest")
    parser.add_argument("--repeats", type=_positive, default=15, metavar="N", help="timed repeats (default 15)")
    parser.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed repeats first (default 3)")
    parser.add_argument("--threads", type=_threads, default=2, metavar="N", help="torch threads (default 2; at most 1024)")
    parser.add_argument("--formats", type=_formats, default=list(FORMATS), metavar="F,F",
                        help=f"formats to try (default {','.join(FORMATS)})")
    parser.add_argument("--block", type=_positive, metavar="N",
                        help="BSR block side (default: the run's distribution.block, else 32)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--half", choices=("float16", "bfloat16"), default="float16", help="dtype of 2:4 runs")
    parser.add_argument("--memory", choices=("auto", "none"), default="auto",
                        help="measure peak memory (CPU: in a child process) or not")
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    parser.add_argument("--input-shape", type=_int_list, metavar="C,H,W", help="no-run form: skip loading the dataset")
    parser.add_argument("--num-classes", type=_positive, metavar="K", help="no-run form: skip loading the dataset")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help=f"where to write the JSON (default RUN_DIR/{BENCH_FILE})")
    return parser


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def run_bench(args: argparse.Namespace) -> tuple[dict, Path | None]:
    device = _device(args.device)
    if args.warmup < 0:
        raise UserError("--warmup must be >= 0")
    # A run directory's path holds '=' too (sparsity=0.9/seed=0-...): an existing path, or one whose
    # "key" has a slash, is a path; key=value overrides are everything else.
    def is_override(text: str) -> bool:
        key = text.split("=", 1)[0]
        return "=" in text and not os.path.exists(text) and ("/" not in key or key.startswith("hydra/"))

    overrides = [t for t in args.target if is_override(t)]
    if overrides and len(overrides) != len(args.target):
        raise UserError("give either one RUN_DIR or key=value overrides, not both")
    if not overrides and len(args.target) != 1:
        raise UserError(f"expected one RUN_DIR, got {len(args.target)} paths")
    if overrides:
        run = model_from_overrides(overrides, tuple(args.input_shape) if args.input_shape else None, args.num_classes)
        source = {"run_dir": None, "overrides": overrides}
        out = args.out
    else:
        if args.input_shape or args.num_classes:
            raise UserError("--input-shape and --num-classes apply to the no-run form only (the run knows its shapes)")
        run = read_run(Path(args.target[0]))
        source = {"run_dir": str(run.run_dir), "overrides": None}
        out = args.out or run.run_dir / BENCH_FILE
    if out is not None:
        out = out / BENCH_FILE if out.is_dir() else out
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: directory {out.parent} does not exist")
        if results.overwrites_run_file(out):
            raise UserError(f"--out {out}: {out.name} is a file of the run directory {out.parent}; "
                            "write the JSON under another name")
    settings = Settings(sorted(set(args.batch_sizes)), args.repeats, args.warmup, args.threads, args.formats,
                        args.block, device, args.half, args.memory != "none", not args.no_train)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = benchmark(run, settings, source)
    except (MemoryError, RuntimeError) as error:  # CUDA's OutOfMemoryError and the CPU allocator's are RuntimeErrors
        if not isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) and "can't allocate memory" not in str(error):
            raise
        raise UserError(f"out of memory at --batch-sizes {','.join(map(str, settings.batch_sizes))}: "
                        "use smaller batches") from None
    finally:
        torch.set_num_threads(previous)
    if out is not None:
        try:
            results.atomic_write_json(out, report)
        except OSError as error:
            raise UserError(f"cannot write {out}: {error.strerror or error}") from None
    return report, out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_memory_probe":  # the child process of cpu_peak_memory
        print(json.dumps(_memory_probe(argv[3:], int(argv[1]), int(argv[2]))))
        return 0
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        report, out = run_bench(args)
    except UserError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help printed its text
        return int(done.code or 0)
    print(table(report))
    if out is not None:
        print(f"{PROG}: wrote {out}", file=sys.stderr)
    else:
        print(f"{PROG}: no run directory: pass --out FILE to keep the JSON", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
