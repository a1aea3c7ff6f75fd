"""Time per GRPO iteration: `chatfoundry grpo` against TRL's GRPOTrainer on the same work.

    python benchmarks/grpo_step.py --sft runs/demo/sft

Same work on both sides: the same weights (our SFT checkpoint exported with `convert --to_hf`),
the same prompts (the world's arithmetic train questions in our chat format), 16 prompts x 8
samples = 128 completions of at most 32 tokens at temperature 1 per iteration, each reused for 2
passes of 4 minibatches of 32 (TRL: `steps_per_generation=4`, `num_iterations=2`: 8 optimizer
steps per generation, as ours), the group-normalised advantage, the per-sequence mean loss (TRL's
`loss_type="grpo"`), beta 0.5 x k3 in the loss, AdamW, clipping at 1, fp32, the same reward
function (the share of digits in the completion: cheap, the same on both sides) and thread
count. TRL generates with transformers' `generate` (no vLLM on a CPU). A side's figure is the
median iteration of its best round after `--warmup` untimed ones; the breakdown gives the median
generation (sampling the 128 completions), scoring (the rest of producing a batch: rewards, the
reference's and the sampling policy's log-probabilities) and optimisation (the rest: advantages
and the 8 optimizer steps), medians each, so they need not add up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, write_report  # noqa: E402

from chatfoundry import checkpoint as ckpt  # noqa: E402
from chatfoundry.convert import to_hf  # noqa: E402
from chatfoundry.data import tasks  # noqa: E402
from chatfoundry.tokenizer import encode_chat  # noqa: E402
from chatfoundry.train import grpo  # noqa: E402

REWARD = "def digits(prompt, response):\n    return sum(c.isdigit() for c in response) / max(len(response), 1)\n"


def digits(completions, **kwargs) -> list[float]:  # TRL's reward-function signature
    return [sum(c.isdigit() for c in x) / max(len(x), 1) for x in completions]


def timed(owner, name: str, into: list[float]):
    """Wrap owner.name so each call's seconds land in `into`; returns the restoring function."""
    fn = getattr(owner, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            into.append(time.perf_counter() - t)

    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, fn)


def breakdown(totals: list[float], generation: list[float], batch: list[float]) -> dict:
    """Medians: the iteration, its generation, its scoring (batch - generation), the optimisation."""
    n = len(totals)
    gen, score = generation[-n:], [b - g for b, g in zip(batch[-n:], generation[-n:])]
    opt = [t - b for t, b in zip(totals, batch[-n:])]
    return {k: round(statistics.median(v), 3) for k, v in
            (("iteration_s", totals), ("generation_s", gen), ("scoring_s", score), ("optimisation_s", opt))}


def ours(sft: str, work: Path, iterations: int, threads: int) -> tuple[list[float], list[float], list[float]]:
    """Per-iteration seconds of `grpo._run`'s loop, from the times its metrics are written; and
    each iteration's generation and batch (rollout) seconds."""
    from chatfoundry.train import rollout as rollouts

    (work / "bench_reward.py").write_text(REWARD)
    cfg = grpo.GRPOConfig(init=sft, reward=f"python:{work / 'bench_reward.py'}:digits", prompts="world:arithmetic",
                          out=str(work / "ours"), iterations=iterations, threads=threads, device="cpu")
    cfg.eval.per_family = 0
    stamps: list[float] = []
    write = grpo.MetricsLog.write

    def stamped(self, record):
        stamps.append(time.perf_counter())
        return write(self, record)

    generation: list[float] = []
    batch: list[float] = []
    restore = [timed(rollouts, "generate_batch", generation), timed(grpo, "rollout", batch)]
    grpo.MetricsLog.write = stamped
    try:
        grpo.run(cfg, overwrite=True, log=lambda line: None)
    finally:
        grpo.MetricsLog.write = write
        for undo in restore:
            undo()
    return [b - a for a, b in zip(stamps, stamps[1:])], generation, batch


def theirs(sft: str, work: Path, iterations: int, threads: int) -> tuple[list[float], list[float], list[float]]:
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tok = ckpt.load_model(sft)
    hf_dir = work / "hf"
    to_hf(sft, hf_dir)
    prompts = [tok.decode(encode_chat(tok, list(p.messages)), skip_special_tokens=False)
               for p in tasks.source("world:arithmetic").prompts("train", 400, 1337)]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), pad_token="<|pad|>",
                                                eos_token="<|end|>")
    fast.padding_side = "left"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    stamps: list[float] = []

    class Stamp(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=32, steps_per_generation=4,
                      num_generations=8, num_iterations=2, max_completion_length=32, temperature=1.0, beta=0.5,
                      loss_type="grpo", learning_rate=3e-5, max_grad_norm=1.0, max_steps=8 * iterations,
                      report_to=[], use_cpu=True, bf16=False, logging_steps=1000, save_strategy="no",
                      dataloader_num_workers=0, seed=1337)
    trainer = GRPOTrainer(model=hf_model, reward_funcs=digits, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=fast,
                          callbacks=[Stamp()])
    generation: list[float] = []
    batch: list[float] = []
    timed(trainer, "_generate", generation)
    timed(trainer, "_generate_and_score_completions", batch)
    torch.set_num_threads(threads)
    trainer.train()
    ends = stamps[7::8]  # the last optimizer step of each generation
    return [b - a for a, b in zip(ends, ends[1:])], generation, batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="runs/demo/sft", help="our SFT checkpoint (or run folder)")
    p.add_argument("--iterations", type=int, default=8, help="iterations per round (the first `--warmup` untimed)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="rounds, alternating ours / theirs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "grpo_step.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="grpo_bench_"))
    rounds: dict[str, list[dict]] = {"ours": [], "trl": []}
    for _ in range(args.rounds):
        for name, side in (("ours", ours), ("trl", theirs)):
            totals, generation, batch = side(args.sft, work, args.iterations, args.threads)
            rounds[name].append(breakdown(totals[args.warmup - 1:], generation, batch))
    result = {"machine": machine_info(args.threads), "completions_per_iteration": 128, "max_new_tokens": 32}
    for name, runs in rounds.items():
        result[name] = {**min(runs, key=lambda r: r["iteration_s"]), "rounds_s": [r["iteration_s"] for r in runs]}
    result["speedup"] = round(result["trl"]["iteration_s"] / result["ours"]["iteration_s"], 2)
    write_report(result, args.out)
    for name in rounds:
        print(f"{name:5s} " + "  ".join(f"{k} {v}" for k, v in result[name].items()))
    print(f"ours {result['ours']['iteration_s']:.2f} s, TRL {result['trl']['iteration_s']:.2f} s per iteration: "
          f"ours is {result['speedup']:.2f}x TRL's GRPOTrainer ({args.threads} threads)")


if __name__ == "__main__":
    main()
