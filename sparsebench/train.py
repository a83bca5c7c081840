"""The trainer: one run from a validated config to final.json, readable top to bottom.

It builds data, model, engine, optimizer and method, then runs the loop; it never knows which
method runs (the method acts only through its hooks). Every epoch it evaluates, appends a line
to metrics.jsonl and writes a checkpoint; a killed run resumes from its last checkpoint with
model, masks, optimizer, LR schedule position, method state and every RNG restored, and data
order is a function of (seed, epoch) so the resumed epochs see the same batches.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from tqdm import tqdm

from sparsebench import checkpoint, distributed, dry_run, interrupts, results
from sparsebench.config import Config, Device, MarsVariant, Progress
from sparsebench.data import DatasetBundle, load_dataset
from sparsebench.errors import RunInterrupted, UserError
from sparsebench.live_log import TensorBoardLog
from sparsebench.mars import MarsAdamW
from sparsebench.methods import METHODS, SparsityMethod, SparsityTarget, StepContext, finish_step
from sparsebench.models import create_model
from sparsebench.provenance import provenance
from sparsebench.replica_ranks import ReplicaRanks
from sparsebench.schedules import lr_at
from sparsebench.sparse import backend as training_backend
from sparsebench.sparse.allocation import layer_densities
from sparsebench.sparse.flops import FlopCounter, layer_forward_flops
from sparsebench.sparse.initialisation import rescale_for_sparsity
from sparsebench.sparse.masked import MaskedModel
from sparsebench.sparse.powerprop import apply_powerprop, export_state_dict


def log(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for every rank
        tqdm.write(message, file=sys.stdout)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(choice: Device) -> torch.device:
    if choice is Device.cuda and not torch.cuda.is_available():
        raise UserError("device=cuda: no CUDA device is available here; use device=auto or device=cpu")
    if choice is Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optimizer_options
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )
    if cfg.optimizer == "mars":
        return MarsAdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                         gamma=o.gamma, betas_1d=(o.beta1_1d, o.beta2_1d), weight_decay_1d=o.weight_decay_1d,
                         kernels=o.kernels, exact=o.variant is MarsVariant.exact)
    adam = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return adam(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)


def sparsity_target(cfg: Config, engine: MaskedModel) -> SparsityTarget:
    d, sparsity = cfg.distribution_options, cfg.run.sparsity
    if cfg.distribution == "global":
        return SparsityTarget(sparsity, "global", None)
    shapes = {n: t.param.shape for n, t in engine.tensors.items()}
    densities = layer_densities(cfg.distribution, shapes, sparsity, d.erk_power_scale, d.file)
    return SparsityTarget(sparsity, cfg.distribution, densities)


@dataclass
class Run:
    """Everything built from the config before the run directory exists (so bad input leaves no trace)."""

    cfg: Config
    data: DatasetBundle
    model: torch.nn.Module
    engine: MaskedModel
    method: SparsityMethod
    optimizer: torch.optim.Optimizer | None  # None when built only to plan or check
    device: torch.device
    steps_per_epoch: int


def build_run(
    cfg: Config, data: DatasetBundle | None = None, device: torch.device | None = None, with_optimizer: bool = True
) -> Run:
    """Data, model, engine, method and optimizer for `cfg` (`data`/`device` given by check_run).
    Plans and checks need no optimizer (building one imports torch._dynamo, ~2 s)."""
    run = cfg.run
    seed_everything(run.seed)
    device = device or pick_device(run.device)
    data = data or load_dataset(cfg.dataset, **cfg.dataset_options)
    model = create_model(cfg.model, data.input_shape, data.num_classes, **cfg.model_options).to(device)
    d = cfg.distribution_options
    structure = d.sparsity_structure()  # N:M or blocks: every mask the engine installs follows it
    training_backend.check(cfg)  # backend=sparse set-ups it cannot run: one line, before any directory
    try:
        engine = MaskedModel(model, d.dense_first, d.dense_last, d.dense_layers, structure)
    except ValueError as exc:
        raise UserError(f"distribution: {exc} (model {cfg.model})") from None
    if run.powerprop != 1.0:  # re-parameterise the prunable weights, then let the engine hold v
        apply_powerprop(model, engine.names, run.powerprop)
        engine = MaskedModel(model, d.dense_first, d.dense_last, d.dense_layers, structure)
    steps_per_epoch = math.ceil(len(data.train) / run.batch_size)
    target = sparsity_target(cfg, engine)
    method_cls = METHODS.get(cfg.method)
    generator = torch.Generator().manual_seed(run.seed + 1)
    method = method_cls(cfg.method_options, engine, target, run.epochs * steps_per_epoch, steps_per_epoch, generator)
    optimizer = build_optimizer(cfg, model) if with_optimizer else None
    return Run(cfg, data, model, engine, method, optimizer, device, steps_per_epoch)


def check_run(cfg: Config, data_cache: dict) -> None:
    """Everything build_run checks, without a real model: the model is made on PyTorch's meta
    device (shapes only, no memory), so a sweep's every job is checked before the first starts.
    Datasets are loaded once per distinct dataset config (`data_cache`)."""
    pick_device(cfg.run.device)
    key = json.dumps([cfg.dataset, cfg.dataset_options], sort_keys=True, default=str)
    if key not in data_cache:
        data_cache[key] = load_dataset(cfg.dataset, **cfg.dataset_options)
    with torch.device("meta"), _skip_weight_init():
        build_run(cfg, data_cache[key], torch.device("meta"), with_optimizer=False)


@contextlib.contextmanager
def _skip_weight_init():
    """Initialisers are no-ops while a model is built for checking only: on the meta device
    they run through torch's reference implementations, whose import alone costs ~2 s."""
    names = [n for n in vars(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def train_loader(run: Run, epoch: int, ranks: distributed.Processes = distributed.SINGLE,
                 trains: Callable[[int], bool] | None = None) -> DataLoader:
    """Shuffled by a generator seeded from (seed, epoch): a resumed epoch sees the same batches.
    With `ranks` / `trains`, this rank reads only its share of each batch, and only of the steps
    it trains (`distributed.RankBatches`)."""
    generator = torch.Generator().manual_seed(run.cfg.run.seed * 1_000_003 + epoch)
    batches = BatchSampler(RandomSampler(run.data.train, generator=generator), run.cfg.run.batch_size, drop_last=False)
    return DataLoader(
        run.data.train, batch_sampler=distributed.RankBatches(batches, ranks, trains), generator=generator,
        num_workers=run.cfg.run.num_workers, pin_memory=run.device.type == "cuda",
    )


def task_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy over this rank's examples. A rank with none (its share of a last batch
    smaller than the number of ranks) gets 0 instead of the mean's nan, kept on the graph so that
    its zero gradients still join DDP's all-reduce."""
    if len(y) == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate(run: Run) -> tuple[float, float, float]:
    """(mean test loss, top-1 test accuracy in %, expected calibration error in %)."""
    model = run.model
    model.eval()
    loader = DataLoader(run.data.test, batch_size=run.cfg.run.eval_batch_size, num_workers=run.cfg.run.num_workers)
    loss_sum, confidences, hits = 0.0, [], []
    for x, y in loader:
        x, y = x.to(run.device), y.to(run.device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        confidence, prediction = logits.float().softmax(1).max(1)
        confidences.append(confidence.cpu())
        hits.append((prediction == y).cpu())
    model.train()
    confidence, hit = torch.cat(confidences), torch.cat(hits)
    ece = expected_calibration_error(confidence, hit, run.cfg.run.ece_bins)
    return loss_sum / len(hit), 100.0 * hit.float().mean().item(), 100.0 * ece


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017, eq. 3): sum_b |B_b|/n |acc(B_b) - conf(B_b)| over `bins` equal-width
    confidence bins (`ece_bins`: 15 as Guo et al.; CigL's code, whose paper compares sparse
    methods on this metric, uses 10)."""
    edges = torch.linspace(0, 1, bins + 1)
    bin_of = torch.bucketize(confidence, edges[1:-1], right=True)  # bin b holds (edge_b, edge_b+1]
    ece = 0.0
    for b in range(bins):
        members = bin_of == b
        if members.any():
            gap = correct[members].float().mean() - confidence[members].mean()
            ece += members.float().mean().item() * abs(gap.item())
    return ece


def train(cfg: Config, resolved: dict, config_yaml: str) -> Path | None:
    """Train one run into its directory; returns the directory. Skips a completed run."""
    processes = distributed.from_environment(cfg.run.device.value)  # torchrun: several ranks, one run
    path = results.run_dir(resolved)
    if not cfg.run.dry_run and not cfg.run.rerun and distributed.agree(results.is_complete(path), processes):
        log(f"already complete, skipped: {path}")  # before building anything: a done sweep relaunches fast
        if processes.writer:
            results.drop_leftover_checkpoint(path)
        return path
    run = build_run(cfg, with_optimizer=not cfg.run.dry_run)  # every user error surfaces here, before any directory exists
    distributed.check(cfg, processes)
    if cfg.run.dry_run:
        dry_run.describe(run, log)
        return None
    with contextlib.ExitStack() as held:
        claimed = True
        if processes.writer:  # rank 0 alone creates, locks and writes the directory
            results.create_run_dir(path)
            claimed = held.enter_context(results.run_lock(path)) and _claim(path, config_yaml, cfg.run.rerun)
        if not distributed.agree(claimed, processes):
            log(f"another process is training this run or has just finished it, skipped: {path}")
            return path
        try:
            with interrupts.signals_as_exceptions():
                _train_locked(run, path, processes)
        except OSError as exc:  # full disk, vanished directory: final.json is absent, so not a result
            raise UserError(f"cannot write to run directory {path}: {exc.strerror or exc}") from None
        except (KeyboardInterrupt, interrupts.Terminated) as exc:
            done = len(results.read_jsonl(path / results.METRICS_FILE))
            raise RunInterrupted(
                f"interrupted by {interrupts.signal_name(exc)} after {done} of {cfg.run.epochs} epochs; "
                f"relaunch the same command to resume from the last checkpoint: {path}",
                interrupts.exit_code(exc),
            ) from None
    return path


def _claim(path: Path, config_yaml: str, rerun: bool) -> bool:
    """Under the run's lock: False if another process finished it meanwhile, else prepare it."""
    if results.is_complete(path) and not rerun:
        return False
    if rerun:
        results.clear_run(path)
    results.atomic_write_text(path / results.CONFIG_FILE, config_yaml)
    results.remove_stale_temporaries(path)
    (path / results.FINAL_FILE).unlink(missing_ok=True)  # unreadable, so not a result: redone
    return True


def _train_locked(run: Run, path: Path, processes: distributed.Processes) -> None:
    cfg, model, engine, method, device = run.cfg, run.model, run.engine, run.method, run.device
    o, sched = cfg.run, cfg.schedule_options
    writes = processes.writer  # every rank trains; rank 0 alone writes the run's files
    total_steps = o.epochs * run.steps_per_epoch
    counter = FlopCounter(layer_forward_flops(model, run.data.input_shape))
    use_amp = o.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if o.amp and not use_amp:
        log("amp=true needs CUDA; training in float32 on the CPU")

    # The code that trains, read now: a checkout may move on while a long run trains.
    origin = provenance(device, processes.world_size) if writes else None
    state = {"epoch": 0, "step": 0, "train_flops": 0.0, "train_flops_dense": 0.0, "best_test_acc": 0.0,
             "lr_origin": 0, "lr_span": total_steps, "wall_time_s": 0.0, "last_eval": None}

    def reset_optimizer() -> None:
        run.optimizer.state.clear()

    def restart_lr(span: int) -> None:
        state["lr_origin"], state["lr_span"] = state["step"], span

    def first_batch() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(iter(train_loader(run, 0)))
        return x.to(device), y.to(device)

    def train_batches(epoch: int):
        return ((x.to(device), y.to(device)) for x, y in train_loader(run, epoch))

    # P-GaP on kappa ranks: each rank trains its own replica, no gradient is shared (replica_ranks.py)
    replicas = ReplicaRanks.for_run(method, processes)
    data_ranks = distributed.SINGLE if replicas.active else processes  # ranks sharing each batch (DDP)

    def write_events(step: int, epoch: int, events: list) -> None:
        log_mask_update(path, step, epoch, events)

    def exchange(piece: dict) -> list[dict]:
        return replicas.exchange(piece, ctx.step, ctx.step // run.steps_per_epoch, sums, engine, state,
                                 write_events, publish)

    ctx = StepContext(0, total_steps, run.steps_per_epoch, run.optimizer, reset_optimizer, restart_lr, log, first_batch,
                      exchange if replicas.active else None, train_batches)
    checkpoint_path = path / results.CHECKPOINT_FILE
    if checkpoint_path.is_file():
        state.update(checkpoint.load(checkpoint_path, run, scaler))
        if writes:
            results.truncate_jsonl(path / results.METRICS_FILE, "epoch", state["epoch"])
            results.truncate_jsonl(path / results.MASK_UPDATES_FILE, "step", state["step"] - 1)  # logged in that step
        log(f"resuming {path} from epoch {state['epoch']}")
    else:
        if writes:
            (path / results.METRICS_FILE).unlink(missing_ok=True)
            (path / results.MASK_UPDATES_FILE).unlink(missing_ok=True)
        method.start(ctx)
        rescale_for_sparsity(engine, o.sparse_init)
        engine.start_exploration_count()
        engine.pop_mask_events()  # the initial masks are not an update
        log(f"{len(method.mask_update_steps())} mask updates planned in {total_steps} steps")
        if method.schedule_warning():
            log(method.schedule_warning())
    masks_at_last_eval = engine.masks()
    replicas.start(state, masks_at_last_eval)
    if replicas.active:
        log(f"P-GaP: {processes.world_size} ranks train the {processes.world_size} replicas of each round side by side")

    live_log = TensorBoardLog(path) if o.tensorboard and writes else None
    show_bar = o.progress is Progress.bar or (o.progress is Progress.auto and sys.stderr.isatty())
    bar = tqdm(total=total_steps, initial=state["step"], disable=not show_bar, unit="step", leave=False)
    flops_cache = (-1, False, 0.0)  # (engine version, dense grad?, per-example step FLOPs)
    started = time.perf_counter() - state["wall_time_s"]
    backend = training_backend.create(run, state.get("backend"), log)  # per-layer paths; a resumed run keeps them
    state["backend"] = backend.state_dict()
    net = distributed.wrap(model, data_ranks, device)  # DistributedDataParallel under torchrun

    def publish(record: dict) -> None:
        """An epoch's line: metrics.jsonl (rank 0), the live log and the console."""
        state["epoch"] = max(state["epoch"], record["epoch"])
        state["best_test_acc"] = max(state["best_test_acc"], record["test_acc"])
        state["last_eval"] = {k: record[k] for k in ("test_loss", "test_acc", "ece")}
        if writes:
            results.append_jsonl(path / results.METRICS_FILE, record)
        if live_log:
            live_log.write(record)
        bar.set_postfix(epoch=record["epoch"], test_acc=f"{record['test_acc']:.2f}")
        if not show_bar and record["epoch"] % max(1, o.epochs // 8) == 0 or record["epoch"] == o.epochs:
            log(f"epoch {record['epoch']:>3}/{o.epochs}  train_loss {record['train_loss']:.4f}  "
                f"test_acc {record['test_acc']:6.2f}  sparsity {record['actual_sparsity']:.4f}")

    def epoch_record(epoch: int, lr: float, totals: list[float], masks: dict[str, torch.Tensor]) -> dict:
        """Evaluate; the epoch's line. `totals`: the epoch's training-loss sum, correct predictions,
        examples; `masks`: the masks now."""
        test_loss, test_acc, ece = evaluate(run)
        state["wall_time_s"] = time.perf_counter() - started
        return {
            "epoch": epoch + 1, "step": state["step"], "lr": lr,
            "train_loss": totals[0] / totals[2], "train_acc": 100.0 * totals[1] / totals[2],
            "test_loss": test_loss, "test_acc": test_acc, "ece": ece, "itop_rate": engine.itop_rate(),
            **sparsity_fields(run),
            "weights_changed": MaskedModel.masks_changed(masks, masks_at_last_eval),
            "train_flops": state["train_flops"], "wall_time_s": state["wall_time_s"],
        }

    def finish_epoch(record: dict) -> None:
        publish(record)
        backend.settle()  # the optimizer state is checkpointed as the masked backend would have it
        if writes:
            checkpoint.save(checkpoint_path, run, scaler, state)

    def with_penalty(loss: torch.Tensor) -> torch.Tensor:
        penalty = method.loss_term()  # a method's regulariser; train_loss logs the task loss alone
        return loss if penalty is None else loss + penalty

    def step_objective(x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
        """The loss this rank backpropagates for a batch, for a second pass (exact MARS; amp refused)."""
        loss = task_loss(net(x), y, o.label_smoothing)
        return with_penalty(loss) * data_ranks.loss_scale(len(y), batch)

    def mask_step_gradients(step: int) -> None:
        if method.mask_gradients_at(step):
            engine.mask_gradients()

    exact_mars = getattr(run.optimizer, "exact", False)  # optimizer=mars optimizer.variant=exact (mars.py)
    model.train()
    for epoch in range(state["epoch"], o.epochs):
        sums = [0.0, 0, 0]  # this epoch's training-loss sum, correct predictions, examples (this rank)
        epoch_start = state["step"]
        batches = iter(train_loader(run, epoch, data_ranks,
                                    (lambda i: replicas.trains(epoch_start + i)) if replicas.active else None))
        for index in range(run.steps_per_epoch):
            ctx.step = state["step"]
            method.before_step(ctx)
            if not replicas.trains(state["step"]):  # another rank's replica: walk past its batch
                replicas.keep_events(state["step"], epoch + 1, engine.pop_mask_events(), write_events)
                state["step"] += 1
                bar.update()
                continue
            x, y = next(batches)  # this rank's share of the step's global batch
            batch = min(o.batch_size, len(run.data.train) - index * o.batch_size)  # the global batch
            if batch < data_ranks.world_size:  # RankBatches read it whole (some share would be empty)
                x, y = data_ranks.shard(x), data_ranks.shard(y)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            backend.begin_step(state["step"])
            lr = lr_at(
                state["step"] - state["lr_origin"], state["lr_span"], cfg.optimizer_options.lr, cfg.schedule,
                round(sched.warmup_epochs * run.steps_per_epoch),
                [m * run.steps_per_epoch for m in sched.milestones], sched.gamma, sched.min_lr,
            )
            lr = method.learning_rate(state["step"], lr)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            if exact_mars and run.optimizer.record_previous_gradients(  # the previous weights' gradient on this batch
                    model, lambda: step_objective(x, y, batch), lambda: mask_step_gradients(state["step"])):
                state["train_flops"] += counter.train_step(engine.densities(), False) * batch  # a second pass
                state["train_flops"] += method.step_flops_overhead(state["step"])
                state["train_flops_dense"] += counter.dense_train_step() * batch
            with torch.autocast(device.type, enabled=use_amp):
                logits = net(x)
                loss = task_loss(logits, y, o.label_smoothing)
                objective = with_penalty(loss)  # what is backpropagated: a non-finite penalty diverges too
            finite = bool(torch.isfinite(objective))
            if replicas.active and not finite and state["step"] < replicas.finetune_start:
                raise UserError(f"P-GaP replica of rank {processes.rank} diverged at step {state['step']} "
                                f"(loss {objective.item()}); the run stops at its last checkpoint")
            if not distributed.agree(finite, data_ranks):
                if writes:
                    _write_diverged(path, run, state, started)
                bar.close()
                if live_log:
                    live_log.close()
                log(f"diverged: loss is {objective.item()} at step {state['step']}; marked in {path / results.FINAL_FILE}")
                return
            run.optimizer.zero_grad(set_to_none=True)
            scaler.scale(objective * data_ranks.loss_scale(len(y), batch)).backward()
            finish_step(method, engine, ctx, lambda: (scaler.step(run.optimizer), scaler.update()))
            if distributed.agree_any(bool(engine.mask_events), data_ranks):
                distributed.check_masks(engine.masks(), data_ranks)  # every rank holds rank 0's masks
            events = engine.pop_mask_events()
            if writes or replicas.active:
                replicas.keep_events(state["step"], epoch + 1, events, write_events)

            dense_grad = method.dense_weight_grad(state["step"])
            if flops_cache[:2] != (engine.version, dense_grad):
                flops_cache = (engine.version, dense_grad, counter.train_step(engine.densities(), dense_grad))
            state["train_flops"] += flops_cache[2] * batch  # counted once, for the global batch
            state["train_flops"] += method.step_flops_overhead(state["step"])
            state["train_flops_dense"] += counter.dense_train_step() * batch
            state["step"] += 1
            sums[0] += loss.item() * len(y)
            sums[1] += (logits.argmax(1) == y).sum().item()
            sums[2] += len(y)
            bar.update()

        sums = distributed.sum_over_ranks(sums, data_ranks)
        masks = engine.masks()
        if replicas.active:  # the line waits for the other ranks' share unless this rank can write it now
            replicas.end_epoch(epoch, sums, state["step"] - 1, state,
                               lambda totals: epoch_record(epoch, lr, totals, masks), masks, finish_epoch)
        else:
            finish_epoch(epoch_record(epoch, lr, sums, masks))
            masks_at_last_eval = masks
        distributed.barrier(data_ranks)  # no rank starts an epoch its peers could not resume from
    bar.close()
    if live_log:
        live_log.close()
    if not writes:
        return

    results.atomic_torch_save(path / results.MODEL_FILE, export_state_dict(model))
    for name, artifact in method.artifacts().items():
        results.atomic_torch_save(path / f"{name}.pt", artifact)
    final = _summary(run, state, "completed")
    final.update(state["last_eval"])  # from the checkpoint if killed between it and final.json
    final.update(inference_flops=counter.forward(method.inference_flop_densities(run.data.input_shape)
                                                 or engine.densities()),
                 inference_flops_dense=counter.dense_forward,
                 world_size=processes.world_size, provenance=origin, **method.summary())
    results.atomic_write_json(path / results.FINAL_FILE, final)  # last: its presence means done
    checkpoint_path.unlink(missing_ok=True)
    at_chance = final["test_acc"] <= final["chance_acc"] + CHANCE_MARGIN
    log(f"done: test_acc {final['test_acc']:.2f}  actual_sparsity {final['actual_sparsity']:.4f}  "
        f"train FLOPs {final['train_flops_ratio']:.3f}x dense  ->  {path}"
        + (f"  [AT CHANCE LEVEL ({final['chance_acc']:.2f} %): the model learned nothing; check the data's "
           "scaling and labels, the learning rate and the sparsity]" if at_chance else ""))


def log_mask_update(path: Path, step: int, epoch: int, events: list[tuple[str, int, int]]) -> None:
    """One line per step that changed masks: weights dropped and grown per tensor."""
    layers = {}
    for name, dropped, grown in events:
        entry = layers.setdefault(name, {"dropped": 0, "grown": 0})
        entry["dropped"] += dropped
        entry["grown"] += grown
    results.append_jsonl(path / results.MASK_UPDATES_FILE, {"step": step, "epoch": epoch, "layers": layers})


# A final accuracy within a point of chance means the run learned nothing (the report flags it too).
CHANCE_MARGIN = 1.0


def chance_accuracy(data: DatasetBundle) -> float:
    """Test accuracy (%) of always predicting the most frequent test class: 100/C when balanced."""
    labels = getattr(data.test, "labels", None)
    if labels is None:
        labels = getattr(data.test, "targets", None)
    if labels is None or len(labels) == 0:
        return 100.0 / data.num_classes
    counts = torch.bincount(torch.as_tensor(labels), minlength=data.num_classes)
    return 100.0 * counts.max().item() / len(labels)


def sparsity_fields(run: Run) -> dict:
    """actual_sparsity and layer_densities: the weights' exact zeros, or the method's own count
    of kept parameters where its sparsity is not a mask (SVD training's ranks)."""
    densities = run.method.parameter_densities()
    if densities is None:
        return {"actual_sparsity": run.engine.actual_sparsity(), "layer_densities": run.engine.weight_densities()}
    sizes = {n: t.numel for n, t in run.engine.tensors.items()}
    kept = sum(densities[n] * sizes[n] for n in sizes)
    return {"actual_sparsity": 1.0 - kept / sum(sizes.values()), "layer_densities": dict(densities)}


def _summary(run: Run, state: dict, status: str) -> dict:
    cfg = run.cfg
    return {
        "status": status,
        "input_shape": list(run.data.input_shape), "num_classes": run.data.num_classes,
        "chance_acc": chance_accuracy(run.data),
        "input_normalization": run.data.normalization, "class_labels": run.data.class_labels,
        "method": results.method_label(cfg.method, cfg.run.powerprop), "model": cfg.model, "dataset": cfg.dataset, "distribution": cfg.distribution,
        "sparsity": cfg.run.sparsity, "seed": cfg.run.seed, "epochs": cfg.run.epochs, "steps": state["step"],
        **sparsity_fields(run),
        "itop_rate": run.engine.itop_rate(),
        "dense_layers": run.engine.dense_names,
        "best_test_acc": state["best_test_acc"],
        "train_flops": state["train_flops"], "train_flops_dense": state["train_flops_dense"],
        "train_flops_ratio": state["train_flops"] / max(state["train_flops_dense"], 1.0),
        "wall_time_s": state["wall_time_s"],
        **training_backend.summary(state.get("backend")),
    }


def _write_diverged(path: Path, run: Run, state: dict, started: float) -> None:
    state["wall_time_s"] = time.perf_counter() - started
    final = _summary(run, state, "diverged")
    final.update(diverged_at_step=state["step"], test_acc=float("nan"), test_loss=float("nan"))
    results.atomic_write_json(path / results.FINAL_FILE, final)
    (path / results.CHECKPOINT_FILE).unlink(missing_ok=True)
