"""`chatfoundry align-compare`: the alignment methods side by side on one SFT model and reward
model, each at several strengths, scored on the world's held-out prompts by the gold reward the
learners never see: what each buys for how much KL to SFT.

    out/bon/            best-of-n by the reward model: best-of-k for k = 1, 2, 4, ..., n from one
                        set of SFT samples, at KL log k - (k - 1) / k
    out/ppo_<coef>/     PPO against the reward model, the KL coefficient fixed at <coef>
    out/grpo_<coef>/    GRPO against the reward model, KL coefficient <coef>
    out/dpo_<beta>/     DPO (with RPO's NLL term) on the comparisons the reward model learned from
    out/frontier.png    sampled answers' gold gain over SFT against their KL, one curve per method
    out/overoptimization.png  the reward model's score and the gold reward against sqrt(KL), with
                        Gao et al.'s forms fitted: best-of-n d (a - b d), RL d (a - b log d)
    out/report.md       the points, the fits' R^2, and the gold reward's parts per method

Every point is the held-out sampled answers' gold gain over SFT's (paired, its SE) at their KL.
A method's run that finished (its `summary.json`) is skipped, so an interrupted comparison resumes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chatfoundry.config import save_config
from chatfoundry.data.world import PARTS
from chatfoundry.errors import UserError
from chatfoundry.eval.policy import PolicyEvalConfig
from chatfoundry.train import best_of_n, dpo, grpo, ppo
from chatfoundry.train.stage import SUMMARY, single_process



@dataclass
class AlignCompareConfig:
    # A `chatfoundry pipeline` folder: its sft/, rm/ and label/ are the inputs unless named below.
    pipeline: str = "runs/demo"
    sft: str = ""  # the SFT checkpoint every method starts from (default: PIPELINE/sft)
    rm: str = ""  # the reward model best-of-n, PPO and GRPO optimise (default: PIPELINE/rm)
    data: str = ""  # the comparisons DPO learns from, the reward model's (default: PIPELINE/label)
    out: str = "runs/align"  # a folder per method and strength, frontier.png, overoptimization.png, report.md
    seed: int = 1337  # every method's seed
    device: str = "auto"  # every method's device
    n: int = 16  # best-of-n's largest n (k = 1, 2, 4, ..., n)
    # PPO's fixed KL coefficients: on the demo 2 / 1 / 0.5 / 0.2 land at 0.4 / 0.8 / 1.6 / 2.6 nats
    ppo_kl: list[float] = field(default_factory=lambda: [0.2, 0.5, 1.0, 2.0])
    grpo_kl: list[float] = field(default_factory=lambda: [0.1, 0.5, 2.0])  # GRPO's KL coefficients
    dpo_beta: list[float] = field(default_factory=lambda: [0.2, 0.5, 2.0])  # DPO's betas
    samples: int = 4  # sampled answers per held-out prompt: every point's gold and KL
    per_family: int = 100  # held-out test questions per family
    ppo_iterations: int = 0  # PPO's iterations (0: ppo's default)
    grpo_iterations: int = 0  # GRPO's iterations (0: grpo's default)
    dpo_steps: int = 0  # DPO's optimizer steps (0: dpo's default)

    def validate(self) -> None:
        for name in ("ppo_kl", "grpo_kl", "dpo_beta"):
            values = getattr(self, name)
            if not values or min(values) <= 0:
                raise UserError(f"{name}: give one or more strengths > 0, got {values}")
        if min(self.ppo_iterations, self.grpo_iterations, self.dpo_steps) < 0:
            raise UserError("ppo_iterations, grpo_iterations, dpo_steps: must be >= 0 (0: the method's default)")
        if self.n < 2 or self.samples < 2 or self.per_family < 1:
            raise UserError(f"n, samples and per_family: must be >= 2, >= 2 and >= 1, got {self.n}, {self.samples}, "
                            f"{self.per_family}")


def _inputs(cfg: AlignCompareConfig) -> tuple[str, str, str]:
    base = Path(cfg.pipeline)
    sft, rm, data = cfg.sft or str(base / "sft"), cfg.rm or str(base / "rm"), cfg.data or str(base / "label")
    for name, path in (("sft", sft), ("rm", rm), ("data", data)):
        if not Path(path).exists():
            raise UserError(f"{name}: {path} does not exist (run `chatfoundry pipeline --out {cfg.pipeline}` first, "
                            f"or give --{name})")
    return sft, rm, data


def methods(cfg: AlignCompareConfig) -> dict[str, tuple[str, object, object]]:
    """name -> (method, its stage config, its run), in the order they run."""
    sft, rm, data = _inputs(cfg)
    out = Path(cfg.out)
    common = dict(seed=cfg.seed, device=cfg.device)
    runs: dict[str, tuple[str, object, object]] = {}
    runs["bon"] = ("bon", best_of_n.BestOfNConfig(init=sft, reward=f"rm:{rm}", out=str(out / "bon"), n=cfg.n,
                                                  train_prompts=0, **common), best_of_n.run)
    no_baselines = dict(best_of=[], temperatures=[], samples=cfg.samples, per_family=cfg.per_family)
    for coef in cfg.ppo_kl:
        c = ppo.PPOConfig(init=sft, reward=f"rm:{rm}", out=str(out / f"ppo_{coef:g}"), **common)
        c.kl.coef, c.kl.control = coef, "fixed"
        c.iterations = cfg.ppo_iterations or c.iterations
        c.eval = PolicyEvalConfig(**no_baselines)
        runs[f"ppo_{coef:g}"] = ("ppo", c, ppo.run)
    for coef in cfg.grpo_kl:
        c = grpo.GRPOConfig(init=sft, reward=f"rm:{rm}", out=str(out / f"grpo_{coef:g}"), **common)
        c.kl.coef = coef
        c.iterations = cfg.grpo_iterations or c.iterations
        c.eval = PolicyEvalConfig(**no_baselines)
        runs[f"grpo_{coef:g}"] = ("grpo", c, grpo.run)
    for beta in cfg.dpo_beta:
        c = dpo.DPOConfig(init=sft, beta=beta, out=str(out / f"dpo_{beta:g}"), **common)
        c.data.files = [data]
        c.train.steps = cfg.dpo_steps or c.train.steps
        c.train.save_every = min(c.train.save_every, c.train.steps)
        c.eval = PolicyEvalConfig(**no_baselines)
        runs[f"dpo_{beta:g}"] = ("dpo", c, dpo.run)
    return runs


def _point(name: str, method: str, summary: dict) -> dict:
    return {"run": name, "method": method, "gold_gain": summary["gold_gain_sampled"],
            "gold_gain_se": summary["gold_gain_sampled_se"], "kl_heldout": summary["kl_heldout"],
            "rm_gain": (summary["rm_reward_sampled"] - summary["sft_rm_reward_sampled"]
                        if "rm_reward_sampled" in summary else None),
            "parts": summary["parts_sampled"]}


def run(cfg: AlignCompareConfig, overwrite: bool = False, log=print) -> dict:
    """Run (or finish) every method at every strength, then the pictures and the report."""
    t0 = time.perf_counter()
    single_process("align-compare")
    out = Path(cfg.out)
    plan = methods(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    points, times = [], {}
    for i, (name, (method, stage_cfg, stage_run)) in enumerate(plan.items(), 1):
        folder = Path(stage_cfg.out)
        done = folder / SUMMARY
        if done.is_file() and not overwrite:
            summary = json.loads(done.read_text())
            log(f"[{i}/{len(plan)}] {name}: done, skipped")
        else:
            log(f"[{i}/{len(plan)}] {name}: running -> {folder}")
            start = time.perf_counter()
            summary = stage_run(stage_cfg, overwrite=folder.exists(), log=lambda line: None)
            summary["stage_s"] = round(time.perf_counter() - start, 1)
            done.write_text(json.dumps(summary))
        times[name] = summary.get("stage_s")
        if method == "bon":
            for c in summary["curve"][1:]:
                points.append({"run": f"bon{c['k']}", "method": "bon", "gold_gain": c["gold_gain"],
                               "gold_gain_se": c["gold_gain_se"], "kl_heldout": c["kl"],
                               "rm_gain": c["reward"] - summary["curve"][0]["reward"], "parts": c["parts"]})
        else:
            points.append(_point(name, method, summary))
    fits = {m: fit(m, [p for p in points if p["method"] == m]) for m in ("bon", "ppo", "grpo", "dpo")}
    plot_frontier(points, fits, out / "frontier.png")
    plot_overoptimization(points, fits, out / "overoptimization.png")
    # Per method its best strength by gold gain; best-of-n at 4 and 16.
    best = {p["run"]: p for p in points if p["run"] in ("bon4", "bon16")}
    for p in points:
        if p["method"] != "bon" and p["gold_gain"] > best.get(p["method"], {"gold_gain": -math.inf})["gold_gain"]:
            best[p["method"]] = p
    report = {"points": points, "fits": fits, "times_s": times, "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(report_md(points, fits, times, report["wall_s"]))
    log(f"align-compare: {len(points)} points in {report['wall_s']:.0f} s; report: {out / 'report.md'}")
    return {"out": str(out), "wall_s": report["wall_s"],
            "methods": {k: {f: best[k][f] for f in ("gold_gain", "gold_gain_se", "kl_heldout")} | {"run": best[k]["run"]}
                        for k in ("bon4", "bon16", "dpo", "grpo", "ppo") if k in best},
            "fits": {m: {k: v for k, v in f.items() if k != "form"} for m, f in fits.items() if f}}


# ---------------------------------------------------------------- Gao et al.'s functional forms


def fit(method: str, points: list[dict]) -> dict:
    """Gold gain against d = sqrt(KL): best-of-n d (a - b d), an RL method d (a - b log d) (Gao et
    al. 2022); least squares through the origin (both are linear in a and b), and R^2."""
    pts = [(math.sqrt(p["kl_heldout"]), p["gold_gain"]) for p in points if p["kl_heldout"] > 0]
    if len(pts) < 2:
        return {}
    d, y = np.array([x for x, _ in pts]), np.array([g for _, g in pts])
    second = d * d if method == "bon" else d * np.log(d)
    design = np.stack([d, -second], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    pred = design @ np.array([a, b])
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float(((y - pred) ** 2).sum()) / total if total > 0 else 1.0
    form = "d (a - b d)" if method == "bon" else "d (a - b log d)"
    return {"form": form, "a": round(float(a), 4), "b": round(float(b), 4), "r2": round(r2, 3), "points": len(pts)}


def _curve(method: str, f: dict, d: np.ndarray) -> np.ndarray:
    return d * (f["a"] - f["b"] * (d if method == "bon" else np.log(np.maximum(d, 1e-9))))


COLOURS = {"bon": "tab:green", "ppo": "tab:blue", "grpo": "tab:orange", "dpo": "tab:red"}
NAMES = {"bon": "best-of-n (RM)", "ppo": "PPO (RM)", "grpo": "GRPO (RM)", "dpo": "DPO + RPO (comparisons)"}


def plot_frontier(points: list[dict], fits: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for m in ("bon", "ppo", "grpo", "dpo"):
        pts = sorted((p for p in points if p["method"] == m), key=lambda p: p["kl_heldout"])
        if not pts:
            continue
        ax.errorbar([0] + [p["kl_heldout"] for p in pts], [0] + [p["gold_gain"] for p in pts],
                    yerr=[0] + [p["gold_gain_se"] for p in pts], marker="o", capsize=3, color=COLOURS[m], label=NAMES[m])
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("KL to SFT of the sampled answers (nats per response)")
    ax.set_ylabel("gold reward gain over SFT (sampled)")
    ax.set_title("What each method buys for its KL (held-out prompts)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_overoptimization(points: list[dict], fits: dict, path: Path) -> None:
    """Per RM-optimising method: its proxy (RM score gain) and gold gain against sqrt(KL)."""
    import matplotlib.pyplot as plt

    shown = [m for m in ("bon", "ppo", "grpo") if any(p["method"] == m for p in points)]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.8), dpi=110, squeeze=False)
    for ax, m in zip(axes[0], shown):
        pts = sorted((p for p in points if p["method"] == m), key=lambda p: p["kl_heldout"])
        d = [0] + [math.sqrt(max(p["kl_heldout"], 0.0)) for p in pts]  # a sampled KL estimate may dip below 0
        ax.plot(d, [0] + [p["rm_gain"] for p in pts], "s--", color="grey", label="proxy: reward model")
        ax.plot(d, [0] + [p["gold_gain"] for p in pts], "o", color=COLOURS[m], label="gold")
        if fits.get(m):
            grid = np.linspace(1e-3, max(d) * 1.1, 100)
            ax.plot(grid, _curve(m, fits[m], grid), color=COLOURS[m],
                    label=f"{fits[m]['form']}, R^2 {fits[m]['r2']:.2f}")
        ax.set_xlabel("sqrt(KL to SFT)")
        ax.set_title(NAMES[m])
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("gain over SFT")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report_md(points: list[dict], fits: dict, times: dict, wall_s: float) -> str:
    lines = ["# Alignment methods side by side", "",
             "Held-out sampled answers: gold gain over SFT (paired SE) at their KL to SFT; the reward model's gain "
             "for the methods that optimise it.", "",
             "| run | KL (nats) | gold gain | RM gain | " + " | ".join(PARTS) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in PARTS) + " |"]
    for p in points:
        rm = f"{p['rm_gain']:+.3f}" if p["rm_gain"] is not None else ""
        lines.append(f"| {p['run']} | {p['kl_heldout']:.2f} | {p['gold_gain']:+.3f} +- {p['gold_gain_se']:.3f} | {rm} | "
                     + " | ".join(f"{p['parts'].get(k, float('nan')):.2f}" for k in PARTS) + " |")
    lines += ["", "Gao et al.'s forms, gold gain against d = sqrt(KL):", ""]
    for m, f in fits.items():
        if f:
            lines.append(f"- {NAMES[m]}: {f['form']}, a {f['a']}, b {f['b']}, R^2 {f['r2']} ({f['points']} points)")
    lines += ["", f"Time: {wall_s:.0f} s in all; per run: " + ", ".join(f"{k} {v} s" for k, v in times.items() if v), ""]
    return "\n".join(lines)
