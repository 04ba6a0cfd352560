"""Train one MLSAE, or a sweep of them from one transformer pass: ``python -m mlsae.train --help``.

Per optimizer step: ``tokens_per_step`` tokens are run through the transformer in micro-batches
of ``batch_size`` sequences, or, when ``batch_size`` holds more than a step, one forward pass reads
the sequences of several steps (stopping after the deepest layer needed, no LM head); the residual
vectors of every layer (less the positions that ``mlsae.positions`` leaves out) train every MLSAE
of the sweep, each with its own Adam (and the same learning-rate schedule). Checkpoints hold
everything needed for an exact resume (weights, optimizer, dead-latent counters, data position,
RNG), are written atomically and in safetensors only.
With ``torchrun`` each rank reads its own shard of each global batch; DDP averages the gradients.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from simple_parsing import ArgumentParser
from simple_parsing import field as flag
from tqdm.auto import tqdm

from mlsae import native
from mlsae.data import ChunkLoader, DataOptions, load_chunks
from mlsae.fetch import DEFAULT_MODEL
from mlsae.formats import mlsae_name
from mlsae.lens import TunedLens
from mlsae.model import MLSAE, SAEConfig, SAEOptions
from mlsae.positions import read_residuals
from mlsae.precision import autocast as precision_autocast
from mlsae.precision import resolve as resolve_precision
from mlsae.transformer import Transformer, load_transformer
from mlsae.utils import MLSAEError, atomic_write_text, check_out_dir, run_cli


@dataclass
class TrainConfig(SAEOptions, DataOptions):
    """Options of ``python -m mlsae.train`` (lists of expansion factors and k train a sweep): the
    SAE's options (``SAEOptions``), the data options (``DataOptions``, with training's defaults
    below) and these.

    The defaults are the embedded default profile (SmolLM2 + Brown, minutes on a 2-core CPU);
    ``profiles/*.yaml`` override them (``--config_path``), e.g. the paper's setup.
    """

    model_name: str = DEFAULT_MODEL
    """Transformer: hub id, local folder or .gguf file."""
    expansion_factor: list[int] = flag(default_factory=lambda: [8])
    """Latents per input dimension; several values train a sweep."""
    k: list[int] = flag(default_factory=lambda: [SAEConfig.k], alias="-k")
    """Latents kept per vector (TopK); several values train a sweep."""
    lr: float = 2e-3
    """Peak Adam learning rate (betas (0.9, 0.999), eps 6.25e-10; the paper used 1e-4 for 1B tokens)."""
    warmup_steps: int = 64
    """Steps of linear learning-rate warm-up from 0 to lr."""
    lr_schedule: str = flag(default="linear", choices=["constant", "linear", "cosine"])
    """After the warm-up: constant, or a linear or cosine decay to 0 at the last step."""
    split: str = "train"
    """Split of the data."""
    batch_size: int = 4
    """Sequences per transformer forward: a micro-batch of a step, or the sequences of several steps,
    which they take in turn (the same data in the same order; on a CPU larger products run faster:
    in fp32 on a 2-core Zen 3 EPYC SmolLM2 reads 4 sequences 1.2x faster per token than 1)."""
    tokens_per_step: int = 256
    """Tokens per optimizer step (gradient accumulation over micro-batches)."""
    max_tokens: int = 393_216
    """Training tokens in total (the positions that the position rule leaves out are then ignored)."""
    max_minutes: float | None = None
    """Wall-clock limit of this call, loading included: at the end of the warm-up training times its
    steps and, where max_tokens would not fit, plans fewer (the schedule then decays to the earlier
    end). The plan is saved with the checkpoint; resuming keeps it."""
    reserve_steps: int = 0
    """With --max_minutes: time to leave over for work after training (e.g. the book's later chapters),
    as this many training steps at the pace measured."""
    layers: list[int] | None = flag(default=None, nargs="*")
    """Transformer layers to read (default: all); one layer trains a per-layer SAE."""
    tuned_lens: str | None = None
    """A tuned lens (its folder or lens.safetensors, from python -m mlsae.lens): train on residuals
    translated into the final layer's basis (the paper's -lens MLSAEs); the lens is saved with each MLSAE."""
    lens_copy: bool = False
    """With --tuned_lens: train the sweep on the raw residuals, and beside it, in the same pass, one MLSAE of
    the baselines' size (the sweep's largest, or --baseline_expansion_factor/--baseline_k) on the translated
    ones (named ...-lens): the paper's two variants on the same tokens."""
    per_layer: bool = False
    """Train one single-layer SAE per layer of --layers (of every size of the sweep) from the same
    transformer pass, instead of one MLSAE over them."""
    baselines: list[int] | None = flag(default=None, nargs="*")
    """Also train a single-layer SAE at each of these layers in the same transformer pass as the MLSAEs:
    the paper's per-layer baselines, on the same tokens, at the cost of their SAE steps only."""
    baseline_expansion_factor: int | None = None
    """Expansion factor of the --baselines (default: the sweep's largest)."""
    baseline_k: int | None = None
    """k of the --baselines (default: the sweep's largest)."""
    seed: int = 42
    """Seed of the initialisation and the data order."""
    out_dir: str = "runs/default"
    """Where checkpoints, logs and the trained MLSAEs go."""
    log_every: int = 16
    """Steps between metrics lines in metrics.jsonl."""
    checkpoint_every: int = 128
    """Steps between checkpoints."""
    resume: bool = False
    """Continue from the checkpoint in out_dir (which must come from the same options)."""
    wandb: bool = False
    """Also log to Weights & Biases (set WANDB_MODE=offline to log without a network)."""
    malloc_tuning: bool = True
    """Keep freed memory in glibc's heap instead of page-faulting it back every step (process-wide:
    the command line applies it before training; a library call of train() leaves the process alone)."""

    def __post_init__(self) -> None:
        DataOptions.__post_init__(self)
        SAEOptions.__post_init__(self)
        for name in ("tokens_per_step", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise MLSAEError(f"--{name} must be positive, got {getattr(self, name)}")
        self.step_sequences(1)
        if min(self.expansion_factor) < 1 or min(self.k) < 1:
            raise MLSAEError("--expansion_factor and -k must be positive")
        if self.warmup_steps < 0:
            raise MLSAEError(f"--warmup_steps must be 0 or more, got {self.warmup_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise MLSAEError(f"--max_minutes must be positive, got {self.max_minutes}")
        if self.lens_copy and (not self.tuned_lens or self.per_layer):
            raise MLSAEError("--lens_copy adds a tuned-lens MLSAE beside the sweep: it needs --tuned_lens, and not "
                             "--per_layer")
        if self.per_layer and not self.layers:
            raise MLSAEError("--per_layer needs --layers: the layers to train a single-layer SAE at")
        if self.baselines and self.per_layer:
            raise MLSAEError("--baselines adds per-layer SAEs to an MLSAE sweep; --per_layer trains per-layer SAEs only")
        if self.baselines and self.layers and not set(self.baselines) <= set(self.layers):
            raise MLSAEError(f"--baselines {self.baselines} must be among the layers read (--layers {self.layers})")
        if (self.per_layer or self.baselines) and self.max_norm_ratio is not None:
            # the norm rule looks at every layer read: in one pass, a layer's SAE would lose positions
            # that are outliers at another layer
            flag_name = "--per_layer" if self.per_layer else "--baselines"
            raise MLSAEError(f"{flag_name} cannot use --max_norm_ratio; train each layer on its own (--layers L)")

    @property
    def steps(self) -> int:
        return self.max_tokens // self.tokens_per_step

    def step_sequences(self, world: int) -> int:
        """Sequences per step on each of ``world`` processes; checks that a forward pass of
        ``batch_size`` sequences is a micro-batch of a step or spans whole steps, and that checkpoints
        fall between forward passes."""
        sequences, left = divmod(self.tokens_per_step, self.max_length * world)
        processes = f" x {world} processes" if world > 1 else ""
        if left or not sequences:
            raise MLSAEError(f"tokens_per_step ({self.tokens_per_step}) must be a multiple of max_length "
                             f"({self.max_length}){processes}")
        if sequences % self.batch_size and self.batch_size % sequences:
            raise MLSAEError(f"batch_size ({self.batch_size}) must divide the {sequences} sequences of a step"
                             f"{' on each process' if world > 1 else ''}, or be a multiple of them")
        spanned = self.steps_per_pass(sequences)
        if self.checkpoint_every % spanned:
            raise MLSAEError(f"--checkpoint_every ({self.checkpoint_every}) must be a multiple of the {spanned} steps "
                             f"that one forward pass of batch_size sequences spans")
        return sequences

    def steps_per_pass(self, step_sequences: int) -> int:
        """Optimizer steps one transformer forward of ``batch_size`` sequences spans (1 for a micro-batch)."""
        return max(1, self.batch_size // step_sequences)

    def lr_at(self, step: int, steps: int | None = None) -> float:
        """The learning rate of optimizer step ``step`` (0-based) of a run of ``steps`` (default
        ``self.steps``): warm-up, then the schedule."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / (self.warmup_steps + 1)
        if self.lr_schedule == "constant":
            return self.lr
        steps = self.steps if steps is None else steps
        progress = (step - self.warmup_steps) / max(steps - self.warmup_steps, 1)
        if self.lr_schedule == "linear":
            return self.lr * (1 - progress)
        return self.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def sweep(self) -> list[tuple[int, int]]:
        return list(itertools.product(self.expansion_factor, self.k))

    def members(self) -> list[Member]:
        """Every SAE trained, in order: the sweep (every layer read), with ``per_layer`` one SAE per layer
        for each of its sizes; the ``lens_copy``; then the ``baselines``, one per layer."""
        if self.per_layer:
            return [Member(self.baseline_name(ef, k, layer), ef, k, [layer], self.uses_lens)
                    for ef, k in self.sweep() for layer in self.layers]
        ef, k = self.baseline_size
        sweep = [Member(mlsae_name(self.model_name, ef_, k_, lens=self.uses_lens), ef_, k_, None, self.uses_lens)
                 for ef_, k_ in self.sweep()]
        if self.lens_copy:
            sweep.append(Member(mlsae_name(self.model_name, ef, k, lens=True), ef, k, None, True))
        return sweep + [Member(self.baseline_name(ef, k, layer), ef, k, [layer], self.uses_lens) for layer in self.baselines or []]

    @property
    def uses_lens(self) -> bool:
        """Whether the sweep itself trains on translated residuals (``tuned_lens`` without ``lens_copy``)."""
        return bool(self.tuned_lens) and not self.lens_copy

    @property
    def baseline_size(self) -> tuple[int, int]:
        """(expansion factor, k) of the ``baselines`` and the ``lens_copy``."""
        return self.baseline_expansion_factor or max(self.expansion_factor), self.baseline_k or max(self.k)

    def baseline_name(self, ef: int, k: int, layer: int) -> str:
        return f"{mlsae_name(self.model_name, ef, k)}-layer-{layer}"


class Member(NamedTuple):
    """One SAE that ``mlsae.train`` trains: its folder name, size, layers (None: every layer read) and
    whether it reads tuned-lens-translated residuals."""

    name: str
    expansion_factor: int
    k: int
    layers: list[int] | None
    lens: bool


# Options that may differ between a run and its resumption.
# (The time budget decides the run only through its plan, which the checkpoint records.)
RESUMABLE = {"resume", "wandb", "log_every", "checkpoint_every", "device", "out_dir", "malloc_tuning", "max_minutes",
             "reserve_steps"}


@dataclass
class SweepSAE:
    """One MLSAE of the sweep with its optimizer and output folder."""

    name: str
    sae: MLSAE
    optimizer: torch.optim.Adam
    out: Path
    rows: slice  # which of the layers read it trains on: all, or one for a per-layer SAE
    objective: nn.Module = field(init=False)  # the loss, wrapped in DistributedDataParallel under torchrun

    def __post_init__(self) -> None:
        self.objective = Objective(self.sae)
        if dist.is_initialized():
            # DDP averages gradients over ranks; the dead-latent counters are reduced by hand.
            self.objective = DistributedDataParallel(self.objective, broadcast_buffers=False)

    def loss(self, x: torch.Tensor, sync: bool):
        """The MLSAE's loss; under DDP, gradients are all-reduced only when ``sync``."""
        no_sync = getattr(self.objective, "no_sync", contextlib.nullcontext)
        with contextlib.nullcontext() if sync else no_sync():
            return self.objective(x)

    def log(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


class Objective(nn.Module):
    """``MLSAE.loss`` as a module's forward, which is what DistributedDataParallel wraps."""

    def __init__(self, sae: MLSAE):
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor):
        return self.sae.loss(x)


# ----------------------------------------------------------------------------- set-up


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MLSAEError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts torch.distributed under torchrun (gloo on CPU, NCCL on GPU)."""
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def make_sweep(cfg: TrainConfig, d_model: int, layers: list[int], device: torch.device, out: Path) -> list[SweepSAE]:
    """Every SAE of ``cfg`` (``TrainConfig.members``), initialised, with its optimizer; ``layers``:
    the transformer layers each pass reads."""
    lens = None
    if cfg.tuned_lens:
        lens = TunedLens.load(cfg.tuned_lens)
        if lens.model_name and lens.model_name != cfg.model_name:
            raise MLSAEError(f"--tuned_lens {cfg.tuned_lens} was fitted to {lens.model_name}, not {cfg.model_name}")
    runs = []
    for name, ef, k, group, uses_lens in cfg.members():
        rows = slice(None) if group is None else slice(layers.index(group[0]), layers.index(group[0]) + 1)
        group = group or layers
        torch.manual_seed(cfg.seed)  # every run of a sweep starts as its solo run would
        sae_cfg = SAEConfig(n_inputs=d_model, n_latents=d_model * ef, k=k, n_layers=len(group), layers=group,
                            model_name=cfg.model_name, tuned_lens=uses_lens, **cfg.sae_options())
        sae = MLSAE(sae_cfg).to(device).train()
        if uses_lens:
            sae.set_lens(lens)
        # fused: one pass over each parameter instead of ~10 (5x faster on a CPU; one kernel on a GPU)
        optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, eps=6.25e-10, fused=True)
        runs.append(SweepSAE(name, sae, optimizer, out / name, rows))
    return runs


def resolve_layers(cfg: TrainConfig, n_layers: int) -> list[int]:
    layers = list(range(n_layers)) if not cfg.layers else list(cfg.layers)
    for name, values in (("--layers", layers), ("--baselines", cfg.baselines or [])):
        bad = [i for i in values if not 0 <= i < n_layers]
        if bad:
            raise MLSAEError(f"{name} {bad} out of range: the model has layers 0..{n_layers - 1}")
    if len(set(layers)) != len(layers):
        raise MLSAEError(f"--layers has duplicates: {layers}")
    return layers


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """How many steps the run trains: ``cfg.steps``, or fewer where ``--max_minutes`` would not hold
    them (``budget``: what the choice was made from; None until it is made, or without a limit)."""

    steps: int
    budget: dict | None = None


class Pace:
    """Fits a run into ``--max_minutes``: times the steps from the end of this call's first forward
    pass (which pays one-off costs) to the end of the warm-up, where the schedule starts to depend on
    the last step; then plans that last step."""

    SLACK = 0.9  # later steps run slower than the warm-up's (AuxK starts on the first dead latents)

    def __init__(self, cfg: TrainConfig, started: float, first_step: int, spanned: int):
        self.cfg, self.spanned = cfg, spanned
        self.deadline = started + 60 * cfg.max_minutes
        self.begin = first_step + spanned
        at_least = max(self.begin + max(8, 2 * spanned), cfg.warmup_steps)
        self.decide = first_step + -(-(at_least - first_step) // spanned) * spanned  # at a forward pass
        self.clock = 0.0

    def tick(self, step: int) -> None:
        """Called before each step: starts the clock at ``begin``."""
        if step == self.begin:
            self.clock = time.perf_counter()

    def plan(self, step: int, steps: int) -> Plan:
        """The plan from here (at step ``decide``): the most steps, at most ``steps``, that end
        within the limit and leave ``reserve_steps`` of time over."""
        cfg, now = self.cfg, time.perf_counter()
        step_s = (now - self.clock) / (step - self.begin)
        fit = int(self.SLACK * (self.deadline - now) / step_s) - cfg.reserve_steps
        # at least one more forward pass, whose last step saves the checkpoint that records the plan
        planned = min(steps, step + max(fit // self.spanned, 1) * self.spanned)
        if dist.is_initialized():  # every rank must stop at the same step
            planned = int(all_reduce(torch.tensor(planned), dist.ReduceOp.MIN))
        budget = {"max_minutes": cfg.max_minutes, "at_step": step, "seconds_left": round(self.deadline - now, 1),
                  "seconds_per_step": round(step_s, 4), "reserve_seconds": round(cfg.reserve_steps * step_s, 1),
                  "recipe_steps": cfg.steps}
        return Plan(planned, budget)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(out: Path, cfg: TrainConfig, runs: list[SweepSAE], step: int, loader: ChunkLoader, tokens: int,
                    plan: Plan) -> None:
    """Write every run's state into ``out/checkpoint`` as one atomic swap of a folder."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for run in runs:
        run.sae.save_pretrained(tmp / run.name)
        save_file(optimizer_tensors(run.optimizer, run.sae), tmp / run.name / "optimizer.safetensors")
    save_file({"torch_rng": torch.get_rng_state()}, tmp / "rng.safetensors")
    state = {"step": step, "tokens": tokens, "steps": plan.steps, "budget": plan.budget, "loader": loader.state_dict(),
             "config": asdict(cfg)}
    (tmp / "trainer.json").write_text(json.dumps(state, indent=2))
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def optimizer_tensors(optimizer: torch.optim.Adam, sae: MLSAE) -> dict[str, torch.Tensor]:
    """Adam's state as named tensors (safetensors, never pickle)."""
    names = {id(p): n for n, p in sae.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                out[f"{names[id(p)]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return out


def load_optimizer(optimizer: torch.optim.Adam, sae: MLSAE, tensors: dict[str, torch.Tensor]) -> None:
    for name, p in sae.named_parameters():
        state = {key.split(".", 1)[1]: t.to(p.device) for key, t in tensors.items() if key.split(".", 1)[0] == name}
        if state:  # fused Adam keeps its step count beside the parameter, as loaded
            optimizer.state[p] = state


def load_checkpoint(out: Path, cfg: TrainConfig, runs: list[SweepSAE], loader: ChunkLoader) -> tuple[int, int, Plan]:
    """Restore runs and data position from ``out/checkpoint``; returns (step, tokens, plan)."""
    ckpt = out / "checkpoint"
    if not (ckpt / "trainer.json").is_file():
        old = out / "checkpoint.old"  # killed between the two renames of save_checkpoint
        if (old / "trainer.json").is_file():
            old.rename(ckpt)
        else:
            raise MLSAEError(f"--resume: no checkpoint in {out} (run without --resume to start afresh)")
    try:
        state = json.loads((ckpt / "trainer.json").read_text())
        saved = {k: v for k, v in state["config"].items() if k not in RESUMABLE}
    except (ValueError, KeyError, AttributeError) as e:
        raise MLSAEError(f"--resume: {ckpt / 'trainer.json'} is damaged ({e}); remove {ckpt} to start afresh") from e
    current = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE}
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise MLSAEError(f"--resume: the checkpoint in {out} was made with other options ({details})")
    plan = Plan(state.get("steps", cfg.steps), state.get("budget"))
    if plan.steps < cfg.steps and cfg.max_minutes is None:
        raise MLSAEError(f"--resume: the checkpoint in {out} plans {plan.steps} of {cfg.steps} steps, to fit --max_minutes "
                         f"{plan.budget['max_minutes']:g}: pass --max_minutes to finish it so, or start afresh")
    def read(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
        try:
            return load_file(path, device=device)
        except Exception as e:  # truncated or missing: safetensors' and the OS's own error types
            raise MLSAEError(f"--resume: {path} is damaged ({e}); remove {ckpt} to start afresh") from e

    tensors = {run.name: (read(ckpt / run.name / "model.safetensors", str(run.sae.W_enc.device)),
                          read(ckpt / run.name / "optimizer.safetensors")) for run in runs}
    rng = read(ckpt / "rng.safetensors")["torch_rng"]
    for run in runs:  # every file read before anything is changed
        weights, optimizer = tensors[run.name]
        run.sae.load_state_dict(weights)
        load_optimizer(run.optimizer, run.sae, optimizer)
        truncate_log(run.out / "metrics.jsonl", state["step"])
    torch.set_rng_state(rng)
    loader.load_state_dict(state["loader"])
    return state["step"], state["tokens"], plan


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint, so a resumed log matches an uninterrupted one."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in lines))


# ----------------------------------------------------------------------------- the step


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place sum (or ``op``) over ranks; CPU tensors take a round trip to the GPU under NCCL."""
    if not dist.is_initialized():
        return t
    if dist.get_backend() == "nccl" and t.device.type == "cpu":
        t.copy_(all_reduce(t.cuda(), op).cpu())
        return t
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def step_inputs(transformer: Transformer, batches: Iterator[torch.Tensor], cfg: TrainConfig, layers: list[int],
                autocast: contextlib.AbstractContextManager, step_sequences: int, device: torch.device,
                ) -> Iterator[list[torch.Tensor]]:
    """Each step's input on this rank: the kept residuals ``[L, N, d]`` of each of its micro-batches.

    ``batches`` yields micro-batches (``micro_batch`` sequences); one forward pass reads
    ``batch_size`` sequences: one micro-batch, or the micro-batches of several steps, which it
    hands out step by step (the data and its order do not depend on batch_size). The next pass
    runs only when its first step is asked for, so a checkpoint between passes saves the exact
    data position."""
    piece = micro_batch(cfg, step_sequences)
    per_pass, per_step = cfg.batch_size // piece, step_sequences // piece
    step: list[torch.Tensor] = []
    while True:
        ids = torch.cat([next(batches) for _ in range(per_pass)]).to(device)
        with torch.no_grad(), autocast:
            r = read_residuals(transformer, ids, layers, cfg.positions)
        for b in range(0, len(ids), piece):
            step.append(r.kept_in(slice(b, b + piece)))
            if len(step) == per_step:
                yield step
                step = []


def micro_batch(cfg: TrainConfig, step_sequences: int) -> int:
    """Sequences per micro-batch: ``batch_size``, or a whole step when a forward pass spans several."""
    return min(cfg.batch_size, step_sequences)


def train_step(
    runs: list[SweepSAE], xs: list[torch.Tensor], cfg: TrainConfig, autocast: contextlib.AbstractContextManager,
    world: int,
) -> list[dict]:
    """One optimizer step of every run over this rank's micro-batches ``xs`` (``step_inputs``);
    returns their stats."""
    n_micro = len(xs)
    device = runs[0].sae.W_enc.device
    # Summed on the device (scalars in float64, as Python floats would be): no host sync per micro-batch.
    scalars = [torch.zeros(3, dtype=torch.float64, device=device) for _ in runs]  # loss, auxk, l0
    fvus = [torch.zeros(r.sae.config.n_layers, device=device) for r in runs]
    fired = [torch.zeros(r.sae.config.n_layers, r.sae.config.n_latents, dtype=torch.bool, device=device) for r in runs]
    n_tokens = torch.zeros((), dtype=torch.long)
    for i, x in enumerate(xs):
        n_tokens += x.shape[1]
        for run, sc, fvu, fi in zip(runs, scalars, fvus, fired):
            with autocast:
                out = run.loss(x[run.rows], sync=i == n_micro - 1)
            (out.loss / n_micro).backward()
            l0 = (out.topk.values > cfg.dead_threshold).sum(-1).float().mean()
            sc += torch.stack([out.loss.detach(), out.auxk_loss.detach(), l0]).double() / n_micro
            fvu += out.fvu / n_micro
            fi |= run.sae.fired(out.topk)
    n_tokens = int(all_reduce(n_tokens))
    stats = [dict(zip(("loss", "auxk", "l0"), sc.tolist()), fvu=fvu.cpu()) for sc, fvu in zip(scalars, fvus)]
    for run, st, fi in zip(runs, stats, fired):
        run.sae.project_decoder_grad()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.sae.normalize_decoder()
        fi = all_reduce(fi.to(torch.uint8), dist.ReduceOp.MAX if dist.is_initialized() else None).bool()
        run.sae.update_dead(fi, n_tokens)
        if world > 1:
            for key in ("loss", "auxk", "l0"):
                st[key] = all_reduce(torch.tensor(st[key])).item() / world
            st["fvu"] = all_reduce(st["fvu"]) / world
        st["tokens"] = n_tokens
    return stats


def init_pre_bias(runs: list[SweepSAE], xs: list[torch.Tensor]) -> None:
    """Initialise every run's pre-encoder bias from the whole first step (all micro-batches, all ranks)."""
    x = all_gather_cat(torch.cat(xs, dim=1))
    for run in runs:
        run.sae.init_pre_bias(x[run.rows])


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x [L, N, d]`` over ranks along N (so every rank initialises b_pre identically)."""
    if not dist.is_initialized():
        return x
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(x.shape[1], device=x.device))
    longest = int(max(sizes))  # ranks hold different numbers of vectors: pad to gather, then trim
    padded = torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[1]))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:, : int(n)] for part, n in zip(parts, sizes)], dim=1)


# ----------------------------------------------------------------------------- main loop


def train(cfg: TrainConfig) -> list[Path]:
    """Train every MLSAE of the sweep; returns the folders of the trained models."""
    started = time.perf_counter()  # --max_minutes counts from here
    device = pick_device(cfg.device)
    rank, world = init_distributed(device)
    step_sequences = cfg.step_sequences(world)
    out = check_out_dir(cfg.out_dir)
    if not cfg.resume and (out / "checkpoint").exists():
        raise MLSAEError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out_dir")
    if cfg.steps < 1:
        raise MLSAEError(f"--max_tokens ({cfg.max_tokens}) is less than one step ({cfg.tokens_per_step} tokens)")

    model, tokenizer = load_transformer(cfg.model_name, device=device)
    transformer = Transformer(model, tokenizer)
    layers = resolve_layers(cfg, transformer.n_layers)
    for _, ef, k, *_ in cfg.members():
        if k > transformer.d_model * ef:
            raise MLSAEError(f"k={k} is larger than the number of latents ({transformer.d_model} x {ef})")
    chunks = load_chunks(cfg.path, cfg.split, tokenizer, cfg.max_length, max_tokens=cfg.max_tokens)
    loader = ChunkLoader(chunks, micro_batch(cfg, step_sequences), seed=cfg.seed, rank=rank, world_size=world)
    runs = make_sweep(cfg, transformer.d_model, layers, device, out)

    step, tokens, plan = 0, 0, Plan(cfg.steps)
    if cfg.resume:
        step, tokens, plan = load_checkpoint(out, cfg, runs, loader)
    if rank == 0:
        for run in runs:
            run.out.mkdir(parents=True, exist_ok=True)
    wandb_runs = start_wandb(cfg, runs) if cfg.wandb and rank == 0 else []

    precision = resolve_precision(cfg.precision, device)
    autocast = precision_autocast(precision, device)
    inputs = step_inputs(transformer, iter(loader), cfg, layers, autocast, step_sequences, device)
    # Rank 0 only; None leaves it to tqdm (off where stderr is no terminal or TQDM_DISABLE is set).
    bar = tqdm(total=plan.steps, initial=step, disable=None if rank == 0 else True, unit="step", dynamic_ncols=True)
    pace = None
    if cfg.max_minutes is not None and plan.budget is None:
        pace = Pace(cfg, started, step, cfg.steps_per_pass(step_sequences))
    start, start_tokens = time.perf_counter(), tokens
    with transformer.weights_for(precision):
        while step < plan.steps:
            if pace is not None:
                pace.tick(step)
                if step == pace.decide:
                    plan, pace = pace.plan(step, plan.steps), None
                    bar.total = plan.steps
                    if rank == 0 and plan.steps < cfg.steps:
                        tqdm.write(budget_message(cfg, plan), file=sys.stderr)
            xs = next(inputs)
            if step == 0:
                init_pre_bias(runs, xs)
            for run in runs:
                for group in run.optimizer.param_groups:
                    group["lr"] = cfg.lr_at(step, plan.steps)
            stats = train_step(runs, xs, cfg, autocast, world)
            step += 1
            tokens += stats[0]["tokens"]
            elapsed = time.perf_counter() - start
            if rank == 0:
                bar.update()
                bar.set_postfix(loss=f"{stats[0]['loss']:.3f}", fvu=f"{stats[0]['fvu'].mean():.3f}")
                if step % cfg.log_every == 0 or step == plan.steps:
                    for run, st, wb in itertools.zip_longest(runs, stats, wandb_runs):
                        record = log_record(run, st, step, tokens, (tokens - start_tokens) / elapsed, precision)
                        run.log(record)
                        if wb is not None:
                            wb.log(record, step=step)
            if step % cfg.checkpoint_every == 0 or step == plan.steps:
                if rank == 0:
                    save_checkpoint(out, cfg, runs, step, loader, tokens, plan)
                if dist.is_initialized():
                    dist.barrier()
    bar.close()
    if rank == 0:
        for run in runs:
            save_model(run.sae, run.out)
        for wb in wandb_runs:
            wb.finish()
    return [run.out for run in runs]


def budget_message(cfg: TrainConfig, plan: Plan) -> str:
    b = plan.budget
    return (f"--max_minutes {cfg.max_minutes:.1f}: {b['seconds_left'] / 60:.1f} min left at step {b['at_step']} "
            f"({b['seconds_per_step']:.2f} s per step, {b['reserve_seconds'] / 60:.1f} min kept for after training): "
            f"training {plan.steps} of the {cfg.steps} steps ({plan.steps * cfg.tokens_per_step:,} tokens)")


def save_model(sae: MLSAE, folder: Path) -> None:
    """save_pretrained into a temporary folder, then move each file into place atomically."""
    tmp = folder.with_name(folder.name + ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, folder / f.name)
    tmp.rmdir()


def log_record(run: SweepSAE, st: dict, step: int, tokens: int, tokens_per_s: float, precision: str) -> dict:
    dead = run.sae.dead_mask(per_layer=True).float().mean(-1)
    record = {
        "step": step,
        "tokens": tokens,
        "tokens_per_s": round(tokens_per_s, 1),
        "lr": run.optimizer.param_groups[0]["lr"],
        "precision": precision,
        "loss/total": st["loss"],
        "loss/auxk": st["auxk"],
        "train/fvu/avg": st["fvu"].mean().item(),
        "train/l0/avg": st["l0"],
        "train/dead/rel": run.sae.dead_mask().float().mean().item(),
    }
    for i, layer in enumerate(run.sae.config.layers or range(run.sae.config.n_layers)):
        record[f"train/fvu/layer_{layer}"] = st["fvu"][i].item()
        record[f"train/dead/layer_{layer}"] = dead[i].item()
    return record


def start_wandb(cfg: TrainConfig, runs: list[SweepSAE]) -> list:
    try:
        import wandb
    except ImportError as e:
        raise MLSAEError("--wandb needs the wandb package: pip install 'mlsae[wandb]'") from e
    return [wandb.init(project="mlsae", name=run.name, config=asdict(cfg), dir=str(run.out), reinit="create_new")
            for run in runs]


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], add_config_path_arg=True)
    parser.add_arguments(TrainConfig, dest="train")  # a --config_path file's section is `train:`
    return parser.parse_args(argv).train


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    if cfg.malloc_tuning:
        native.tune_malloc()
    for path in train(cfg):
        print(path)


if __name__ == "__main__":
    run_cli(main)
