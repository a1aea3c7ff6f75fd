"""The training loop the training stages share: AdamW, warmup + cosine schedule, gradient
accumulation, DDP or FSDP2, clipping, bf16 autocast, a NaN guard, metrics, progress and checkpoints.

A stage supplies what differs: how to draw this process's micro-batches, the loss of one, an
evaluation and how to save. Everything else reads top to bottom in `fit`.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from chatfoundry.config import require
from chatfoundry.errors import UserError
from chatfoundry.metrics import MetricsLog
from chatfoundry.train.stage import Runtime


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class TrainConfig:
    # Small batches, many steps: on the built-in corpus the 1M-parameter model completes "The
    # capital of X is" right for 2% of countries after 400 steps of 32 sequences, 52% after 800
    # of 16, 96% after 2,400 of 8: knowledge arrives late. 1,600 of 16 take the time of 2,400
    # of 8 on 2 cores (15K against 11K tokens/s) and reach a lower validation loss.
    steps: int = 1600  # optimizer steps
    batch_size: int = 16  # sequences per optimizer step, summed over all processes
    micro_batch_size: int = 0  # sequences per forward pass and process; 0: batch_size / processes
    block_size: int = 0  # training sequence length; 0: the model's block_size
    lr: float = 3e-3  # peak learning rate (AdamW), reached after warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # steps of linear warmup up to lr; 0: none
    weight_decay: float = 0.1  # AdamW's decoupled decay, on matrices and embeddings (not biases or norm gains)
    beta1: float = 0.9  # AdamW's decay rate of the gradient's running mean
    beta2: float = 0.95  # AdamW's decay rate of the squared gradient's running mean
    max_grad_norm: float = 1.0  # gradient clipping: the max global gradient norm; 0: off
    eval_every: int = 400  # optimizer steps between evaluations (also at the last step)
    eval_batches: int = 10  # validation micro-batches per evaluation; rm and finetune-head score all held-out data
    save_every: int = 800  # also saved at the end
    log_every: int = 10  # optimizer steps between training records in metrics.jsonl (loss, lr, grad norm, tokens/s)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "save_every", "log_every"):
            require(getattr(self, name) > 0, f"train.{name}", f"must be > 0, got {getattr(self, name)}")
        for name in ("micro_batch_size", "block_size", "warmup_steps", "weight_decay", "max_grad_norm"):
            require(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        require(0 < self.lr < math.inf, "train.lr", f"must be a number > 0, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(0 <= self.beta1 < 1, "train.beta1", f"must be in [0, 1), got {self.beta1}")
        require(0 <= self.beta2 < 1, "train.beta2", f"must be in [0, 1), got {self.beta2}")


def accumulation(cfg: TrainConfig, rt: Runtime) -> tuple[int, int]:
    """(micro_batch_size, accumulation steps) that make up batch_size across rt.world processes."""
    micro = cfg.micro_batch_size or cfg.batch_size // rt.world
    if micro <= 0 or cfg.batch_size % (micro * rt.world):
        raise UserError(f"train.batch_size: {cfg.batch_size} is not a multiple of train.micro_batch_size "
                        f"{micro} x {rt.world} processes")
    return micro, cfg.batch_size // (micro * rt.world)


def pack(rows: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token rows packed first fit, longest first, into lines of `width` (0: one row a line, in order):
    (idx (lines, T), segments (lines, T), where each row starts in idx.flatten()); T is the
    fullest line's length. Each row is a segment of its line and the line's padding one more, so
    with `segments` a row attends only to itself from position 0: packed rows waste no compute
    on padding and each gets what it would alone."""
    lines: list[list[int]] = [] if width else [[i] for i in range(len(rows))]
    free: list[int] = []
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i])) if width else ():
        at = next((n for n, f in enumerate(free) if f >= len(rows[i])), len(lines))
        if at == len(lines):
            lines.append([])
            free.append(width)
        lines[at].append(i)
        free[at] -= len(rows[i])
    T = max(sum(len(rows[i]) for i in line) for line in lines)
    idx = torch.full((len(lines), T), pad_id)
    segments = torch.zeros((len(lines), T), dtype=torch.long)
    starts = [0] * len(rows)
    for n, line in enumerate(lines):
        used = 0
        for s, i in enumerate(line):
            idx[n, used:used + len(rows[i])] = torch.tensor(rows[i])
            segments[n, used:used + len(rows[i])] = s
            starts[i] = n * T + used
            used += len(rows[i])
        segments[n, used:] = len(line)
    return idx, segments, starts


# ---------------------------------------------------------------- data order


class Epochs:
    """Indices 0 .. n-1, each epoch in a fresh shuffled order. State is (epoch, position), so a
    resumed run draws exactly what the uninterrupted one would have."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def peek(self) -> int:
        """The next index, starting a new epoch when this one is used up."""
        if self.pos == self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._shuffled()
        return self._order[self.pos]

    def next(self) -> int:
        i = self.peek()
        self.pos += 1
        return i

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffled()


# ---------------------------------------------------------------- optimizer and schedule


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases, norms and 1-D gains are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2 and not hasattr(p, "lr_scale")],
               "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2 and not hasattr(p, "lr_scale")], "weight_decay": 0.0}]
    # A parameter tagged `lr_scale` (T5's relative position bias) steps that many times faster, undecayed.
    for scale in sorted({p.lr_scale for p in params if hasattr(p, "lr_scale")}):
        groups.append({"params": [p for p in params if getattr(p, "lr_scale", None) == scale], "weight_decay": 0.0,
                       "lr_scale": scale})
    # Fused: one kernel over all tensors (CPU too since torch 2.4; ~5x faster there than the
    # per-tensor loop torch otherwise picks on CPU).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cuda", "cpu"))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then a cosine down to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def restore(out, optimizer: torch.optim.Optimizer, cfg: TrainConfig, model: nn.Module | None = None) -> dict[str, Any]:
    """A run's trainer state from its checkpoint: restores the optimizer (a sharded one, and the
    model's shards with it, from the checkpoint's `sharded/`) and torch's RNG, and returns the state,
    whose "step" is where to go on and whose other entries the stage's data order wrote."""
    from chatfoundry.checkpoint import SHARDS, load_trainer_state, resolve_checkpoint

    state = load_trainer_state(out)
    require(cfg.steps >= int(state["step"]), "train.steps", f"{cfg.steps} is below the checkpoint's step {state['step']}")
    if "optimizer" in state:
        if model is not None and sharded(model):
            raise UserError(f"{out}: its checkpoint was saved by one process or DDP; resume it with --dist ddp")
        optimizer.load_state_dict(state["optimizer"])
    else:
        folder = resolve_checkpoint(out) / SHARDS
        if model is None or not sharded(model) or not folder.is_dir():
            raise UserError(f"{out}: its checkpoint holds FSDP shards; resume it under torchrun with --dist fsdp")
        load_shards(model, optimizer, folder)
    torch.set_rng_state(state["torch_rng"])
    return state


def resume_step(out, optimizer: torch.optim.Optimizer, cfg: TrainConfig, order: "Epochs", resume: bool) -> int:
    """The step a run starts at: 0 for a new one; for a resumed one the checkpoint's, with the
    optimizer, torch's RNG and the data order (saved as "order") restored."""
    if not resume:
        return 0
    state = restore(out, optimizer, cfg)
    order.set_state(state["order"])
    return int(state["step"])


def trainer_state(step: int, optimizer: torch.optim.Optimizer, **data: Any) -> dict[str, Any]:
    """What `restore` reads back: the step, the optimizer (unless it is sharded: its shards are
    saved apart, `save_shards`), torch's RNG and the data position."""
    shards = any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])
    return {"step": step, **({} if shards else {"optimizer": optimizer.state_dict()}),
            "torch_rng": torch.get_rng_state(), **data}


# ---------------------------------------------------------------- several processes: DDP or FSDP


def shard(model: nn.Module, rt: Runtime, how: str) -> nn.Module:
    """FSDP2 (`fully_shard`) when `how` is "fsdp" under torchrun: each block's parameters, then the
    rest, split across the processes and gathered only around the block's forward and backward, so
    the weights, gradients and AdamW's moments take 1/world of the memory each. In place, before
    the optimizer is made (it must hold the shards). Otherwise the model as it is."""
    if how != "fsdp" or not rt.distributed:
        return model
    for block in getattr(model, "layers", []):
        fully_shard(block)
    fully_shard(model)
    return model


def sharded(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def wrap(model: nn.Module, rt: Runtime, compile: bool = False) -> nn.Module:
    """The module the loop trains: DDP across processes when there are several (unless FSDP already
    shards it), then torch.compile."""
    if rt.distributed and not sharded(model):
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return torch.compile(model) if compile else model


@dataclass
class Shards:
    """What an FSDP save hands the checkpoint: the folder of every process's shards, and the whole
    weights (on the main process; None elsewhere). Both None for an unsharded model."""

    folder: Path | None = None
    weights: dict[str, torch.Tensor] | None = None


def save_shards(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime) -> Shards:
    """Under FSDP, on every process (collectives): the model's and optimizer's shards through
    torch.distributed.checkpoint into a staging folder that `save_checkpoint` moves into the new
    checkpoint; the main process then reads the whole weights back from those files for its
    model.safetensors. Reading, not gathering: gloo's all-gather behind a full state dict
    (get_model_state_dict(full_state_dict=True)) corrupted the heap in 2 of 52 stress runs on CPU
    (docs/log.md, 2026-12-06), and the files are already there."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if not sharded(model):
        return Shards()
    staging = Path(out) / "checkpoint.shards.tmp"
    if rt.is_main:
        shutil.rmtree(staging, ignore_errors=True)
    rt.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=staging)  # returns once all are written
    if not rt.is_main:
        return Shards(staging, None)
    whole = {"model": {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model_state.items()}}
    dcp.load(whole, checkpoint_id=staging, no_dist=True)  # the shards resharded into whole tensors, in this process
    return Shards(staging, whole["model"])


def load_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The model's and optimizer's shards back from `save_shards`'s folder (the same number of processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# ---------------------------------------------------------------- the loop


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, cfg: TrainConfig, *,
        micro_batches: Callable[[], list[Any]], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        evaluate: Callable[[int], dict[str, float]], save: Callable[[int], None], log: MetricsLog,
        tokens_per_step: int, start_step: int = 0, desc: str = "train") -> dict[str, float]:
    """Run optimizer steps start_step .. cfg.steps; returns the last logged and evaluated metrics.

    `model` may be wrapped (DDP, torch.compile); `micro_batches()` returns this process's share
    of one optimizer step; `loss_fn` returns a mean loss; `save(step)` writes a checkpoint.
    """
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the module
    ddp, fsdp = isinstance(inner, nn.parallel.DistributedDataParallel), sharded(inner)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    last: dict[str, float] = {}
    bar = tqdm(total=cfg.steps, initial=start_step, desc=desc, disable=not rt.is_main, dynamic_ncols=True,
               unit="step", mininterval=1.0)
    window_t, window_steps = time.perf_counter(), 0
    model.train()
    for step in range(start_step, cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batches = micro_batches()
        loss_sum = torch.zeros((), device=rt.device)
        for i, batch in enumerate(batches):
            # Sync gradients across processes only on the last micro-batch of the step.
            sync = not (ddp or fsdp) or i == len(batches) - 1
            if fsdp:
                inner.set_requires_gradient_sync(sync)
            with (contextlib.nullcontext() if sync or fsdp else inner.no_sync()), rt.autocast():
                loss = loss_fn(model, batch) / len(batches)
            loss.backward()
            loss_sum += loss.detach()
        if rt.distributed:
            dist.all_reduce(loss_sum)  # gloo has no AVG
            loss_sum /= rt.world
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            bar.close()
            raise TrainingDiverged(f"loss became {loss_value} at step {step + 1}; stopped without saving "
                                   "(the last good checkpoint is kept; try a lower train.lr)")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over every process's shards
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        window_steps += 1
        bar.update(1)

        if done % cfg.log_every == 0 or done == cfg.steps or done == start_step + 1:
            elapsed = time.perf_counter() - window_t
            last.update(step=done, loss=loss_value, lr=lr, grad_norm=float(grad_norm),
                        tokens_per_s=tokens_per_step * window_steps / max(elapsed, 1e-9))
            log.write({k: last[k] for k in ("step", "loss", "lr", "grad_norm", "tokens_per_s")})
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            window_t, window_steps = time.perf_counter(), 0
        if done % cfg.eval_every == 0 or done == cfg.steps:
            paused = time.perf_counter()
            model.eval()
            with rt.autocast():
                scores = evaluate(done)
            model.train()
            last.update(scores)
            log.write({"step": done, **scores})
            if rt.is_main:
                bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            window_t += time.perf_counter() - paused  # evaluation time is not training throughput
        if done % cfg.save_every == 0 or done == cfg.steps:
            paused = time.perf_counter()
            save(done)
            window_t += time.perf_counter() - paused
    bar.close()
    return last
