"""What every stage repeats, in one place: its config's header, its run folder and its runtime.

Each stage's `run(cfg, resume, overwrite, log)` reads the same way:

    with stage.start("sft", cfg, resume, overwrite, log, dtype=cfg.dtype) as r:
        ...                  # load the model and the data: a bad input fails before anything is written
        r.prepare(ARTIFACTS) # create the folder, clear an overwritten run's files, save config.yaml
        ...                  # train, evaluate, save
        return {..., "wall_s": r.wall_s()}

`start` checks the folder first (a run to resume, or one free to write), picks the device and,
under torchrun, joins the process group; on the way out it leaves the process group and torch's
CPU threads as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from chatfoundry import checkpoint, hub
from chatfoundry.config import save_config
from chatfoundry.errors import UserError
from chatfoundry.metrics import MetricsLog, summary_writer_class

MODEL_FIELDS = ("init", "teacher", "writer")  # the config fields that name a model (hf:ORG/NAME resolves in start)


@dataclass
class StageConfig:
    """The header every stage's config starts with; a stage redeclares `out` with its own folder,
    and adds `init`, `dtype` and `compile` where it has them."""

    out: str = "runs/stage"  # the run folder: checkpoint/, config.yaml, metrics.jsonl and the plots
    seed: int = 1337  # seeds everything the stage draws at random: data order and splits, weights, samples
    device: str = "auto"  # cpu, cuda, cuda:N or auto (cuda if there is one, else cpu)
    log: Literal["jsonl", "tensorboard"] = "jsonl"  # tensorboard: TensorBoard event files beside metrics.jsonl too


@dataclass
class Run:
    """One run of a stage, as `start` set it up."""

    name: str
    cfg: Any
    out: Path
    rt: "Runtime"
    resume: bool
    overwrite: bool
    log: Callable[[str], None]
    t0: float = field(default_factory=time.perf_counter)
    logs: list[MetricsLog] = field(default_factory=list)  # closed when the run ends

    def prepare(self, artifacts: tuple[str, ...]) -> None:
        """The folder, ready to write (on the main process)."""
        if self.rt.is_main:
            prepare_output(self.out, self.cfg, self.resume, self.overwrite, artifacts)

    def metrics(self, resume_step: int | None = None) -> MetricsLog:
        """metrics.jsonl, written by the main process (with TensorBoard's files under `--log tensorboard`);
        a resumed run keeps its records up to `resume_step`."""
        self.logs.append(MetricsLog(self.out / "metrics.jsonl", resume_step if self.resume else None,
                                    enabled=self.rt.is_main, tensorboard=self.cfg.log == "tensorboard"))
        return self.logs[-1]

    def wall_s(self) -> float:
        return round(time.perf_counter() - self.t0, 2)


@contextlib.contextmanager
def start(name: str, cfg: Any, resume: bool = False, overwrite: bool = False, log: Callable = print, *,
          dtype: str = "fp32", one_process: bool = False) -> Iterator[Run]:
    """Check the run folder, then set up the runtime; `one_process` refuses torchrun (label, ppo)."""
    t0 = time.perf_counter()
    for name_field in MODEL_FIELDS:  # a Hub model by name: its converted folder, which config.yaml then records
        if isinstance(getattr(cfg, name_field, None), str):
            setattr(cfg, name_field, hub.resolve(getattr(cfg, name_field)))
    out = Path(cfg.out)
    check_output(out, resume, overwrite)
    if cfg.log == "tensorboard":
        summary_writer_class()
    with runtime(name, cfg.device, dtype, one_process) as rt:
        run = Run(name, cfg, out, rt, resume, overwrite, log, t0)
        try:
            yield run
        finally:
            for metrics in run.logs:
                metrics.close()


@contextlib.contextmanager
def runtime(name: str, device: str, dtype: str = "fp32", one_process: bool = False) -> Iterator[Runtime]:
    """The device (and the process group under torchrun); torch's CPU threads are as they were after."""
    if one_process:
        single_process(name)
    rt = setup_runtime(device, dtype)
    threads = torch.get_num_threads()
    try:
        yield rt
    finally:
        torch.set_num_threads(threads)
        teardown(rt)


# ---------------------------------------------------------------- the run folder


def check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Before any work: a run folder to resume, or one free to write (or to --overwrite)."""
    has_run = (out / "config.yaml").exists() or (out / checkpoint.CHECKPOINT).exists()
    if resume:
        checkpoint.resolve_checkpoint(out)  # raises naming the folder if there is nothing to resume
    elif has_run and not overwrite:
        raise UserError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to replace it")
    elif out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")


def prepare_output(out: Path, cfg, resume: bool, overwrite: bool, artifacts: tuple[str, ...]) -> None:
    """Create the run folder, clear an overwritten run's checkpoint and artifacts, save the config."""
    out.mkdir(parents=True, exist_ok=True)
    if not resume and overwrite:
        shutil.rmtree(out / checkpoint.CHECKPOINT, ignore_errors=True)
        for stale in map(out.joinpath, artifacts):
            if stale.is_dir():  # PPO's critic/
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
    save_config(cfg, out / "config.yaml")


# ---------------------------------------------------------------- runtime: device, dtype, processes


@dataclass
class Runtime:
    device: torch.device
    dtype: str  # "fp32" or "bf16"
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self):
        """bf16 autocast for matmuls (weights and optimizer stay fp32); a no-op in fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_runtime(device: str = "auto", dtype: str = "fp32") -> Runtime:
    """Pick the device; under torchrun, join the process group (nccl on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: {device} requested but CUDA is not available")
    dev = torch.device(device)
    if dev.type == "cuda" and (world > 1 or dev.index is None):  # set_device needs an index
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: fp32 range, tensor-core speed
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, dtype, rank, world)


def single_process(stage: str) -> None:
    """Refuse torchrun for a stage that runs in one process: every rank would do all of its work
    and write the same files. Checked before any process group is joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"{stage} runs in one process: launch it without torchrun "
                        "(pretrain, sft and rm train data-parallel under torchrun)")


SUMMARY = "summary.json"  # a finished run's summary in its folder, for the commands that skip finished runs


def run_once(run: Callable[..., dict], cfg: Any, folder: Path) -> tuple[dict, bool]:
    """(summary, trained now) of one stage run in `folder` for a command made of many (scaling, cot):
    its summary.json when it finished before, else run (resumed from its checkpoint when cut short),
    quietly, and its summary written last, so a killed command's next call skips what is done."""
    done = Path(folder) / SUMMARY
    if done.is_file():
        return json.loads(done.read_text()), False
    resume = (Path(folder) / checkpoint.CHECKPOINT).is_dir()
    summary = run(cfg, resume=resume, overwrite=Path(folder).exists() and not resume, log=lambda *a: None)
    done.write_text(json.dumps(summary, indent=1))
    return summary, True


def teardown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
