"""`chatfoundry scaling`: a scaling law fitted on our own corpus, and its prediction tested.

    IsoFLOP sweep   for each compute budget C, models of several widths, each trained on the tokens
                    C buys it (D = C / FLOPs per token): an ordinary `pretrain` run in its own folder
                    under out/runs/, so a sweep resumes, and several processes can share one
                    (`--budgets` apart, the same `--out`)
    approach 2      per budget, the loss against log N as a parabola: its minimum N_opt(C); then
                    N_opt and D_opt against C as power laws, C^a and C^b (Hoffmann et al. 2022)
    approach 3      L(N, D) = E + A / N^alpha + B / D^beta fitted to every run (Huber loss on the
                    log of the loss, L-BFGS from a grid of starts), with bootstrap intervals over the
                    runs; then a = beta / (alpha + beta), b = alpha / (alpha + beta)
    prediction      one larger run (`--predict` times the largest budget) at the width the law calls
                    compute-optimal: the law's loss for it and its 90% interval over the bootstrap's
                    refitted laws, written down before it trains, against the loss it reaches

N counts the parameters outside the token and position embeddings (and a tied head), as Kaplan et
al. did; the FLOPs are `flops_per_token`'s exact count (the head and attention included), not 6N.
The models are the `neox` flavour at a fixed depth; widths set the size. Characters are the
default tokens: with a 2,048-token vocabulary the embeddings would be most of a 30K-parameter model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from chatfoundry.config import require, save_config
from chatfoundry.data import builtin
from chatfoundry.errors import UserError
from chatfoundry.models.decoder import DecoderConfig, DecoderLM, flops_per_token
from chatfoundry.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer, train_tokenizer_from_files
from chatfoundry.train import pretrain
from chatfoundry.train.stage import SUMMARY, run_once, single_process

# Hoffmann et al. (2022), approach 3: E, A, B, alpha, beta; their approaches' exponents a (N_opt) and b (D_opt).
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
CHINCHILLA_EXPONENTS = {"approach 2": (0.50, 0.50), "approach 3": (0.46, 0.54)}


# `--preset gpu`: the sweep one GPU runs in about 10 minutes (estimated, not yet measured: 54K sweep
# steps and the check's 23K at about 6 ms each; small models on a GPU are bound by steps, not FLOPs),
# 300x the default's compute, on a corpus no run repeats much (the largest D is 150M tokens).
GPU = dict(budgets=[3e13, 1e14, 3e14], widths=[64, 96, 128, 192, 256], head_dim=32, block_size=256, batch_size=32,
           eval_batches=40, corpus_chars=32_000_000)


@dataclass
class ScalingConfig:
    PRESET_KEYS = ("preset",)  # applied before the other fields (config.build_config)

    # cpu: the default sweep, about 10 minutes on 2 cores; gpu: GPU's settings (budgets, widths,
    # head_dim, block_size, batch_size, eval_batches, corpus_chars), each still a flag of its own
    preset: Literal["cpu", "gpu"] = "cpu"
    out: str = "runs/scaling"  # holds runs/ (a pretrain run per budget and width), scaling.json and the plots
    seed: int = 1337  # every run's seed
    device: str = "auto"
    log: Literal["jsonl", "tensorboard"] = "jsonl"  # tensorboard: each run's TensorBoard event files beside its metrics.jsonl
    data: list[str] = field(default_factory=list)  # text files or folders; empty: the built-in corpus
    corpus_chars: int = builtin.DEFAULT_CHARS  # size of the built-in corpus
    tokenizer: str = "char"  # the tokens every run shares: char, or bpe (a 2,048-token vocabulary)
    budgets: list[float] = field(default_factory=lambda: [1e11, 3e11, 1e12])  # training FLOPs of each swept run
    widths: list[int] = field(default_factory=lambda: [16, 32, 48, 64, 96])  # n_embd of each model size
    n_layer: int = 4  # every model's depth
    head_dim: int = 16  # heads = width / head_dim
    block_size: int = 64  # tokens per training sequence
    # Sequences per step: small, so that a run's loss depends on its tokens and not on how they are batched
    # (at 32, halving the batch at equal tokens lowered the losses 14-22%: the runs were short of steps)
    batch_size: int = 4
    lr: float = 3e-3  # peak learning rate (warmup, then cosine to a tenth, over each run's own length)
    min_steps: int = 20  # a budget must give every width at least this many steps
    predict: float = 4.0  # the checked run's budget, as a multiple of the largest swept one (0: none)
    bootstrap: int = 50  # resamples of the runs for the 90% intervals of the fitted parameters and the prediction (0: none)
    eval_batches: int = 320  # validation batches behind each run's final loss (320 x 4 x 64: 82K tokens)
    # Train these budgets' runs and stop before the fits: a share of the sweep for one process of
    # several on the same --out; a last call with every budget fits (and skips the finished runs)
    sweep_only: bool = False

    @classmethod
    def from_preset(cls, preset: str = "cpu") -> "ScalingConfig":
        require(preset in ("cpu", "gpu"), "preset", f"cpu or gpu, got {preset!r}")
        return cls(preset=preset, **(GPU if preset == "gpu" else {}))

    def validate(self) -> None:
        if not self.sweep_only:
            require(len(self.budgets) >= 3, "budgets", f"give at least 3 compute budgets, got {len(self.budgets)}")
            require(len(self.widths) >= 4, "widths", f"give at least 4 model widths, got {len(self.widths)}")
        require(all(b > 0 for b in self.budgets), "budgets", "must be > 0")
        for w in self.widths:
            require(w > 0 and w % self.head_dim == 0, "widths", f"{w} is not a multiple of head_dim {self.head_dim}")
        require(len(set(self.widths)) == len(self.widths) and len(set(self.budgets)) == len(self.budgets), "widths",
                "each width and each budget once")
        require(self.tokenizer in ("char", "bpe"), "tokenizer", f"char or bpe, got {self.tokenizer!r}")
        for name in ("n_layer", "block_size", "batch_size", "min_steps", "eval_batches"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require(self.predict == 0 or self.predict >= 1, "predict", f"0 (none) or >= 1, got {self.predict}")
        require(self.lr > 0 and self.bootstrap >= 0, "lr", "lr must be > 0 and bootstrap >= 0")


# ---------------------------------------------------------------- the sweep


def model_config(cfg: ScalingConfig, width: int, vocab: int) -> DecoderConfig:
    base = DecoderConfig.from_preset("tiny", "neox")
    heads = width // cfg.head_dim
    return replace(base, n_embd=width, n_head=heads, n_kv_head=heads, n_layer=cfg.n_layer, block_size=cfg.block_size,
                   vocab_size=vocab, preset="tiny")


def non_embedding_params(model_cfg: DecoderConfig) -> int:
    with torch.device("meta"):
        model = DecoderLM(model_cfg)
    embedding = {id(p) for name, p in model.named_parameters() if "embed" in name or "wpe" in name}
    head = getattr(model, "lm_head", None)
    if head is not None:
        embedding.add(id(head.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in embedding)


@dataclass
class Run:
    budget: float
    width: int
    params: int  # N, outside the embeddings
    flops_per_token: int
    steps: int

    @property
    def name(self) -> str:
        return f"c{self.budget:.3g}_d{self.width}"

    def tokens(self, cfg: ScalingConfig) -> int:
        return self.steps * cfg.batch_size * cfg.block_size


def plan(cfg: ScalingConfig, vocab: int, budgets: list[float], widths: list[int]) -> list[Run]:
    """The runs: for each budget and width, the steps its tokens take (at least `min_steps`)."""
    runs = []
    for budget in budgets:
        for width in widths:
            mc = model_config(cfg, width, vocab)
            fpt = flops_per_token(mc, cfg.block_size)
            steps = round(budget / fpt / (cfg.batch_size * cfg.block_size))
            if steps < cfg.min_steps:
                raise UserError(f"budgets: {budget:.3g} FLOPs give width {width} only {steps} steps (min_steps "
                                f"{cfg.min_steps}); raise the budget or drop the width")
            runs.append(Run(budget, width, non_embedding_params(mc), fpt, steps))
    return runs


def pretrain_config(cfg: ScalingConfig, run: Run, out: Path, tokenizer: Path) -> pretrain.PretrainConfig:
    p = pretrain.PretrainConfig(out=str(out / "runs" / run.name), seed=cfg.seed, device=cfg.device, log=cfg.log)
    p.data = replace(p.data, files=list(cfg.data), corpus_chars=cfg.corpus_chars)
    p.tokenizer = replace(p.tokenizer, path=str(tokenizer))
    p.model = model_config(cfg, run.width, 0)  # vocab_size 0: the tokenizer's
    p.train = replace(p.train, steps=run.steps, batch_size=cfg.batch_size, block_size=cfg.block_size, lr=cfg.lr,
                      warmup_steps=max(1, min(100, run.steps // 10)), eval_every=run.steps, save_every=run.steps,
                      eval_batches=cfg.eval_batches, log_every=max(1, run.steps // 20))
    p.sample = replace(p.sample, num_samples=0)
    return p


def train(cfg: ScalingConfig, run: Run, out: Path, tokenizer: Path, log) -> float:
    """The run's final validation loss: trained now, or read back from a finished run."""
    summary, trained = run_once(pretrain.run, pretrain_config(cfg, run, out, tokenizer), out / "runs" / run.name)
    if trained:
        log(f"  {run.name}: N {run.params:,}, D {run.tokens(cfg):,} tokens, {run.steps} steps -> val loss "
            f"{summary['val_loss']:.4f} ({summary['train_s']:.0f} s)")
    return summary["val_loss"]


def shared_tokenizer(cfg: ScalingConfig, out: Path):
    """One tokenizer for every run (so every loss is in the same units): out/tokenizer, or trained
    on the data now (saved once the sweep's plan holds)."""
    if (out / "tokenizer" / "tokenizer.json").is_file():
        return load_tokenizer(out / "tokenizer")
    return (train_tokenizer_from_files(cfg.data, cfg.tokenizer, 2048) if cfg.data else
            train_tokenizer(iter([builtin.generate_corpus(cfg.corpus_chars)]), cfg.tokenizer, 2048))


# ---------------------------------------------------------------- the fits


def fit_law(N: np.ndarray, D: np.ndarray, L: np.ndarray, starts: np.ndarray | None = None, keep: int = 16) -> dict:
    """E + A / N^alpha + B / D^beta by Huber loss (delta 1e-3) on log L, as Hoffmann et al. fit it:
    every start (rows of log A, log B, log E, alpha, beta; default a grid) is scored, and the `keep`
    best are each refined with L-BFGS; the lowest wins."""
    if starts is None:
        grid = np.meshgrid(np.arange(0, 25, 5.0), np.arange(0, 25, 5.0), np.arange(-1, 1.5, 0.5),
                           np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5), indexing="ij")
        starts = np.stack([g.ravel() for g in grid], 1)
    logN, logD, logL = (torch.tensor(np.log(x), dtype=torch.float64) for x in (N, D, L))

    def objective(theta: torch.Tensor) -> torch.Tensor:  # (starts, 5) -> (starts,)
        a, b, e, alpha, beta = theta.unbind(-1)
        pred = torch.logsumexp(torch.stack([a[:, None] - alpha[:, None] * logN, b[:, None] - beta[:, None] * logD,
                                            e[:, None].expand(-1, len(logL))]), 0)
        return torch.nn.functional.huber_loss(pred, logL.expand_as(pred), delta=1e-3, reduction="none").sum(1)

    scores = objective(torch.tensor(starts, dtype=torch.float64))
    best, best_loss = None, float("inf")
    for i in torch.argsort(scores)[:keep].tolist():
        theta = torch.tensor(starts[i:i + 1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=300, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = objective(theta).sum()
            loss.backward()
            return loss

        opt.step(closure)
        loss = float(objective(theta.detach()))
        if math.isfinite(loss) and loss < best_loss:
            best, best_loss = theta.detach()[0].tolist(), loss
    a, b, e, alpha, beta = best
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def law(p: dict, N, D):
    return p["E"] + p["A"] / np.asarray(N, float) ** p["alpha"] + p["B"] / np.asarray(D, float) ** p["beta"]


def optimum(p: dict) -> dict:
    """Approach 3's compute-optimal exponents, and G with N_opt = G (C / 6)^a, D_opt = (C / 6)^b / G."""
    s = p["alpha"] + p["beta"]
    a, b = p["beta"] / s, p["alpha"] / s
    G = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / s)
    return {"a": a, "b": b, "G": G}


def isoflop(runs: list[Run], losses: list[float]) -> dict:
    """Approach 2: per budget, a parabola of the loss in log N (over the five sizes around the lowest)
    and its minimum; then log N_opt and
    log D_opt (D_opt = C / FLOPs per token at N_opt, read off the runs) against log C."""
    minima = []
    for budget in sorted({r.budget for r in runs}):
        mine = sorted(((r, x) for r, x in zip(runs, losses) if r.budget == budget), key=lambda p: p[0].params)
        logn, y = np.log([r.params for r, _ in mine]), np.array([x for _, x in mine])
        lo = min(max(int(y.argmin()) - 2, 0), max(len(y) - 5, 0))
        near = slice(lo, lo + 5)
        c2, c1, c0 = np.polyfit(logn[near], y[near], 2)  # the five sizes around the lowest loss: a parabola is local
        inside = c2 > 0 and logn.min() <= -c1 / (2 * c2) <= logn.max()
        best = -c1 / (2 * c2) if inside else logn[y.argmin()]
        fpt = np.exp(np.interp(best, logn, np.log([r.flops_per_token for r, _ in mine])))
        minima.append({"budget": budget, "n_opt": float(np.exp(best)), "d_opt": float(budget / fpt),
                       "loss": float(np.polyval([c2, c1, c0], best)), "parabola": [c2, c1, c0], "inside": bool(inside)})
    logc = np.log([m["budget"] for m in minima])
    a = np.polyfit(logc, np.log([m["n_opt"] for m in minima]), 1)[0]
    b = np.polyfit(logc, np.log([m["d_opt"] for m in minima]), 1)[0]
    return {"a": float(a), "b": float(b), "minima": minima}


def bootstrap(runs: list[Run], losses: list[float], cfg: ScalingConfig, best: dict) -> tuple[dict, list[dict]]:
    """90% intervals of the law's parameters and exponents over resamples of the runs, each refitted
    from the full fit and a few grid starts around it; and the refitted laws (the prediction's interval)."""
    rng = np.random.default_rng(cfg.seed)
    N, D, L = (np.array(v, float) for v in ([r.params for r in runs], [r.tokens(cfg) for r in runs], losses))
    at = np.array([math.log(max(best[k], 1e-12)) for k in ("A", "B", "E")] + [best["alpha"], best["beta"]])
    starts = np.stack([at, at + [2, 2, 0, 0.2, 0.2], [5, 5, 0, 0.5, 0.5]])
    draws = []
    for _ in range(cfg.bootstrap):
        i = rng.integers(0, len(L), len(L))
        p = fit_law(N[i], D[i], L[i], starts)
        draws.append({**p, **{k: optimum(p)[k] for k in ("a", "b")}})
    intervals = {k: [round(float(np.percentile([d[k] for d in draws], q)), 4) for q in (5, 95)] for k in draws[0]} if draws else {}
    return intervals, draws


# ---------------------------------------------------------------- the command


def run(cfg: ScalingConfig, overwrite: bool = False, log=print) -> dict:
    """Sweep, fit, predict and check; returns the summary `--json` prints."""
    t0 = time.perf_counter()
    single_process("scaling")
    cfg.validate()
    out = Path(cfg.out)
    if overwrite and out.exists():
        for done in out.glob(f"runs/*/{SUMMARY}"):
            done.unlink()
        (out / "prediction.json").unlink(missing_ok=True)
    tok = shared_tokenizer(cfg, out)
    vocab, tokenizer = tok.get_vocab_size(), out / "tokenizer"
    runs = plan(cfg, vocab, sorted(cfg.budgets), sorted(cfg.widths))  # a bad budget stops here, before any file
    out.mkdir(parents=True, exist_ok=True)
    if not (tokenizer / "tokenizer.json").is_file():
        save_tokenizer(tok, tokenizer)
    save_config(cfg, out / "config.yaml")
    log(f"scaling: {len(runs)} runs, budgets {', '.join(f'{b:.3g}' for b in sorted(cfg.budgets))} FLOPs, widths "
        f"{', '.join(map(str, sorted(cfg.widths)))}, {vocab} tokens; {sum(r.budget for r in runs):.3g} FLOPs in all")
    losses = [train(cfg, r, out, tokenizer, log) for r in runs]
    table = [{"name": r.name, "budget": r.budget, "width": r.width, "params": r.params, "tokens": r.tokens(cfg),
              "val_loss": round(x, 5)} for r, x in zip(runs, losses)]
    if cfg.sweep_only:
        return {"out": str(out), "runs": table, "wall_s": round(time.perf_counter() - t0, 1)}

    N, D, L = (np.array(v, float) for v in ([r.params for r in runs], [r.tokens(cfg) for r in runs], losses))
    params = fit_law(N, D, L)
    opt = optimum(params)
    iso = isoflop(runs, losses)
    intervals, draws = bootstrap(runs, losses, cfg, params)
    result = {"out": str(out), "runs": table, "fit": {k: round(v, 5) for k, v in params.items()}, "fit_intervals": intervals,
              "optimal": {"a": round(opt["a"], 4), "b": round(opt["b"], 4)},
              "isoflop": {"a": round(iso["a"], 4), "b": round(iso["b"], 4),
                          "minima": [{k: v for k, v in m.items() if k != "parabola"} for m in iso["minima"]]},
              "chinchilla": {"approach 2": CHINCHILLA_EXPONENTS["approach 2"], "approach 3": CHINCHILLA_EXPONENTS["approach 3"]}}
    top = max(cfg.budgets)
    result["tokens_per_param"] = round(float((top / 6) ** opt["b"] / opt["G"] / (opt["G"] * (top / 6) ** opt["a"])), 2)
    log(f"fit: L = {params['E']:.3f} + {params['A']:.3g} / N^{params['alpha']:.3f} + {params['B']:.3g} / "
        f"D^{params['beta']:.3f}; compute-optimal N ~ C^{opt['a']:.3f}, D ~ C^{opt['b']:.3f} (approach 3), "
        f"C^{iso['a']:.3f} and C^{iso['b']:.3f} (approach 2); Chinchilla 0.46 / 0.54 and 0.50 / 0.50")
    if cfg.predict:
        result["prediction"] = predict(cfg, params, opt, vocab, out, tokenizer, log, draws)
    plot(runs, losses, iso, params, opt, result.get("prediction"), cfg, out)
    result["figures"] = [str(out / f) for f in ("isoflop.png", "law.png", "optimal.png")]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    return result


def predict(cfg: ScalingConfig, params: dict, opt: dict, vocab: int, out: Path, tokenizer: Path, log,
            draws: list[dict] = ()) -> dict:
    """The law's loss for a run `predict` times the largest budget at its compute-optimal width
    (the nearest multiple of head_dim), and its 90% interval over the bootstrap's refitted laws,
    written to prediction.json before the run trains."""
    budget = cfg.predict * max(cfg.budgets)
    target = opt["G"] * (budget / 6) ** opt["a"]
    candidates = range(cfg.head_dim, 64 * cfg.head_dim + 1, cfg.head_dim)
    width = min(candidates, key=lambda w: abs(math.log(non_embedding_params(model_config(cfg, w, vocab)) / target)))
    (run_,) = plan(replace(cfg, min_steps=1), vocab, [budget], [width])
    predicted = float(law(params, run_.params, run_.tokens(cfg)))
    spread = [float(law(d, run_.params, run_.tokens(cfg))) for d in draws]
    interval = [round(float(np.percentile(spread, q)), 5) for q in (5, 95)] if spread else None
    (out / "prediction.json").write_text(json.dumps({"run": run_.name, "predicted_loss": predicted, "interval": interval},
                                                    indent=1))
    log(f"prediction: {budget:.3g} FLOPs at width {width} (N {run_.params:,}, D {run_.tokens(cfg):,}): the law "
        f"says {predicted:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "") + "; training it")
    actual = train(cfg, run_, out, tokenizer, log)
    rel = abs(predicted - actual) / actual
    inside = interval is not None and interval[0] <= actual <= interval[1]
    log(f"prediction: {predicted:.4f}, actual {actual:.4f}: {rel:.2%} off" +
        (f"; {'inside' if inside else 'outside'} the law's 90% interval" if interval else ""))
    return {"budget": budget, "width": width, "params": run_.params, "tokens": run_.tokens(cfg),
            "predicted_loss": round(predicted, 5), "actual_loss": round(actual, 5), "rel_error": round(rel, 5),
            "interval": interval, "inside_interval": inside if interval else None}


def plot(runs, losses, iso, params, opt, prediction, cfg, out: Path) -> None:
    import matplotlib.pyplot as plt

    budgets = sorted({r.budget for r in runs})
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(budgets)))
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    for c, budget, m in zip(colors, budgets, iso["minima"]):
        pts = sorted((r.params, x) for r, x in zip(runs, losses) if r.budget == budget)
        ax.plot(*zip(*pts), "o", color=c, label=f"C = {budget:.2g}")
        grid = np.linspace(np.log(pts[0][0]), np.log(pts[-1][0]), 50)
        ax.plot(np.exp(grid), np.polyval(m["parabola"], grid), "-", color=c, alpha=0.6)
        ax.plot(m["n_opt"], m["loss"], "*", color=c, markersize=12)
    if prediction:
        ax.plot(prediction["params"], prediction["actual_loss"], "rs", label="the larger run (actual)")
        ax.plot(prediction["params"], prediction["predicted_loss"], "rx", markersize=10, label="its prediction")
    ax.set(xscale="log", xlabel="parameters N (outside the embeddings)", ylabel="validation loss",
           title="IsoFLOP curves and their minima")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "isoflop.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    fitted = law(params, [r.params for r in runs], [r.tokens(cfg) for r in runs])
    ax.plot(losses, fitted, "o", label="swept runs")
    if prediction:
        iv = prediction.get("interval")  # it need not hold the prediction: a few resamples may all miss it
        ax.plot([prediction["actual_loss"]], [prediction["predicted_loss"]], "rs",
                label="the larger run" + (" (the law's 90% interval)" if iv else ""))
        if iv:
            ax.vlines(prediction["actual_loss"], *iv, colors="r")
    shown = losses + list(fitted) + ([prediction["actual_loss"], prediction["predicted_loss"]] if prediction else [])
    lo, hi = min(shown) * 0.98, max(shown) * 1.02
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel="actual validation loss", ylabel="L(N, D) fitted",
           title=f"L = {params['E']:.2f} + {params['A']:.3g}/N^{params['alpha']:.2f} + {params['B']:.3g}/D^{params['beta']:.2f}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "law.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    c = np.geomspace(min(budgets) / 3, max(budgets) * max(cfg.predict, 1) * 3, 50)
    ch = optimum(CHINCHILLA)
    for ax, key, ours3, chin, name in ((axes[0], "n_opt", opt["G"] * (c / 6) ** opt["a"], ch["G"] * (c / 6) ** ch["a"], "N_opt"),
                                       (axes[1], "d_opt", (c / 6) ** opt["b"] / opt["G"], (c / 6) ** ch["b"] / ch["G"], "D_opt")):
        ax.plot([m["budget"] for m in iso["minima"]], [m[key] for m in iso["minima"]], "o", label="IsoFLOP minima (approach 2)")
        ax.plot(c, ours3, "-", label="our law (approach 3)")
        ax.plot(c, chin, "--", label="Chinchilla's law (Hoffmann et al.)")
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=name, title=f"{name}(C)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "optimal.png")
    plt.close(fig)


def format_result(r: dict) -> str:
    """The fit, the exponents and the prediction as text ("" for --sweep_only, which fits nothing)."""
    if "fit" not in r:
        return ""
    f, iv = r["fit"], r.get("fit_intervals", {})

    def ci(k):
        return f" [{iv[k][0]:.3g}, {iv[k][1]:.3g}]" if k in iv else ""

    lines = [f"E {f['E']:.4g}{ci('E')}, A {f['A']:.4g}{ci('A')}, B {f['B']:.4g}{ci('B')}, alpha {f['alpha']:.3f}"
             f"{ci('alpha')}, beta {f['beta']:.3f}{ci('beta')}",
             f"a {r['optimal']['a']:.3f}{ci('a')}, b {r['optimal']['b']:.3f}{ci('b')} (approach 3; Chinchilla 0.46, 0.54); "
             f"a {r['isoflop']['a']:.3f}, b {r['isoflop']['b']:.3f} (approach 2; Chinchilla 0.50, 0.50); "
             f"{r['tokens_per_param']:g} tokens per parameter at the largest swept budget"]
    if "prediction" in r:
        p = r["prediction"]
        iv = p.get("interval")
        lines.append(f"prediction at {p['budget']:.3g} FLOPs: {p['predicted_loss']:.4f}"
                     + (f" (90% interval [{iv[0]:.4f}, {iv[1]:.4f}])" if iv else "")
                     + f", actual {p['actual_loss']:.4f} ({p['rel_error']:.2%} off"
                     + (f"; {'inside' if p['inside_interval'] else 'outside'} the interval)" if iv else ")"))
    return "\n".join(lines)
