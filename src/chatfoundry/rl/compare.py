"""`chatfoundry rl compare`: several algorithms x seeds on one environment, one figure.

    DIR/<algo>/seed<k>/   each run, as `rl train` leaves it
    DIR/compare.png       training return against environment steps and against wall time:
                          the mean over seeds, shaded between the worst and best seed
    DIR/compare.json      every run's summary and the curves drawn

Each run's curve is its training episodes' mean return per logged update, interpolated onto a
common step grid; the wall-time panel plots the same points at the seeds' mean training time to
reach each step (evaluation excluded), so the two panels show sample efficiency and speed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from chatfoundry.errors import UserError
from chatfoundry.metrics import plt
from chatfoundry.rl.train import ALGOS, resolve_env_id, run, with_preset


def parse_algos(text: str) -> list[str]:
    algos = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in algos if a not in ALGOS]
    if bad or not algos:
        raise UserError(f"--algos: {bad[0] if bad else 'empty'!r} is not one of {', '.join(ALGOS)}")
    return algos


def curve(records: list[dict], grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A run's training return and training time at each grid step (linear interpolation)."""
    pts = [(r["step"], r["episode_return"], r["time"]) for r in records if "episode_return" in r]
    if not pts:
        return np.full_like(grid, np.nan, dtype=float), np.full_like(grid, np.nan, dtype=float)
    steps, returns, times = map(np.asarray, zip(*pts))
    all_steps = np.asarray([r["step"] for r in records if "time" in r])
    all_times = np.asarray([r["time"] for r in records if "time" in r])
    return np.interp(grid, steps, returns), np.interp(grid, all_steps, all_times)


def compare(env: str, algos: list[str], seeds: int, steps: int, out: str | Path, overwrite: bool = False,
            overrides: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    out = Path(out)
    env_id = resolve_env_id(env)
    if seeds <= 0 or steps <= 0:
        raise UserError("--seeds and --steps: must be > 0")
    if (out / "compare.json").exists() and not overwrite:
        raise UserError(f"{out}: already holds a comparison; pass --overwrite to replace it")
    configs = {(algo, seed): with_preset([("compare", {"algo": algo, "env": env_id, "steps": steps, "seed": seed,
                                                       "out": str(out / algo / f"seed{seed}"), **(overrides or {})})])
               for algo in algos for seed in range(seeds)}  # every config checked before the first run
    if overwrite:
        for algo in algos:
            shutil.rmtree(out / algo, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    grid = np.linspace(0, steps, 101)[1:]
    results: dict[str, Any] = {"env": env_id, "steps": steps, "seeds": seeds, "algos": {}}
    for algo in algos:
        runs, curves, times = [], [], []
        for seed in range(seeds):
            summary = run(configs[algo, seed], overwrite=overwrite, log=log)
            records = [json.loads(line) for line in (Path(summary["out"]) / "metrics.jsonl").read_text().splitlines()]
            c, t = curve(records, grid)
            runs.append(summary), curves.append(c), times.append(t)
        curves, times = np.asarray(curves), np.asarray(times)
        results["algos"][algo] = {
            "runs": runs, "eval_return_mean": float(np.mean([r["eval_return"] for r in runs])),
            "eval_return_std": float(np.std([r["eval_return"] for r in runs])),
            "train_time_s_mean": float(np.mean([r["train_time_s"] for r in runs])),
            "curve": {"step": grid.tolist(), "mean": np.nanmean(curves, 0).tolist(), "min": np.nanmin(curves, 0).tolist(),
                      "max": np.nanmax(curves, 0).tolist(), "time": np.nanmean(times, 0).tolist()}}
    _figure(results, out / "compare.png")
    (out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    width = max(len(a) for a in algos)
    for algo, r in results["algos"].items():
        log(f"{algo:<{width}}  eval return {r['eval_return_mean']:9.2f} +- {r['eval_return_std']:7.2f}   "
            f"train time {r['train_time_s_mean']:7.1f} s")
    log(f"figure: {out / 'compare.png'}")
    return {"env": env_id, "steps": steps, "seeds": seeds, "figure": str(out / "compare.png"),
            "algos": {a: {k: v for k, v in r.items() if k not in ("curve", "runs")} for a, r in results["algos"].items()}}


def _figure(results: dict[str, Any], path: Path) -> None:
    fig, (by_steps, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110, sharey=True)
    for algo, r in results["algos"].items():
        c = r["curve"]
        for ax, x in ((by_steps, c["step"]), (by_time, c["time"])):
            (line,) = ax.plot(x, c["mean"], label=algo)
            ax.fill_between(x, c["min"], c["max"], color=line.get_color(), alpha=0.2)
    by_steps.set_xlabel("environment steps")
    by_time.set_xlabel("wall time (s, training only)")
    by_steps.set_ylabel("training episode return")
    for ax in (by_steps, by_time):
        ax.grid(alpha=0.3)
    by_steps.legend()
    fig.suptitle(f"{results['env']}: mean over {results['seeds']} seeds (shaded: worst to best seed)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
