"""`chatfoundry pipeline`: the whole ChatGPT recipe on the built-in task world, one command.

    out/pretrain  tokenizer + causal-LM pretraining on the built-in corpus
    out/sft       supervised finetuning on the world's conversations
    out/label     K samples per prompt from the SFT model, ranked by the simulated labeler
    out/rm        the reward model
    out/ppo       RLHF with PPO against the reward model (held-out eval of SFT and PPO inside)
    out/calibrate does each stage's model know what it does not know? calibration of the base,
                  SFT and PPO models on multiple choice (and DPO's, where `out/dpo` holds a run),
                  and their hallucinations on made-up countries
    out/report.md the scores per family and stage, RM accuracy, PPO curves, win rates, the
                  proxy-vs-gold picture and sample conversations; report_*.png beside it

Each stage is the same `run` its own command calls, with its folder under `out`. A stage whose
folder holds `summary.json` is done and is skipped; one that was cut short starts again from
its last checkpoint (or from the beginning when it has none), so an interrupted pipeline resumes.
Any stage's setting is a flag: `--pretrain.train.steps 1200`, `--ppo.iterations 20`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from chatfoundry import checkpoint as ckpt
from chatfoundry.config import save_config
from chatfoundry.data.world import PARTS
from chatfoundry.errors import UserError
from chatfoundry.eval import calibration
from chatfoundry.metrics import plot_bars, read_metrics
from chatfoundry.train import label, ppo, pretrain, reward, sft
from chatfoundry.train.stage import SUMMARY, single_process

WIRED = "<pipeline>"  # a stage's input and output folders, set by the pipeline from `out`


@dataclass
class PipelineConfig:
    out: str = "runs/pipeline"  # holds a folder per stage (each stage's out is set to it), config.yaml, report.md
    seed: int = 1337  # every stage's seed
    device: str = "auto"  # every stage's device
    log: Literal["jsonl", "tensorboard"] = "jsonl"  # every stage's: tensorboard writes TensorBoard event files too
    pretrain: pretrain.PretrainConfig = field(default_factory=pretrain.PretrainConfig)
    sft: sft.SFTConfig = field(default_factory=lambda: sft.SFTConfig(init=WIRED))
    label: label.LabelConfig = field(default_factory=lambda: label.LabelConfig(init=WIRED))
    rm: reward.RMConfig = field(default_factory=lambda: reward.RMConfig(
        init=WIRED, data=reward.RMDataConfig(files=[WIRED])))
    ppo: ppo.PPOConfig = field(default_factory=lambda: ppo.PPOConfig(init=WIRED, reward=f"rm:{WIRED}"))
    calibrate: calibration.CalibrateConfig = field(default_factory=lambda: calibration.CalibrateConfig(
        base=[WIRED], ckpt=[WIRED]))


def stage_configs(cfg: PipelineConfig) -> dict:
    """Each stage's config, wired to the folders before it (in, out, seed, device)."""
    out = Path(cfg.out)
    folder = {name: str(out / name) for name in ("pretrain", "sft", "label", "rm", "ppo", "calibrate", "dpo")}
    cfg.pretrain.out = folder["pretrain"]
    cfg.sft.init, cfg.sft.out = folder["pretrain"], folder["sft"]
    cfg.label.init, cfg.label.out = folder["sft"], folder["label"]
    cfg.rm.init, cfg.rm.out, cfg.rm.data.files = folder["sft"], folder["rm"], [folder["label"]]
    cfg.ppo.init, cfg.ppo.reward, cfg.ppo.out = folder["sft"], f"rm:{folder['rm']}", folder["ppo"]
    # A DPO run the user put in out/dpo (`chatfoundry dpo --init out/sft --data out/label --out out/dpo`) is measured too.
    dpo = ["dpo"] if (out / "dpo" / ckpt.CHECKPOINT).is_dir() else []
    cfg.calibrate.out, cfg.calibrate.base, cfg.calibrate.names = folder["calibrate"], [folder["pretrain"]], \
        ["base", "sft", "ppo", *dpo]
    cfg.calibrate.ckpt = [folder["sft"], folder["ppo"], *(folder[d] for d in dpo)]
    stages = {"pretrain": (cfg.pretrain, pretrain.run), "sft": (cfg.sft, sft.run), "label": (cfg.label, label.run),
              "rm": (cfg.rm, reward.run), "ppo": (cfg.ppo, ppo.run), "calibrate": (cfg.calibrate, calibration.run)}
    for stage_cfg, _ in stages.values():
        stage_cfg.seed, stage_cfg.device, stage_cfg.log = cfg.seed, cfg.device, cfg.log
    return stages


def _start(folder: Path) -> tuple[bool, bool]:
    """(resume, overwrite) for a stage that is not done: go on from a checkpoint, else start over."""
    try:
        ckpt.load_trainer_state(folder)
        return True, False
    except UserError:
        return False, folder.exists()


def run(cfg: PipelineConfig, overwrite: bool = False, log=print) -> dict:
    """Run (or finish) every stage, then write the report; returns the summary `--json` prints."""
    t0 = time.perf_counter()
    single_process("pipeline")  # label and ppo run in one process; run the DDP stages on their own
    out = Path(cfg.out)
    stages = stage_configs(cfg)
    if overwrite and out.exists():
        for stage_cfg, _ in stages.values():
            (Path(stage_cfg.out) / SUMMARY).unlink(missing_ok=True)
    for name in ("label", "ppo"):  # its report reads the world's gold reward; run the stages for a prompt file
        if stages[name][0].prompts != "world":
            raise UserError(f"{name}.prompts: the pipeline runs on the built-in world; run `chatfoundry label` and "
                            f"`chatfoundry ppo` with --prompts {stages[name][0].prompts} instead")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    summaries, walls = {}, {}
    for n, (name, (stage_cfg, stage_run)) in enumerate(stages.items(), 1):
        folder = Path(stage_cfg.out)
        done = folder / SUMMARY
        if done.is_file() and not overwrite and not walls:
            summaries[name] = json.loads(done.read_text())
            log(f"[{n}/{len(stages)}] {name}: done, skipped ({folder})")
            continue
        # A stage after one that ran here starts over: what it read has changed.
        resume, again = (False, folder.exists()) if overwrite or walls else _start(folder)
        log(f"[{n}/{len(stages)}] {name}: " + ("resuming" if resume else "running") + f" -> {folder}")
        started = time.perf_counter()
        if name in ("label", "calibrate"):  # no checkpoint: always from the start
            summary = stage_run(stage_cfg, overwrite=again or overwrite, log=log)
        else:
            summary = stage_run(stage_cfg, resume=resume, overwrite=not resume and (again or overwrite), log=log)
        walls[name] = round(time.perf_counter() - started, 1)
        summary["pipeline_wall_s"] = walls[name]
        done.write_text(json.dumps(summary, indent=1))
        summaries[name] = summary
    result = {"out": str(out), "stages": stage_summaries(summaries), "report": str(out / "report.md")}
    write_report(out, summaries)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    log(f"report: {out / 'report.md'}\nchat with the result: chatfoundry chat --ckpt {out / 'ppo'}")
    return result


def stage_summaries(s: dict) -> dict:
    """The headline numbers per stage (the `--json` summary's "stages")."""
    out = {"pretrain": {k: s["pretrain"].get(k) for k in ("val_loss", "params")},
           "sft": {"gold_reward": s["ppo"].get("sft_gold_reward"),
                   "gold_reward_sampled": s["ppo"].get("sft_gold_reward_sampled"),
                   # The demonstrations themselves, by the gold reward SFT never sees.
                   "data_gold_reward": s["sft"].get("data", {}).get("gold_reward"),
                   "val_loss": s["sft"].get("val_loss"), "tool_use": s["sft"].get("tool_use")},
           "label": {"comparisons": s["label"]["splits"]["train"]["comparisons"],
                     "sft_gold_reward_sampled": s["label"]["splits"]["train"]["sft_gold_reward"]},
           "rm": {**{k: s["rm"].get(k) for k in ("pairwise_accuracy", "spearman_within", "spearman_gold",
                                                  "best_of_k_gold_gain", "label_accuracy")},
                  # The same held-out pairs ordered by the SFT model's own log-likelihood.
                  "loglik_baseline": {k: v for k, v in s["rm"].get("loglik_baseline", {}).items()
                                      if k in ("pairwise_accuracy", "spearman_within", "spearman_gold")}},
           # Best-of-n of SFT's samples by the reward model, scored in PPO's evaluation.
           "bon": {"gold_reward": {str(b["n"]): b["gold_reward"] for b in s["ppo"].get("best_of_n", [])},
                   "gold_gain": {str(b["n"]): b["gold_gain"] for b in s["ppo"].get("best_of_n", [])},
                   "kl": {str(b["n"]): b["kl"] for b in s["ppo"].get("best_of_n", [])}},
           "ppo": {k: s["ppo"].get(k) for k in ("gold_reward", "gold_reward_se", "gold_gain", "gold_gain_se", "kl",
                                                 "kl_budget", "kl_heldout", "rm_reward", "win_rate_rm", "win_rate_gold",
                                                 "gold_reward_sampled", "gold_gain_sampled", "gold_gain_sampled_se")}}
    out["calibrate"] = {c["name"]: {**{k: c.get(k) for k in ("accuracy", "ece", "ece_ci", "brier", "mean_confidence",
                                                           "temperature")},
                                    "ece_scaled": c["scaled"]["ece"], "ece_change": c.get("change", {}).get("ece"),
                                    **({"real_confident_wrong": h["answerable"]["confident_wrong"],
                                        "real_abstain": h["answerable"]["abstain"],
                                        "made_up_states_value": h["made_up"]["confident_wrong"]}
                                       if (h := c.get("hallucination")) else {})}
                        for c in s["calibrate"]["checkpoints"]} if "calibrate" in s else {}
    # The SFT model sampled cooler with no reward model: the gain sharpening alone gives, and its KL.
    out["ppo"]["sft_tempered"] = [{k: t[k] for k in ("temperature", "gold_gain_sampled", "kl_heldout")}
                                  for t in s["ppo"].get("sft_tempered", [])]
    for name, summary in s.items():
        out[name]["wall_s"] = summary.get("pipeline_wall_s", summary.get("wall_s"))
    return out


# ---------------------------------------------------------------- the report


def _tool_use(sft: dict) -> str:
    t = sft.get("tool_use")
    return (f"; arithmetic exact match with the calculator vs without: {t['with_tool']:.2f} vs {t['without_tool']:.2f} "
            f"(numbers up to 999), {t['small']['with_tool']:.2f} vs {t['small']['without_tool']:.2f} (0..12)" if t else "")


def _crowd(sft: dict) -> str:
    d = sft.get("data")
    return (f"; demonstrations' gold reward {d['gold_reward']:.3f} (" + ", ".join(
        f"{w} {x['share']:.0%} {x['gold_reward']:.2f}" for w, x in d["writers"].items()) + ")" if d else "")


def write_report(out: Path, s: dict) -> None:
    """report.md, report_scores.png (per family and stage) and report_overoptimization.png."""
    ev = json.loads((out / "ppo" / "eval.json").read_text()) if (out / "ppo" / "eval.json").is_file() else None
    lines = ["# chatfoundry pipeline report", "",
             "| stage | wall (s) | result |", "| --- | --- | --- |",
             f"| pretrain | {_wall(s['pretrain'])} | validation loss {s['pretrain'].get('val_loss', 0):.3f}, "
             f"{s['pretrain'].get('params', 0):,} parameters |",
             f"| sft | {_wall(s['sft'])} | validation loss {s['sft'].get('val_loss') or 0:.3f}{_crowd(s['sft'])}"
             f"{_tool_use(s['sft'])} |",
             f"| label | {_wall(s['label'])} | {s['label']['splits']['train']['comparisons']:,} comparisons |",
             f"| rm | {_wall(s['rm'])} | held-out pairwise accuracy {s['rm'].get('pairwise_accuracy')}, Spearman with "
             f"gold {s['rm'].get('spearman_within')} within a prompt ({s['rm'].get('spearman_gold')} pooled), "
             f"best-of-K gold gain {s['rm'].get('best_of_k_gold_gain')}"
             + (f" (the SFT model's own log-likelihood orders the same pairs {b['pairwise_accuracy']}, Spearman "
                f"{b.get('spearman_within')} within a prompt)" if (b := s['rm'].get('loglik_baseline')) and
                'spearman_gold' in b else "")
             + " |",
             f"| ppo | {_wall(s['ppo'])} | KL to SFT {s['ppo'].get('kl')} nats in training (the last fifth)"
             + (f", {s['ppo']['kl_heldout']} on held-out prompts" if s['ppo'].get('kl_heldout') is not None else "")
             + f" (budget {s['ppo'].get('kl_budget')}) |"]
    if "calibrate" in s:
        lines.append(f"| calibrate | {_wall(s['calibrate'])} | ECE on multiple choice: " + ", ".join(
            f"{c['name']} {c['ece']:.3f}" for c in s["calibrate"]["checkpoints"]) + " |")
    lines.append("")
    if ev:
        lines += ["## Held-out test prompts (greedy answers)", "",
                  f"Gold reward SFT {ev['sft_gold_reward']:.3f} ± {ev['sft_gold_reward_se']:.3f} -> PPO "
                  f"{ev['gold_reward']:.3f} ± {ev['gold_reward_se']:.3f} (gain {ev['gold_gain']:+.3f} ± "
                  f"{ev['gold_gain_se']:.3f}, paired). Reward model: {ev['sft_rm_reward']:+.3f} -> {ev['rm_reward']:+.3f}. "
                  f"PPO beats SFT on {ev['win_rate_rm']:.0%} of prompts by the reward model, "
                  f"{ev['win_rate_gold']:.0%} by the gold reward (ties count half).", ""]
        if "gold_gain_sampled" in ev:
            lines += [f"Sampled answers ({ev['samples']} per prompt as in training: the policy PPO optimises): "
                      f"gold reward SFT {ev['sft_gold_reward_sampled']:.3f} -> PPO {ev['gold_reward_sampled']:.3f} (gain "
                      f"{ev['gold_gain_sampled']:+.3f} ± {ev['gold_gain_sampled_se']:.3f}, paired), at "
                      f"{ev['kl_heldout']:.2f} nats from SFT."
                      + "".join(f" SFT itself sampled at temperature {t['temperature']:g}, with no reward model: gain "
                                f"{t['gold_gain_sampled']:+.3f} ± {t['gold_gain_sampled_se']:.3f} at {t['kl_heldout']:.2f} nats."
                                for t in ev.get("sft_tempered", [])), ""]
        lines += _stage_table(s["sft"].get("data"), ev)
        lines += ["| family | SFT exact match | PPO exact match | SFT gold reward | PPO gold reward |",
                  "| --- | --- | --- | --- | --- |"]
        for f, p in ev["families"].items():
            q = ev["sft_families"][f]
            lines.append(f"| {f} | {q['exact_match']:.2f} | {p['exact_match']:.2f} | {q['gold_reward']:.3f} | "
                         f"{p['gold_reward']:.3f} |")
        _plot_scores(ev, out / "report_scores.png")
        lines += ["", "![scores](report_scores.png)", "", "![PPO](ppo/ppo.png)", ""]
    records = read_metrics(out / "ppo" / "metrics.jsonl") if (out / "ppo" / "metrics.jsonl").is_file() else []
    if records:
        _plot_overoptimization(records, out / "report_overoptimization.png")
        lines += ["## Proxy and gold reward as the policy moves away from SFT", "",
                  "The reward model is a proxy for the gold reward it never sees. Past some KL, pushing the",
                  "proxy up stops helping (or starts hurting) the gold reward: reward over-optimization.", "",
                  "![over-optimization](report_overoptimization.png)", ""]
    lines += ["## Reward model", "", "![rewards](rm/rewards.png)", ""]
    if "calibrate" in s:
        lines += _calibration(s["calibrate"])
    if ev:
        lines += ["## Sample conversations (held-out prompts)", ""]
        changed = [a for a in ev["answers"] if a["response"] != a["sft_response"]][:6] or ev["answers"][:6]
        for a in changed:
            lines += [f"**User:** {a['prompt']}  ", f"**SFT:** {a['sft_response']} *(gold {a['sft_gold_reward']:.2f})*  ",
                      f"**PPO:** {a['response']} *(gold {a['gold_reward']:.2f})*", ""]
    lines += ["Chat with the result:", "", "```bash", f"chatfoundry chat --ckpt {out / 'ppo'}", "```", ""]
    (out / "report.md").write_text("\n".join(lines))


def _calibration(c: dict) -> list[str]:
    """Does each stage's model know what it does not know? (eval/calibration.py)"""
    return ["## Does the model know what it does not know?", "",
            f"Held-out multiple-choice questions ({c['split']} split): each model's probability of each option, "
            "renormalised over the options; the base model asked in its corpus' quiz form, the chat models in their "
            "chat template. GPT-4's report found its pretrained model calibrated (ECE "
            f"{calibration.GPT4['pretrained']}) and its model after PPO not ({calibration.GPT4['after PPO']}); "
            "these are this run's figures. T is the temperature fitted on the validation split, and ECE at T "
            "the test split's after it.", "", calibration.format_table(c), "",
            "![reliability](calibrate/reliability.png)", "", "![hallucination](calibrate/hallucination.png)", ""]


def _stage_table(data: dict | None, ev: dict) -> list[str]:
    """The gold reward and its parts, stage by stage: what each stage changed."""
    rows = []  # (stage, answers, gold, gain over SFT (paired, same decoding) or "", KL or "", parts)
    if data:
        rows.append(("SFT data", "the crowd's demonstrations (train split)", data["gold_reward"], "", "", data["parts"]))
    rows += [("SFT", "greedy", ev["sft_gold_reward"], "", "0", ev["sft_parts"])]
    if "gold_gain_sampled" in ev:
        rows.append(("SFT", f"sampled ({ev['samples']} per prompt)", ev["sft_gold_reward_sampled"], "", "0",
                     ev["sft_parts_sampled"]))
        rows += [(f"best-of-{b['n']} (SFT's samples, by the RM)", "sampled", b["gold_reward"],
                  f"{b['gold_gain']:+.3f} ± {b['gold_gain_se']:.3f}", f"{b['kl']:.2f}", b["parts"])
                 for b in ev.get("best_of_n", [])]
        rows += [(f"SFT at temperature {t['temperature']:g} (no RM)", "sampled", t["gold_reward_sampled"],
                  f"{t['gold_gain_sampled']:+.3f} ± {t['gold_gain_sampled_se']:.3f}", f"{t['kl_heldout']:.2f}", t["parts"])
                 for t in ev.get("sft_tempered", [])]
    rows.append(("PPO", "greedy", ev["gold_reward"], f"{ev['gold_gain']:+.3f} ± {ev['gold_gain_se']:.3f}", "",
                 ev["parts"]))
    if "gold_gain_sampled" in ev:
        rows.append(("PPO", "sampled", ev["gold_reward_sampled"],
                     f"{ev['gold_gain_sampled']:+.3f} ± {ev['gold_gain_sampled_se']:.3f}", f"{ev['kl_heldout']:.2f}",
                     ev["parts_sampled"]))
    lines = ["## What each stage changed", "",
             "The gold reward (hidden from every learner) and its parts on the held-out test prompts: content "
             "(1 right, 0.25 for admitting ignorance of an answerable question), how often an answer abstains, "
             "and the shares that are full sentences, concise and polite. Gains are paired over SFT's answers "
             "of the same kind; KL is to SFT in nats per response (best-of-n: log n - (n - 1) / n).", "",
             "| stage | answers | gold | gain over SFT | KL | " + " | ".join(PARTS) + " |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in PARTS) + " |"]
    for stage, answers, gold, gain, kl, parts in rows:
        lines.append(f"| {stage} | {answers} | {gold:.3f} | {gain} | {kl} | "
                     + " | ".join(f"{parts[k]:.2f}" for k in PARTS) + " |")
    return lines + [""]


def _wall(summary: dict) -> str:
    wall = summary.get("pipeline_wall_s", summary.get("wall_s"))
    return f"{wall:.0f}" if isinstance(wall, (int, float)) else "-"


def _plot_scores(ev: dict, path: Path) -> None:
    names = list(ev["families"])
    series = {f"{stage} {what}": [source[n][key] for n in names]
              for what, key in (("exact match", "exact_match"), ("gold reward", "gold_reward"))
              for stage, source in (("SFT", ev["sft_families"]), ("PPO", ev["families"]))}
    plot_bars(names, series, path, ["exact match on held-out test prompts", "gold reward on held-out test prompts"],
              panels=2)


def _plot_overoptimization(records: list[dict], path: Path, bins: int = 6) -> None:
    """RM and gold reward of the rollouts against their KL to the reference: each iteration a dot,
    and the means over KL bins of equal counts a line (one batch's rewards are noisy)."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = sorted(records, key=lambda r: r["kl"])
    kl = np.array([r["kl"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    ax2 = ax.twinx()
    for axis, key, color, name in ((ax, "rm_reward", "tab:blue", "reward model (proxy, optimised)"),
                                    (ax2, "gold_reward", "tab:orange", "gold reward (hidden)")):
        y = np.array([r[key] for r in rows])
        axis.scatter(kl, y, s=8, color=color, alpha=0.35)
        groups = [g for g in np.array_split(np.arange(len(rows)), min(bins, len(rows))) if len(g)]
        axis.plot([kl[g].mean() for g in groups], [y[g].mean() for g in groups], color=color, marker="o", label=name)
        axis.set_ylabel(name, color=color)
    ax.set_xlabel("KL(policy || SFT), nats per response")
    ax.set_title("Proxy vs gold reward as KL grows")
    fig.legend(loc="upper left", bbox_to_anchor=(0.1, 0.88), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
