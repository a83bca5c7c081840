"""`sparsebench search method=evopress`: per-layer sparsity allocation by evolutionary search.

EvoPress (Sieberling, Kuznedelev, Kurtic, Alistarh; ICML 2025, arXiv 2410.14649, code
IST-DASLab/EvoPress), adapted from LLM layers to the prunable tensors of a trained network
(docs/search.md, EvoPress):

* Level database. Tensor l with N_l weights has levels k; level k keeps
  nnz_l(k) = nnz_l(0) - k * step weights, where nnz_l(0) is the uniform allocation's count and
  `step` (the paper's fixed weight difference) is the same for every tensor. Hence any levels
  with sum_l k_l = 0 keep exactly the uniform allocation's global count: the budget is exact.
  A level's mask is the one-shot magnitude mask of the trained dense weights (the paper prunes
  with SparseGPT; magnitude is our choice for conv nets, cheaper and data-free).
* Level-switch mutation: min(U{1..f}, U{1..f}) times, one tensor goes up a level (sparser) and
  another down one (denser), which keeps sum k = 0.
* (1 + lambda) selection in stages: `offspring` mutants of the parent are scored on a fresh
  random calibration batch of `stage_examples[0]` training examples, the best `survivors[0]`
  go on to a larger batch, and so on; the parent joins the last stage (elitism), whose single
  survivor is the next parent. Calibration examples come from the training split only.
* Fitness: KL divergence from the dense model's output distribution to the pruned model's
  (`fitness=kl`, the paper's default), or cross-entropy with the labels (`fitness=ce`).

Output: `densities.yaml` ({tensor: density}) for `distribution=custom distribution.file=...`
in any training method, and one metrics line per generation (the fitness trajectory).
"""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Subset

from sparsebench import results
from sparsebench.errors import UserError
from sparsebench.search.base import SEARCHES, Search, SearchJob, arm_config, meta_engine
from sparsebench.sparse.flops import layer_forward_flops
from sparsebench.sparse.masked import MaskedModel, target_nnz

DENSITIES_FILE = "densities.yaml"


class Norms(enum.Enum):
    batch = "batch"  # normalisation layers use the calibration batch's statistics
    running = "running"  # they keep the dense model's running statistics


class Fitness(enum.Enum):
    kl = "kl"  # KL(dense || pruned) of the output distributions
    ce = "ce"  # cross-entropy with the labels


@dataclass
class EvoPressOptions:
    generations: int = 100
    offspring: int = 16  # lambda: mutants of the parent per generation
    survivors: list[int] = field(default_factory=lambda: [8, 2, 1])  # kept after each selection stage
    stage_examples: list[int] = field(default_factory=lambda: [128, 512, 2048])  # calibration examples per stage
    step: int | None = None  # weights per level, shared by every tensor; null: auto (see level_step)
    levels: int = 8  # auto step: the smallest sparse tensor gets about this many levels each way
    max_level: int | None = None  # bound on |k| per tensor; null: only the tensor's size bounds it
    max_flips: int = 3  # level switches per mutation: min(U{1..f}, U{1..f})
    fitness: Fitness = Fitness.kl
    # How BatchNorm layers see a pruned candidate. Pruning shifts every layer's activation
    # statistics, and the dense running statistics then mis-normalise it (at 90 % one-shot, a
    # cnn1d_bn scored ~3.7 nats of KL whatever the allocation); the batch's own statistics are
    # the usual one-shot recalibration. Our choice: EvoPress's LLMs have no BatchNorm.
    norms: Norms = Norms.batch
    checkpoint_every: int = 10  # generations between checkpoints


@dataclass
class LevelDatabase:
    """Per tensor: numel, the uniform count nnz(0), and the feasible level range."""

    names: list[str]
    numel: list[int]
    base: list[int]
    step: int
    low: list[int]  # most negative level (densest)
    high: list[int]  # most positive level (sparsest)

    def nnz(self, levels: list[int]) -> list[int]:
        return [b - k * self.step for b, k in zip(self.base, levels)]

    def densities(self, levels: list[int]) -> dict[str, float]:
        return {n: c / m for n, c, m in zip(self.names, self.nnz(levels), self.numel)}


def level_step(numel: list[int], sparsity: float, levels: int) -> int:
    """Auto step: half of the smaller of the kept or pruned share of the smallest tensor,
    spread over `levels` levels (EvoPress's default rule, with its hidden size replaced by the
    smallest tensor), at least one weight."""
    smallest = min(numel)
    return max(1, math.floor(0.5 * min(sparsity, 1.0 - sparsity) * smallest / levels))


def level_database(engine: MaskedModel, sparsity: float, o: EvoPressOptions) -> LevelDatabase:
    names = engine.names
    numel = [engine.tensors[n].param.numel() for n in names]
    base = [target_nnz(m, 1.0 - sparsity) for m in numel]
    step = o.step if o.step is not None else level_step(numel, sparsity, o.levels)
    low = [-((m - b) // step) for m, b in zip(numel, base)]  # denser, up to fully dense
    high = [(b - 1) // step for b in base]  # sparser, keeping at least one weight
    if o.max_level is not None:
        low = [max(x, -o.max_level) for x in low]
        high = [min(x, o.max_level) for x in high]
    movable_up = sum(h > 0 for h in high)
    movable_down = sum(x < 0 for x in low)
    pairs = [(a, b) for a in range(len(names)) for b in range(len(names)) if a != b and high[a] > 0 and low[b] < 0]
    if not pairs:
        raise UserError(
            f"sparsity={sparsity:g}: EvoPress's levels (step {step} weights) cannot reach any allocation but the "
            f"uniform one ({movable_up} tensor(s) can get sparser, {movable_down} denser, {len(names)} sparse "
            "tensor(s)); lower method.step, raise method.max_level, or make more layers sparse"
        )
    return LevelDatabase(names, numel, base, step, low, high)


@SEARCHES.register("evopress")
class EvoPress(Search):
    name = "evopress"
    Options = EvoPressOptions

    def check(self) -> None:
        o = self.options
        s = self.cfg.run.sparsity
        if not 0.0 < s < 1.0:
            raise UserError(f"sparsity={s:g}: EvoPress allocates a sparsity in (0, 1) over layers")
        self.require_positive("generations", "offspring", "max_flips", "checkpoint_every", "levels")
        if o.step is not None and o.step < 1:
            raise UserError(f"method.step={o.step}: expected a positive number of weights per level (or null: auto)")
        if o.max_level is not None and o.max_level < 1:
            raise UserError(f"method.max_level={o.max_level}: expected a positive integer (or null: no bound)")
        if not o.survivors or len(o.survivors) != len(o.stage_examples):
            raise UserError(f"method.survivors={o.survivors} and method.stage_examples={o.stage_examples}: "
                            "expected one survivor count per selection stage")
        if o.survivors[-1] != 1 or any(a < b for a, b in zip(o.survivors, o.survivors[1:])) or min(o.survivors) < 1:
            raise UserError(f"method.survivors={o.survivors}: expected non-increasing positive counts ending in 1")
        if o.survivors[0] > o.offspring:
            raise UserError(f"method.survivors={o.survivors}: the first stage cannot keep more than "
                            f"method.offspring={o.offspring} candidates")
        if min(o.stage_examples) < 1:
            raise UserError(f"method.stage_examples={o.stage_examples}: expected positive example counts")
        level_database(meta_engine(self.cfg), s, o)  # levels the sparsity cannot reach: one line, now

    def arms_before(self) -> list[dict]:
        return [arm_config(self.resolved, "dense")]  # the trained model the levels prune

    # ---------------------------------------------------------------- the search
    def search(self, job: SearchJob) -> dict:
        from sparsebench.config import validate
        from sparsebench.train import build_run

        o = self.options
        dense_arm = self.arms_before()[0]
        dense_dir = results.run_dir(dense_arm)
        run = build_run(validate(dense_arm), with_optimizer=False)  # the dense run's model, data and engine
        if len(run.data.train) < max(o.stage_examples):
            raise UserError(f"method.stage_examples={o.stage_examples}: the training split has only "
                            f"{len(run.data.train)} examples")
        model = run.model
        state_dict = torch.load(dense_dir / results.MODEL_FILE, map_location=run.device, weights_only=True)
        model.load_state_dict(state_dict)
        model.eval()
        engine = MaskedModel(model, *self._dense_layers(), structure=run.engine.structure)
        db = level_database(engine, self.cfg.run.sparsity, o)
        scorer = FitnessScorer(model, engine, db, run.data.train, run.device, o.fitness, self.cfg.run.eval_batch_size,
                               o.norms)

        generator = torch.Generator().manual_seed(self.cfg.run.seed)
        state = job.load_state()
        if state is None:
            parent, generation, wall = [0] * len(db.names), 0, 0.0
            job.truncate_metrics("generation", -1)
            scorer.draw_batch(o.stage_examples[-1], generator)
            fitness = scorer.fitness([parent])[0]
            job.append_metrics({"generation": 0, "fitness": fitness, "levels": parent,
                                "forward_examples": scorer.forward_examples, "wall_time_s": 0.0})
        else:
            parent, generation, wall = list(state["parent"]), int(state["generation"]), float(state["wall_time_s"])
            generator.set_state(state["generator"])
            scorer.forward_examples = int(state["forward_examples"])
            job.truncate_metrics("generation", generation)
            job.log(f"evopress: resuming at generation {generation}")
        job.log(f"evopress: {len(db.names)} tensors, step {db.step} weights per level, "
                f"{o.generations} generations of {o.offspring} offspring")
        started = time.perf_counter() - wall
        while generation < o.generations:
            parent, fitness = self.generation(parent, db, scorer, generator)
            generation += 1
            wall = time.perf_counter() - started
            job.append_metrics({"generation": generation, "fitness": fitness, "levels": parent,
                                "forward_examples": scorer.forward_examples, "wall_time_s": wall})
            if generation % o.checkpoint_every == 0 or generation == o.generations:
                job.save_state({"parent": parent, "generation": generation, "generator": generator.get_state(),
                                "wall_time_s": wall, "forward_examples": scorer.forward_examples})
            if generation % max(1, o.generations // 10) == 0:
                job.log(f"generation {generation:>4}/{o.generations}  fitness {fitness:.5f}")

        # Uniform against found on one and the same fresh batch of the largest stage's size: the
        # trajectory's values come from a different batch each generation, so they are noisy.
        scorer.draw_batch(o.stage_examples[-1], generator)
        fitness_uniform, fitness_found = scorer.fitness([[0] * len(db.names), parent])
        densities = db.densities(parent)
        header = (f"# EvoPress per-tensor densities at global sparsity {self.cfg.run.sparsity:g}, searched on the "
                  f"trained dense run {dense_dir}.\n# Train with: distribution=custom \"distribution.file='<this file>'\" "
                  "(quoted: the path holds '=')\n")
        results.atomic_write_text(job.path / DENSITIES_FILE, header + yaml.safe_dump(densities, sort_keys=False))
        trajectory = [r["fitness"] for r in job.metrics()]
        dense_forward = sum(layer_forward_flops(model, run.data.input_shape).values())
        return {
            "generations": o.generations, "offspring": o.offspring, "survivors": o.survivors,
            "stage_examples": o.stage_examples, "step": db.step, "fitness": o.fitness.value,
            "fitness_uniform": fitness_uniform, "fitness_final": fitness_found,
            "trajectory_first": trajectory[0], "trajectory_last": trajectory[-1],
            "levels": parent, "nnz": dict(zip(db.names, db.nnz(parent))), "densities": densities,
            "dense_run": str(dense_dir), "forward_examples": scorer.forward_examples,
            "search_flops": scorer.forward_examples * dense_forward, "wall_time_s": wall,
        }

    def _dense_layers(self) -> tuple[bool, bool, list[str]]:
        d = self.cfg.distribution_options
        return d.dense_first, d.dense_last, d.dense_layers

    def generation(self, parent: list[int], db: LevelDatabase, scorer: "FitnessScorer",
                   generator: torch.Generator) -> tuple[list[int], float]:
        """One (1 + lambda) generation; returns the new parent and its fitness on the last stage."""
        o = self.options
        candidates = unique_offspring(parent, db, o.offspring, o.max_flips, generator)
        for stage, (keep, examples) in enumerate(zip(o.survivors, o.stage_examples)):
            if stage == len(o.survivors) - 1:
                candidates = [*candidates, parent]  # elitism: the parent competes in the last stage
            scorer.draw_batch(examples, generator)
            scores = scorer.fitness(candidates)
            order = sorted(range(len(candidates)), key=lambda i: (scores[i], i))[:keep]
            candidates, best = [candidates[i] for i in order], scores[order[0]]
        return candidates[0], best


def mutate(levels: list[int], db: LevelDatabase, max_flips: int, generator: torch.Generator) -> list[int]:
    """Level-switch mutation: each switch moves one tensor a level sparser and another a level
    denser, so sum(levels), and with it the global non-zero count, never changes."""
    child = list(levels)
    draws = torch.randint(1, max_flips + 1, (2,), generator=generator)
    for _ in range(int(draws.min())):
        down = [i for i in range(len(child)) if child[i] > db.low[i]]
        up = [i for i in range(len(child)) if child[i] < db.high[i] and any(j != i for j in down)]
        if not up:
            break
        a = up[int(torch.randint(len(up), (1,), generator=generator))]
        down = [i for i in down if i != a]
        b = down[int(torch.randint(len(down), (1,), generator=generator))]
        child[a] += 1
        child[b] -= 1
    return child


def unique_offspring(parent: list[int], db: LevelDatabase, count: int, max_flips: int,
                     generator: torch.Generator) -> list[list[int]]:
    """`count` distinct mutants that differ from the parent (fewer if the level space is small)."""
    seen, children = {tuple(parent)}, []
    for _ in range(50 * count):
        child = mutate(parent, db, max_flips, generator)
        if tuple(child) not in seen:
            seen.add(tuple(child))
            children.append(child)
            if len(children) == count:
                break
    return children


class FitnessScorer:
    """Scores level configurations on calibration batches drawn from the training split."""

    def __init__(self, model, engine: MaskedModel, db: LevelDatabase, train_split, device: torch.device,
                 fitness: Fitness, batch_size: int, norms: Norms):
        self.model, self.db, self.train_split, self.device = model, db, train_split, device
        self.fitness_kind, self.batch_size = fitness, batch_size
        self.norm_layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self.batch_norms = norms is Norms.batch
        self.params = [engine.tensors[n].param for n in db.names]
        self.dense = [p.detach().clone() for p in self.params]
        # Magnitude order of each tensor, largest first: a level's mask is a prefix of it.
        self.order = [w.abs().flatten().argsort(descending=True, stable=True) for w in self.dense]
        self.forward_examples = 0
        self.indices: torch.Tensor | None = None  # the training-split indices of the current batch

    def draw_batch(self, examples: int, generator: torch.Generator) -> None:
        """A fresh calibration batch: `examples` distinct training-split indices."""
        indices = torch.randperm(len(self.train_split), generator=generator)[:examples]
        self.forward_examples += examples  # the dense model's reference outputs
        self.indices = indices
        loader = DataLoader(Subset(self.train_split, indices.tolist()), batch_size=self.batch_size)
        self.batches = [(x.to(self.device), y.to(self.device)) for x, y in loader]
        with torch.no_grad():
            self._set_levels(None)
            self.dense_log_probs = [F.log_softmax(self.model(x).float(), 1) for x, _ in self.batches]

    @torch.no_grad()
    def _set_levels(self, levels: list[int] | None) -> None:
        for i, param in enumerate(self.params):
            if levels is None:
                param.copy_(self.dense[i])
                continue
            keep = self.db.nnz(levels)[i]
            mask = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
            mask[self.order[i][:keep]] = True
            param.copy_(self.dense[i] * mask.view_as(param))

    def _pruned_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Forward of a candidate: BatchNorm on the batch's statistics (norms=batch) without
        touching the dense running statistics (momentum 0 keeps them), or on the running ones."""
        if not self.batch_norms:
            return self.model(x)
        saved = [m.momentum for m in self.norm_layers]
        for m in self.norm_layers:
            m.train()
            m.momentum = 0.0
        try:
            return self.model(x)
        finally:
            for m, momentum in zip(self.norm_layers, saved):
                m.eval()
                m.momentum = momentum

    @torch.no_grad()
    def fitness(self, candidates: list[list[int]]) -> list[float]:
        scores = []
        for levels in candidates:
            self._set_levels(levels)
            total, count = 0.0, 0
            for (x, y), dense_lp in zip(self.batches, self.dense_log_probs):
                log_probs = F.log_softmax(self._pruned_logits(x).float(), 1)
                if self.fitness_kind is Fitness.kl:
                    total += F.kl_div(log_probs, dense_lp, log_target=True, reduction="sum").item()
                else:
                    total += F.nll_loss(log_probs, y, reduction="sum").item()
                count += len(y)
            self.forward_examples += count
            scores.append(total / count)
        self._set_levels(None)
        return scores
