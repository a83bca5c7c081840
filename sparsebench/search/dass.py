"""`sparsebench search method=dass`: a DARTS cell search whose candidates include sparse operations.

DASS (Mousavi, Loni, Alibeigi, Daneshtalab, "DASS: Differentiable Architecture Search for
Sparse Neural Networks", ACM TECS 2023, arXiv:2207.06968) extends the DARTS search space (Liu
et al., ICLR 2019) with parametric sparse convolution and sparse linear operations and makes
the search objective aware of sparsity. What this file does (docs/dass.md):

* Supernet. DARTS cells (models/dass_net.py): every edge of a cell is a mixture of the
  candidate operations weighted by softmax(alpha); one alpha matrix for all normal cells and
  one for all reduction cells. BatchNorm without affine parameters, as in DARTS's supernet.
* Sparse operations (`sparse_conv_3`, `sparse_conv_5`, `sparse_linear`) keep a dense weight W
  and a mask M holding exactly target_nnz(numel, 1 - sparsity) entries, the top-k of |W|. The
  forward pass uses W * M and passes the gradient to all of W (a straight-through estimator),
  so pruned entries can grow back when the mask is recomputed. When the mask is recomputed
  (`mask_refresh`) and whether pruned entries are zeroed (`pruned_weights`) are our choices:
  the paper's exact masking rule could not be verified.
* Objective: validation cross-entropy + `cost_weight` x the expected fraction of non-zero
  operation weights under softmax(alpha), normalised by the largest operation of each edge.
  The form of this sparsity term is our choice (the paper's exact term could not be verified).
* Bilevel optimisation, first order (DARTS's first-order approximation; no unrolled
  second-order step): each step updates alpha on a batch of the architecture part of the
  training split (Adam, betas (0.5, 0.999), weight decay 1e-3 as in DARTS; lr 1e-2 instead of
  DARTS's 3e-4 because the default search has ~100x fewer steps, see DassOptions), then the
  network weights on a batch of the weight part (the run's optimizer and LR schedule, gradient
  clipping at 5 as in DARTS). The two parts are a seeded partition of the TRAINING split; the
  test split is never read.
* Discretisation (DARTS): per intermediate node keep the two incoming edges whose strongest
  non-`none` operation weighs most, each with its strongest non-`none` operation.

Outputs: genotype.json (models/dass_net.py reads it: `sparsebench train model=dass
model.genotype=PATH method=gmp`), one metrics line per search epoch, and a checkpoint after every
epoch from which a killed search resumes bit for bit (same machine and thread count).
"""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from sparsebench import results
from sparsebench.data import load_dataset
from sparsebench.errors import UserError
from sparsebench.models import dass_net
from sparsebench.models.dass_net import OPERATIONS, CellNetwork, Genotype, Layers
from sparsebench.schedules import lr_at
from sparsebench.search.base import SEARCHES, Search, SearchJob, arm_config
from sparsebench.sparse.flops import layer_forward_flops
from sparsebench.sparse.masked import target_nnz, topk_mask

GENOTYPE_FILE = "genotype.json"
EDGES_KEPT = 2  # incoming edges per intermediate node in the derived cell (DARTS)


class MaskRefresh(enum.Enum):
    """When the sparse operations recompute their top-k mask (unverified detail of DASS)."""

    step = "step"  # after every weight step
    epoch = "epoch"  # after every search epoch


class PrunedWeights(enum.Enum):
    """What a mask refresh does to the pruned entries of W (unverified detail of DASS)."""

    zero = "zero"  # set them to zero: projected gradient / iterative hard thresholding
    keep = "keep"  # keep their values (only the forward pass skips them), as in DPF (Lin et al. 2020)


@dataclass
class DassOptions:
    search_epochs: int = 10
    channels: int = 8  # channels of the first cell (the stem has 3x); doubled at each reduction
    cells: int = 3  # cells of the supernet; reduction cells at 1/3 and 2/3 of the depth
    nodes: int = 3  # intermediate nodes per cell
    operations: list[str] = field(default_factory=lambda: list(OPERATIONS))  # the candidate set
    # DARTS uses 3e-4 over ~20k architecture steps (50 CIFAR-10 epochs); the default search here
    # has 160 steps, in which 3e-4 left every softmax(alpha) within 0.107..0.118 of uniform (the
    # genotype was the initial noise), so the rate is scaled up to let alpha decide.
    arch_lr: float = 1e-2
    arch_weight_decay: float = 1e-3
    cost_weight: float = 0.1  # weight of the expected-density term in the architecture objective
    val_fraction: float = 0.5  # share of the training split that trains alpha (the rest trains weights)
    mask_refresh: MaskRefresh = MaskRefresh.step
    pruned_weights: PrunedWeights = PrunedWeights.zero
    grad_clip: float = 5.0  # max gradient norm of the weight step; 0 = no clipping
    retrain: list[str] = field(default_factory=list)  # training methods to retrain the derived network with


# ---------------------------------------------------------------------------- sparse operations
class _SparseConv:
    """A convolution whose weight is used through a top-k magnitude mask (DASS's sparse ops).

    `mask` is a buffer, so it is part of the supernet's state_dict and a resumed search
    continues with the same masks."""

    density: float
    pruned_weights: PrunedWeights

    def setup(self, density: float, pruned_weights: PrunedWeights) -> None:
        self.density, self.pruned_weights = density, pruned_weights
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.refresh()

    @property
    def nnz(self) -> int:
        return target_nnz(self.weight.numel(), self.density)

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-prune by magnitude: exactly `nnz` entries, the largest |W| (ties as torch.topk)."""
        self.mask.copy_(topk_mask(self.weight.abs(), self.nnz))
        if self.pruned_weights is PrunedWeights.zero:
            self.weight.mul_(self.mask)

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        # Value W * M exactly (kept entries add 0, pruned ones subtract themselves); gradient
        # dense: the straight-through estimator that lets pruned entries compete again.
        return w + (w * self.mask - w).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class SparseConv1d(_SparseConv, nn.Conv1d):
    pass


class SparseConv2d(_SparseConv, nn.Conv2d):
    pass


def sparse_conv_factory(density: float, pruned_weights: PrunedWeights) -> dass_net.ConvFactory:
    """The supernet's convolutions: masked for the `sparse_*` operations, plain otherwise."""

    def conv(layers: Layers, c_in: int, c_out: int, kernel: int, stride: int, padding: int, sparse: bool):
        if not sparse:
            return dass_net.plain_conv(layers, c_in, c_out, kernel, stride, padding, False)
        cls = SparseConv1d if layers.dims == 1 else SparseConv2d
        module = cls(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        module.setup(density, pruned_weights)
        return module

    return conv


def sparse_convs(model: nn.Module) -> list[_SparseConv]:
    return [m for m in model.modules() if isinstance(m, _SparseConv)]


# ---------------------------------------------------------------------------- supernet
class MixedOp(nn.Module):
    """One edge: sum over candidates of softmax(alpha)_o * o(x). `none` has no module: its term
    is zero, so leaving it out changes neither the value nor any gradient."""

    def __init__(self, operations: list[str], layers: Layers, channels: int, stride: int, conv):
        super().__init__()
        self.slots = [i for i, name in enumerate(operations) if name != "none"]  # alpha column of each module
        self.ops = nn.ModuleList()
        for i in self.slots:
            op = dass_net.build_operation(operations[i], layers, channels, stride, affine=False, conv=conv)
            if OPERATIONS[operations[i]][0] in ("max_pool", "avg_pool"):
                # DARTS follows pooling by a parameter-free BatchNorm in the supernet, so that
                # pooled outputs are on the scale of the normalised parametric ones.
                op = nn.Sequential(op, layers.batch_norm(channels, affine=False))
            self.ops.append(op)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sum(weights[i] * op(x) for i, op in zip(self.slots, self.ops))


class SearchCell(nn.Module):
    """A DARTS search cell: node i sums a mixed op of each earlier state (2 + i edges)."""

    def __init__(self, operations, layers, nodes, c_prev_prev, c_prev, channels, reduction, reduction_prev, conv):
        super().__init__()
        self.reduction, self.nodes = reduction, nodes
        dass_net.cell_inputs(self, layers, c_prev_prev, c_prev, channels, reduction_prev, affine=False)
        self.edges = nn.ModuleList(
            MixedOp(operations, layers, channels, 2 if reduction and j < 2 else 1, conv)
            for i in range(nodes) for j in range(2 + i)
        )
        self.out_channels = nodes * channels

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        edge = 0
        for i in range(self.nodes):
            states.append(sum(self.edges[edge + j](state, weights[edge + j]) for j, state in enumerate(states)))
            edge += len(states) - 1
        return torch.cat(states[2:], dim=1)


def edge_count(nodes: int) -> int:
    return sum(2 + i for i in range(nodes))


class Architecture(nn.Module):
    """The architecture parameters: alpha for normal and for reduction cells, [edges, operations].
    DARTS initialises them at 1e-3 x N(0, 1)."""

    def __init__(self, nodes: int, operations: int):
        super().__init__()
        self.normal = nn.Parameter(1e-3 * torch.randn(edge_count(nodes), operations))
        self.reduce = nn.Parameter(1e-3 * torch.randn(edge_count(nodes), operations))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normal.softmax(dim=-1), self.reduce.softmax(dim=-1)


class Supernet(CellNetwork):
    def __init__(self, input_shape, num_classes, options: DassOptions, density: float):
        layers = dass_net.layers_for("dass", input_shape)
        conv = sparse_conv_factory(density, options.pruned_weights)

        def make_cell(index, c_prev_prev, c_prev, width, reduction, reduction_prev):
            return SearchCell(options.operations, layers, options.nodes, c_prev_prev, c_prev, width,
                              reduction, reduction_prev, conv)

        super().__init__(layers, input_shape, num_classes, options.channels, options.cells, make_cell, affine=False)
        self._weights: tuple[torch.Tensor, torch.Tensor] | None = None
        for module in self.modules():  # He init (fan_out, ReLU) as every sparsebench conv net
            if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for conv_module in sparse_convs(self):
            conv_module.refresh()  # the initial masks: top-k of the initial weights

    def run_cell(self, cell, s0, s1):
        normal, reduce = self._weights
        return cell(s0, s1, reduce if cell.reduction else normal)

    def forward(self, x: torch.Tensor, architecture: Architecture) -> torch.Tensor:
        self._weights = architecture.weights()
        try:
            return super().forward(x)
        finally:
            self._weights = None  # no stale graph kept alive between steps


class _WithArchitecture(nn.Module):
    """supernet(x) with fixed alphas, for the one-argument zero-input FLOP probe."""

    def __init__(self, supernet: Supernet, architecture: Architecture):
        super().__init__()
        self.supernet, self.architecture = supernet, architecture

    def forward(self, x):
        return self.supernet(x, self.architecture)


# ---------------------------------------------------------------------------- sparsity cost
def op_weight_counts(op: nn.Module) -> tuple[int, int]:
    """(non-zero, total) conv/linear weights of one candidate operation during the search."""
    nonzero = total = 0
    for module in op.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            total += module.weight.numel()
            nonzero += module.nnz if isinstance(module, _SparseConv) else module.weight.numel()
    return nonzero, total


class DensityCost:
    """Expected fraction of non-zero operation weights under softmax(alpha):

        sum_cells sum_edges sum_o p_o * nnz(o)  /  sum_cells sum_edges max_o numel(o)

    summed over every cell of the supernet (normal cells share one alpha, reduction cells the
    other), so each edge counts with the weights it really has. Parameter-free operations
    (none, skip, pooling) cost 0; a sparse operation costs its kept count. A linear function of
    the softmaxed alphas, so it adds a constant gradient direction to each edge's alpha."""

    def __init__(self, supernet: Supernet, operations: list[str], nodes: int):
        shape = (edge_count(nodes), len(operations))
        self.nonzero = {"normal": torch.zeros(shape), "reduce": torch.zeros(shape)}
        largest = 0
        for cell in supernet.cells:
            kind = "reduce" if cell.reduction else "normal"
            for e, mixed in enumerate(cell.edges):
                counts = [op_weight_counts(op) for op in mixed.ops]
                for slot, (nonzero, _) in zip(mixed.slots, counts):
                    self.nonzero[kind][e, slot] += nonzero
                largest += max((total for _, total in counts), default=0)
        self.normaliser = max(largest, 1)

    def to(self, device: torch.device) -> "DensityCost":
        self.nonzero = {kind: counts.to(device) for kind, counts in self.nonzero.items()}
        return self

    def __call__(self, architecture: Architecture) -> torch.Tensor:
        normal, reduce = architecture.weights()
        total = (normal * self.nonzero["normal"]).sum() + (reduce * self.nonzero["reduce"]).sum()
        return total / self.normaliser


# ---------------------------------------------------------------------------- discretisation
def discretise(weights: torch.Tensor, operations: list[str], nodes: int) -> list[list[tuple[str, int]]]:
    """DARTS's rule on one cell's softmaxed alphas [edges, operations]: per intermediate node,
    the EDGES_KEPT incoming edges with the largest strongest-non-`none` weight (ties: the lower
    input index), each with its strongest non-`none` operation (ties: the earlier operation)."""
    rows = weights.tolist()
    candidates = [i for i, name in enumerate(operations) if name != "none"]
    cell, edge = [], 0
    for node in range(nodes):
        incoming = rows[edge:edge + 2 + node]
        best = [max(candidates, key=lambda o, row=row: (row[o], -o)) for row in incoming]
        order = sorted(range(len(incoming)), key=lambda j: (-incoming[j][best[j]], j))
        cell.append([(operations[best[j]], j) for j in order[:EDGES_KEPT]])
        edge += 2 + node
    return cell


def derive_genotype(architecture: Architecture, operations: list[str], nodes: int) -> Genotype:
    normal, reduce = (w.detach() for w in architecture.weights())
    concat = list(range(2, 2 + nodes))  # DARTS: the cell outputs every intermediate node
    return Genotype(discretise(normal, operations, nodes), concat, discretise(reduce, operations, nodes), concat)


# ---------------------------------------------------------------------------- data
def split_training(size: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(weight indices, architecture indices): a seeded random partition of the training split's
    `size` examples; the architecture part holds round(val_fraction * size) of them."""
    arch = round(val_fraction * size)
    if not 1 <= arch <= size - 1:
        raise UserError(f"method.val_fraction={val_fraction}: leaves no examples for the weights or for the "
                        f"architecture in a training split of {size}")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[arch:]), sorted(order[:arch])


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """Data order is a function of (seed, epoch, stream), so a resumed epoch sees the same batches."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 2 + stream)


# ---------------------------------------------------------------------------- the search
@SEARCHES.register("dass")
class DassSearch(Search):
    name = "dass"
    Options = DassOptions

    def check(self) -> None:
        from sparsebench.methods import METHODS

        o = self.options
        self.require_positive("search_epochs", "channels", "cells", "nodes")
        if not o.arch_lr > 0:
            raise UserError(f"method.arch_lr={o.arch_lr}: expected a positive learning rate")
        for key in ("arch_weight_decay", "cost_weight", "grad_clip"):
            if getattr(o, key) < 0:
                raise UserError(f"method.{key}={getattr(o, key)}: expected a value >= 0")
        if not 0 < o.val_fraction < 1:
            raise UserError(f"method.val_fraction={o.val_fraction}: expected a fraction in (0, 1)")
        unknown = [name for name in o.operations if name not in OPERATIONS]
        if unknown:
            raise UserError(f"method.operations: unknown operation {unknown[0]!r}; known: {', '.join(OPERATIONS)}")
        if len(set(o.operations)) != len(o.operations):
            raise UserError(f"method.operations={o.operations}: an operation is listed twice")
        if not any(name != "none" for name in o.operations):
            raise UserError("method.operations: needs at least one operation besides 'none'")
        for method in o.retrain:
            if method not in METHODS:
                METHODS.get(method)  # the registry's one-line "unknown method" error
        warmup = self.cfg.schedule_options.warmup_epochs
        if warmup >= o.search_epochs:
            raise UserError(f"schedule.warmup_epochs={warmup}: the search's LR schedule spans "
                            f"method.search_epochs={o.search_epochs}; expected fewer warm-up epochs")

    def genotype_path(self) -> str:
        return str(results.run_dir(self.resolved) / GENOTYPE_FILE)

    def model_config(self) -> dict:
        """The `model` node that rebuilds the found network at the supernet's size."""
        o = self.options
        path = self.genotype_path()
        digest = dass_net.genotype_digest(path) if Path(path).is_file() else None  # known once searched
        return {"name": "dass", "genotype": path, "channels": o.channels, "cells": o.cells, "genotype_sha256": digest}

    def arms_after(self) -> list[dict]:
        return [arm_config(self.resolved, method, model=self.model_config()) for method in self.options.retrain]

    def search(self, job: SearchJob) -> dict:
        o, cfg, device = self.options, self.cfg, self.device
        seed = cfg.run.seed
        data = load_dataset(cfg.dataset, **cfg.dataset_options)
        weight_idx, arch_idx = split_training(len(data.train), o.val_fraction, seed)
        weight_set, arch_set = Subset(data.train, weight_idx), Subset(data.train, arch_idx)

        torch.manual_seed(seed)  # supernet weights, initial masks and alphas follow from the seed
        density = 1.0 - cfg.run.sparsity
        supernet = Supernet(data.input_shape, data.num_classes, o, density).to(device)
        architecture = Architecture(o.nodes, len(o.operations)).to(device)
        cost = DensityCost(supernet, o.operations, o.nodes).to(device)
        forward_flops = sum(layer_forward_flops(_WithArchitecture(supernet, architecture), data.input_shape).values())

        from sparsebench.train import build_optimizer  # late: it imports the whole trainer

        weight_optimizer = build_optimizer(cfg, supernet)
        arch_optimizer = torch.optim.Adam(architecture.parameters(), lr=o.arch_lr, betas=(0.5, 0.999),
                                          weight_decay=o.arch_weight_decay)
        steps_per_epoch = math.ceil(len(weight_set) / cfg.run.batch_size)
        total_steps = o.search_epochs * steps_per_epoch
        sched = cfg.schedule_options

        def lr(step: int) -> float:
            return lr_at(step, total_steps, cfg.optimizer_options.lr, cfg.schedule,
                         round(sched.warmup_epochs * steps_per_epoch),
                         [m * steps_per_epoch for m in sched.milestones], sched.gamma, sched.min_lr)

        # Examples through the supernet, in forward-pass units (RigL's FLOP convention: a weight
        # step costs 3 forwards; an architecture step 2, as it skips the weight gradients; an
        # evaluation 1), for the search's FLOP estimate.
        epoch, wall, forward_examples = 0, 0.0, 0
        state = job.load_state()
        if state is not None:
            supernet.load_state_dict(state["supernet"])
            architecture.load_state_dict(state["architecture"])
            weight_optimizer.load_state_dict(state["weight_optimizer"])
            arch_optimizer.load_state_dict(state["arch_optimizer"])
            torch.set_rng_state(state["rng"])
            epoch, wall = int(state["epoch"]), float(state["wall_time_s"])
            forward_examples = int(state["forward_examples"])
            job.truncate_metrics("epoch", epoch)
            job.log(f"dass: resuming at search epoch {epoch}")
        else:
            job.truncate_metrics("epoch", 0)  # lines of an attempt killed before its first checkpoint
        job.log(f"dass: {len(o.operations)} candidate operations on {edge_count(o.nodes)} edges per cell, "
                f"{o.cells} cells, {len(weight_idx)} examples train the weights and {len(arch_idx)} the "
                f"architecture, sparse operations at density {density:g}")

        started = time.perf_counter() - wall
        smoothing = cfg.run.label_smoothing
        while epoch < o.search_epochs:
            supernet.train()
            weight_batches = DataLoader(weight_set, batch_size=cfg.run.batch_size, shuffle=True,
                                        generator=_epoch_generator(seed, epoch, 0), num_workers=cfg.run.num_workers)
            arch_batches = _cycle(DataLoader(arch_set, batch_size=cfg.run.batch_size, shuffle=True,
                                             generator=_epoch_generator(seed, epoch, 1),
                                             num_workers=cfg.run.num_workers))
            train_sum = arch_sum = 0.0
            seen = 0
            for index, (x, y) in enumerate(weight_batches):
                step = epoch * steps_per_epoch + index
                # Architecture step (first order: the gradient at the current weights).
                xa, ya = (t.to(device) for t in next(arch_batches))
                arch_optimizer.zero_grad(set_to_none=True)
                arch_loss = F.cross_entropy(supernet(xa, architecture), ya, label_smoothing=smoothing)
                objective = arch_loss + o.cost_weight * cost(architecture) if o.cost_weight else arch_loss
                objective.backward(inputs=list(architecture.parameters()))  # no weight gradients needed
                arch_optimizer.step()
                arch_sum += arch_loss.item()
                forward_examples += 2 * len(ya)
                # Weight step on the weight part of the training split.
                x, y = x.to(device), y.to(device)
                for group in weight_optimizer.param_groups:
                    group["lr"] = lr(step)
                weight_optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(supernet(x, architecture), y, label_smoothing=smoothing)
                loss.backward(inputs=list(supernet.parameters()))
                if o.grad_clip:
                    nn.utils.clip_grad_norm_(supernet.parameters(), o.grad_clip)
                weight_optimizer.step()
                if o.mask_refresh is MaskRefresh.step:
                    for conv in sparse_convs(supernet):
                        conv.refresh()
                train_sum += loss.item() * len(y)
                seen += len(y)
                forward_examples += 3 * len(y)
            if o.mask_refresh is MaskRefresh.epoch:
                for conv in sparse_convs(supernet):
                    conv.refresh()
            epoch += 1
            val_loss, val_acc = _evaluate(supernet, architecture, arch_set, cfg.run.eval_batch_size, device)
            forward_examples += len(arch_set)
            wall = time.perf_counter() - started
            with torch.no_grad():
                expected = cost(architecture).item()
            genotype = derive_genotype(architecture, o.operations, o.nodes)
            job.append_metrics({
                "epoch": epoch, "train_loss": train_sum / seen, "arch_loss": arch_sum / steps_per_epoch,
                "val_loss": val_loss, "val_acc": val_acc, "expected_density": expected,
                "lr": lr(epoch * steps_per_epoch - 1), "steps": epoch * steps_per_epoch,
                "normal": genotype.to_json()["normal"], "reduce": genotype.to_json()["reduce"],  # alphas' cell now
                "wall_time_s": wall,
            })
            # Metrics first, then the checkpoint: a kill between the two redoes this epoch.
            job.save_state({
                "supernet": supernet.state_dict(), "architecture": architecture.state_dict(),
                "weight_optimizer": weight_optimizer.state_dict(), "arch_optimizer": arch_optimizer.state_dict(),
                "rng": torch.get_rng_state(), "epoch": epoch, "wall_time_s": wall,
                "forward_examples": forward_examples,
            })
            job.log(f"search epoch {epoch:>3}/{o.search_epochs}  train_loss {train_sum / seen:.4f}  "
                    f"val_loss {val_loss:.4f}  val_acc {val_acc:6.2f}  expected_density {expected:.4f}")

        genotype = derive_genotype(architecture, o.operations, o.nodes)
        genotype_json = {
            **genotype.to_json(),
            "supernet": {"channels": o.channels, "cells": o.cells, "nodes": o.nodes,
                         "stem_multiplier": dass_net.STEM_MULTIPLIER},
            "operations": list(o.operations), "sparsity": cfg.run.sparsity,
            "dataset": cfg.dataset, "seed": seed,
        }
        results.atomic_write_json(job.path / GENOTYPE_FILE, genotype_json)
        normal, reduce = (w.detach().cpu() for w in architecture.weights())
        metrics = job.metrics()
        last = metrics[-1] if metrics else {}
        return {
            "search_epochs": o.search_epochs, "weight_steps": total_steps, "arch_steps": total_steps,
            "weight_examples": len(weight_idx), "arch_examples": len(arch_idx),
            "search_flops": forward_examples * forward_flops,  # an estimate: dense conv/linear FLOPs only
            "supernet_forward_flops": forward_flops,
            "wall_time_s": wall, "val_acc": last.get("val_acc"), "val_loss": last.get("val_loss"),
            "expected_density": last.get("expected_density"),
            "genotype": genotype.to_json(), "genotype_file": GENOTYPE_FILE,
            "operations": list(o.operations),
            "alphas": {"normal": normal.tolist(), "reduce": reduce.tolist()},
        }


def _cycle(loader: DataLoader):
    """Architecture batches without end: each pass reshuffles from the loader's own generator,
    so the sequence depends only on the generator's seed."""
    while True:
        yield from loader


@torch.no_grad()
def _evaluate(supernet: Supernet, architecture: Architecture, dataset, batch_size: int, device) -> tuple[float, float]:
    """(mean loss, accuracy in %) of the supernet on the architecture part of the training split."""
    supernet.eval()
    loss_sum, hits, count = 0.0, 0, 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        logits = supernet(x, architecture)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        hits += (logits.argmax(1) == y).sum().item()
        count += len(y)
    supernet.train()
    return loss_sum / count, 100.0 * hits / count
