"""Time per PPO iteration (generation, scoring, optimisation): `chatfoundry ppo` against TRL's PPO.

    python benchmarks/ppo_step.py --sft runs/demo/sft --rm runs/demo/rm --trl_python /tmp/trl-venv/bin/python

The peer is TRL 0.11.4's PPOv2Trainer, the last TRL with a PPO trainer, and the one built like
ours: policy, frozen reference, a separate value model initialised from the reward model, a
frozen reward model (TRL's older PPOTrainer shares one body between policy and value: less work).
It lives in its own venv (`benchmarks/requirements-trl.txt`: trl 0.11.4 needs transformers 4.46),
so each side runs in a child process of its own Python; rounds alternate ours / theirs.

Same work on both sides: the same weights (our SFT and RM checkpoints load in transformers as
GPT2LMHeadModel / GPT2ForSequenceClassification), the same prompts (world train split, left-padded
for TRL), batch 64, at most 32 response tokens, temperature 1, 4 PPO epochs of 4 minibatches of
16 (ours with the approx-KL early stop off), AdamW, the same thread count. TRL always decodes all
32 tokens and trains on them masked (its design: no early stop in generation); ours stops when
every row has ended. Both report their responses' mean length.

Per iteration: generation (sampling with the KV cache), scoring (the forwards of policy /
reference / value / reward model that a rollout needs) and optimisation (the rest: advantages
and the PPO epochs). The first `--warmup` iterations are not timed; a side's figure is the median
iteration of its best round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Timer:
    """Wraps functions and sums the seconds spent in them, per name."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self.marks: list[float] = []

    def wrap(self, name, fn, mark=False):
        def timed(*a, **k):
            t = time.perf_counter()
            if mark:
                self.marks.append(t)
            try:
                return fn(*a, **k)
            finally:
                self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t
        return timed

    def snapshot(self) -> dict:
        return dict(self.total)


def per_iteration(marks: list[float], snaps: list[dict], end: float, warmup: int) -> list[dict]:
    """Per timed iteration: total (from one iteration's start to the next), generation, scoring, optimisation."""
    starts = marks + [end]
    out = []
    for i in range(warmup, len(marks)):
        total = starts[i + 1] - starts[i]
        gen = snaps[i + 1].get("generation", 0) - snaps[i].get("generation", 0)
        score = snaps[i + 1].get("scoring", 0) - snaps[i].get("scoring", 0)
        out.append({"total_s": total, "generation_s": gen, "scoring_s": score, "optimisation_s": total - gen - score})
    return out


# ---------------------------------------------------------------- ours


def side_ours(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from chatfoundry.train import ppo
    from chatfoundry.train import rollout as rollouts

    timer = Timer()
    snaps: list[dict] = []
    lengths: list[float] = []
    rollout, generate = ppo.rollout, rollouts.generate_batch

    def generate_timed(*a, **k):
        out = timer.wrap("generation", generate)(*a, **k)
        lengths.append(sum(map(len, out.sequences)) / len(out.sequences))
        return out

    def rollout_timed(*a, **k):
        snaps.append(timer.snapshot())
        timer.marks.append(time.perf_counter())
        t = time.perf_counter()
        gen_before = timer.total.get("generation", 0.0)
        try:
            return rollout(*a, **k)
        finally:
            # scoring = the rollout minus its generation
            timer.total["scoring"] = timer.total.get("scoring", 0.0) + (time.perf_counter() - t) - (
                timer.total.get("generation", 0.0) - gen_before)

    rollouts.generate_batch, ppo.rollout = generate_timed, rollout_timed
    cfg = ppo.PPOConfig(init=args.sft, reward=f"rm:{args.rm}", device="cpu", threads=args.threads, seed=args.seed,
                        iterations=args.warmup + args.iters)
    cfg.out = tempfile.mkdtemp(prefix="ppo_bench_")
    cfg.rollout.batch_size, cfg.rollout.max_new_tokens = args.batch, args.response_length
    cfg.minibatch_size, cfg.epochs, cfg.target_kl = args.batch // 4, 4, None
    cfg.eval.per_family = 0
    t_end = []
    save = ppo.ckpt.save_checkpoint

    def save_timed(*a, **k):  # the end-of-run save closes the last iteration
        if not t_end:
            t_end.append(time.perf_counter())
            snaps.append(timer.snapshot())
        return save(*a, **k)

    ppo.ckpt.save_checkpoint = save_timed
    ppo.run(cfg, overwrite=True, log=lambda *a: None)
    return {"iterations": per_iteration(timer.marks, snaps, t_end[0], args.warmup),
            "response_length": statistics.mean(lengths[args.warmup:])}


# ---------------------------------------------------------------- TRL 0.11.4 PPOv2Trainer


def side_trl(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import transformers as T
    from datasets import Dataset
    from trl import PPOv2Config, PPOv2Trainer
    from trl.trainer import ppov2_trainer

    T.logging.set_verbosity_error()
    prompts = json.loads(Path(args.prompts).read_text())
    tok = T.PreTrainedTokenizerFast(tokenizer_file=str(Path(args.sft) / "checkpoint" / "tokenizer.json"),
                                    pad_token="<|pad|>", eos_token="<|end|>", padding_side="left")
    policy = T.AutoModelForCausalLM.from_pretrained(Path(args.sft) / "checkpoint")
    ref = T.AutoModelForCausalLM.from_pretrained(Path(args.sft) / "checkpoint")
    value = T.AutoModelForSequenceClassification.from_pretrained(Path(args.rm) / "checkpoint", num_labels=1)
    reward = T.AutoModelForSequenceClassification.from_pretrained(Path(args.rm) / "checkpoint", num_labels=1)
    n_iter = args.warmup + args.iters
    data = Dataset.from_dict({"input_ids": (prompts * n_iter)[:n_iter * args.batch]})
    out = tempfile.mkdtemp(prefix="trl_bench_")
    cfg = PPOv2Config(output_dir=out, per_device_train_batch_size=args.batch // 4, gradient_accumulation_steps=1,
                      num_mini_batches=4, num_ppo_epochs=4, total_episodes=n_iter * args.batch,
                      local_rollout_forward_batch_size=args.batch, response_length=args.response_length,
                      temperature=1.0, stop_token_id=tok.convert_tokens_to_ids("<|end|>"), kl_coef=0.05,
                      learning_rate=3e-5, num_sample_generations=0, report_to=[], save_strategy="no",
                      logging_steps=10_000, seed=args.seed, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = PPOv2Trainer(config=cfg, tokenizer=tok, policy=policy, ref_policy=ref, reward_model=reward,
                           value_model=value, train_dataset=data,
                           data_collator=T.DataCollatorWithPadding(tok))
    timer = Timer()
    snaps: list[dict] = []
    lengths: list[float] = []
    gen = ppov2_trainer.batch_generation

    def gen_timed(*a, **k):
        snaps.append(timer.snapshot())
        result = timer.wrap("generation", gen, mark=True)(*a, **k)
        query_responses = result[0]
        responses = query_responses[:, a[1].shape[1]:]
        stop = cfg.stop_token_id
        ended = (responses == stop).int().argmax(1) + 1
        has = (responses == stop).any(1)
        lengths.append(torch.where(has, ended, torch.full_like(ended, responses.shape[1])).float().mean().item())
        return result

    ppov2_trainer.batch_generation = gen_timed
    forward = ppov2_trainer.forward
    scoring_forward = timer.wrap("scoring", forward)

    def forward_timed(model, *a, **k):  # the reference's forward is scoring; the minibatches' are optimisation
        return scoring_forward(model, *a, **k) if model is ref else forward(model, *a, **k)

    ppov2_trainer.forward = forward_timed
    ppov2_trainer.get_reward = timer.wrap("scoring", ppov2_trainer.get_reward)  # rollout only (value, RM)
    trainer.train()
    end = time.perf_counter()
    snaps.append(timer.snapshot())
    return {"iterations": per_iteration(timer.marks, snaps, end, args.warmup),
            "response_length": statistics.mean(lengths[args.warmup:])}


# ---------------------------------------------------------------- driver


def summarise(rounds: list[list[dict]]) -> dict:
    best = min(rounds, key=lambda its: statistics.median(i["total_s"] for i in its))
    med = {k: statistics.median(i[k] for i in best) for k in best[0]}
    return {"per_iteration": {k: round(v, 4) for k, v in med.items()},
            "rounds_median_total_s": [round(statistics.median(i["total_s"] for i in r), 4) for r in rounds]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sft", default="/tmp/rmdev/sft", help="an SFT run folder (chatfoundry sft)")
    p.add_argument("--rm", default="/tmp/rmdev/rm", help="a reward-model run folder (chatfoundry rm)")
    p.add_argument("--trl_python", default="/tmp/trl-venv/bin/python", help="Python of the TRL 0.11.4 venv")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--response_length", type=int, default=32)
    p.add_argument("--iters", type=int, default=4, help="timed iterations per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(HERE / "results" / "ppo_step.json"))
    args = p.parse_args()
    if args.side:
        result = side_ours(args) if args.side == "ours" else side_trl(args)
        print("RESULT " + json.dumps(result))
        return

    from chatfoundry.checkpoint import load_model
    from chatfoundry.tokenizer import encode_chat
    from chatfoundry.data.tasks import prompt_tasks

    _, tok = load_model(args.sft)
    prompts = [encode_chat(tok, [{"role": "user", "content": t.prompt}]) for t in prompt_tasks("train", 2000, args.seed)]
    prompts_file = Path(tempfile.mkdtemp(prefix="ppo_bench_")) / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    child = [__file__, "--sft", args.sft, "--rm", args.rm, "--batch", str(args.batch), "--response_length",
             str(args.response_length), "--iters", str(args.iters), "--warmup", str(args.warmup), "--threads",
             str(args.threads), "--seed", str(args.seed), "--prompts", str(prompts_file)]
    runs: dict[str, list] = {"ours": [], "trl": []}
    lengths: dict[str, list] = {"ours": [], "trl": []}
    for r in range(args.rounds):
        for side in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
            python = sys.executable if side == "ours" else args.trl_python
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run([python, *child, "--side", side], capture_output=True, text=True, env=env)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(lines[-1][7:])
            runs[side].append(result["iterations"])
            lengths[side].append(result["response_length"])
            print(f"round {r + 1} {side}: median iteration "
                  f"{statistics.median(i['total_s'] for i in result['iterations']):.3f} s", flush=True)
    report = {"machine": {"cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": ")
                          if Path("/proc/cpuinfo").exists() else "", "load_avg_1m": os.getloadavg()[0]},
              "settings": {k: getattr(args, k) for k in ("sft", "rm", "batch", "response_length", "iters", "warmup",
                                                         "rounds", "threads")}}
    for side in runs:
        report[side] = {**summarise(runs[side]), "response_length": round(statistics.mean(lengths[side]), 2)}
    ratio = report["trl"]["per_iteration"]["total_s"] / report["ours"]["per_iteration"]["total_s"]
    report["speedup"] = round(ratio, 2)
    report["target_2x_met"] = ratio >= 2
    print(f"{'per iteration (s)':<20}{'ours':>10}{'TRL 0.11.4':>12}")
    for k in ("generation_s", "scoring_s", "optimisation_s", "total_s"):
        print(f"{k:<20}{report['ours']['per_iteration'][k]:>10.3f}{report['trl']['per_iteration'][k]:>12.3f}")
    print(f"{'response length':<20}{report['ours']['response_length']:>10.1f}{report['trl']['response_length']:>12.1f}")
    print(f"speedup {ratio:.2f}x (target >= 2x: {'met' if ratio >= 2 else 'NOT met'})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
