"""metrics.jsonl (one JSON object per line) and the PNG plots drawn from it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

from chatfoundry.errors import UserError

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


class MetricsLog:
    """Appends records to metrics.jsonl; on resume drops what a killed run logged past the checkpoint.

    With `tensorboard`, each record's numbers also go to TensorBoard event files beside it (the
    optional `tensorboard` extra): tagged by name, under the record's text fields ("train/arithmetic/
    accuracy"), at its `step` or `iteration`. A fresh run clears the folder's old event files; a
    resumed one purges their steps past the checkpoint, as metrics.jsonl drops its lines.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True,
                 tensorboard: bool = False):
        self.path, self.enabled, self.tb = Path(path), enabled, None
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            self.tb = summary_writer(self.path.parent, resume_step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", record.get("iteration", 0))
            prefix = "".join(f"{v}/" for v in record.values() if isinstance(v, str))
            for key, value in record.items():
                if key not in ("step", "iteration") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(prefix + key, value, step)
            self.tb.flush()  # a killed run keeps what it logged, as metrics.jsonl does

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def summary_writer(folder: Path, resume_step: int | None = None):
    """TensorBoard's SummaryWriter on `folder`."""
    SummaryWriter = summary_writer_class()
    if resume_step is None:
        for old in folder.glob("events.out.tfevents.*"):
            old.unlink()
    return SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)


def summary_writer_class():
    """torch's SummaryWriter, or one clear line saying what to install (checked before a run starts)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("log: tensorboard needs the tensorboard package: pip install 'chatfoundry[tensorboard]'") from None
    return SummaryWriter


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], out: str | Path, series: dict[str, str], title: str,
                ylabel: str, x: str = "step", log_y: bool = False) -> Path:
    """One line per metric key in `series` (key -> label), against `x`; absent keys are skipped."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, label in series.items():
        pts = [(r[x], r[key]) for r in records if key in r and x in r and math.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=label, marker="o" if len(pts) < 30 else None, markersize=3)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def plot_bars(names: list[str], series: dict[str, list[float]], out: str | Path, title: str | list[str],
              panels: int = 1) -> Path:
    """Grouped bars in [0, 1], one group per name, one bar per series (label -> values). With
    `panels` > 1 the series are dealt out over that many side-by-side panels, `title` one each."""
    labels = list(series)
    per = len(labels) // panels
    fig, axes = plt.subplots(1, panels, figsize=(7 if panels == 1 else 5.5 * panels, 3.5), squeeze=False)
    for p, ax in enumerate(axes[0]):
        mine = labels[p * per:(p + 1) * per] if panels > 1 else labels
        width = 0.8 / len(mine)
        for j, label in enumerate(mine):
            ax.bar([i + (j - (len(mine) - 1) / 2) * width for i in range(len(names))], series[label], width, label=label)
        ax.set_xticks(list(range(len(names))), names)
        ax.set_ylim(0, 1.18)  # headroom for the legend above bars that reach 1
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_title(title[p] if isinstance(title, list) else title)
        ax.legend(loc="upper center", ncol=len(mine), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
