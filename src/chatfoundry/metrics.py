"""metrics.jsonl (one JSON object per line) and the PNG plots drawn from it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


class MetricsLog:
    """Appends records to metrics.jsonl; on resume drops what a killed run logged past the checkpoint."""

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


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
