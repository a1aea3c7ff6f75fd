"""Time per DPO optimizer step: `chatfoundry dpo`'s step against TRL's DPOTrainer on the same work.

    python benchmarks/dpo_step.py --sft runs/demo/sft --label runs/demo/label

Same work on both sides: the same weights (our SFT checkpoint exported with `convert --to_hf`,
so TRL trains the identical transformers model), the same pairs (the label folder's, each reply
with its <|end|>), batch 32 pairs in one micro-batch, AdamW at one learning rate, gradient
clipping at 1, fp32, the same thread count. The reference's log-probabilities are precomputed on
both sides (TRL's `precompute_ref_log_probs=True`; its default recomputes them each step, which
this leaves out). TRL's step is its `_compute_loss` (the forward over the padded [chosen;
rejected] batch and the loss), the backward, then the optimizer; ours is `dpo.batch_loss` (the
replies packed into rows, the vocabulary projection on their positions only, the loss), the
backward, then AdamW. A side's figure is the median step of its best round; rounds alternate ours / theirs. The
breakdown splits each step into forward+loss, backward and optimizer (medians each, so they need
not add up to the step's median).
"""

from __future__ import annotations

import argparse
import copy
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
from chatfoundry.data.formats import load_comparison_splits  # noqa: E402
from chatfoundry.tokenizer import special_id  # noqa: E402
from chatfoundry.train.dpo import batch_loss, make_pairs, reference_logps  # noqa: E402


def timed_steps(step, n: int, warmup: int) -> list[dict]:
    out = []
    for i in range(warmup + n):
        parts = step(i)
        if i >= warmup:
            out.append(parts)
    return out


def ours(model, pairs, pad_id: int, batch: int, beta: float, lr: float):
    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)

    def step(i: int) -> dict:
        rows = list(range(i * batch % (len(pairs) - batch), i * batch % (len(pairs) - batch) + batch))
        t0 = time.perf_counter()
        loss = batch_loss(model, pairs, rows, beta, pad_id=pad_id)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {"total_s": t3 - t0, "forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2}
    return step


def theirs(hf_dir: Path, pairs, pad_id: int, batch: int, beta: float, lr: float, work: Path):
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), pad_token="<|pad|>",
                                               eos_token="<|end|>")
    args = DPOConfig(output_dir=str(work), beta=beta, learning_rate=lr, weight_decay=0.0, max_grad_norm=1.0,
                     per_device_train_batch_size=batch, report_to=[], use_cpu=True, bf16=False,
                     precompute_ref_log_probs=True, disable_dropout=True)
    data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)  # never read: batches below
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data, processing_class=tok)
    trainer.create_optimizer()
    collate = DataCollatorForPreference(pad_token_id=pad_id)
    model.train()

    def step(i: int) -> dict:
        rows = list(range(i * batch % (len(pairs) - batch), i * batch % (len(pairs) - batch) + batch))
        examples = [{"prompt_ids": pairs.chosen[j][:pairs.chosen_start[j]],
                     "chosen_ids": pairs.chosen[j][pairs.chosen_start[j]:],
                     "rejected_ids": pairs.rejected[j][pairs.rejected_start[j]:],
                     "ref_chosen_logps": float(pairs.ref_chosen[j]), "ref_rejected_logps": float(pairs.ref_rejected[j])}
                    for j in rows]
        t0 = time.perf_counter()
        inputs = collate(examples)
        loss = trainer._compute_loss(model, inputs, False)
        loss = loss[0] if isinstance(loss, tuple) else loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {"total_s": t3 - t0, "forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2}
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="runs/demo/sft", help="our SFT checkpoint (or run folder)")
    p.add_argument("--label", default="runs/demo/label", help="a chatfoundry label folder: the pairs")
    p.add_argument("--batch", type=int, default=32, help="pairs per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, each round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating ours / theirs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dpo_step.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = ckpt.load_model(args.sft)
    pad_id = special_id(tok, "pad") or 0
    train, _, _, _ = load_comparison_splits([args.label], 0.1, 0)
    pairs, _ = make_pairs(tok, train[:400], model.config.block_size)
    reference_logps(model, pairs, pad_id, mean=False)
    work = Path(tempfile.mkdtemp(prefix="dpo_bench_"))
    to_hf(args.sft, work / "hf")
    sides = {"ours": ours(model, pairs, pad_id, args.batch, 0.1, 1e-5),
             "trl": theirs(work / "hf", pairs, pad_id, args.batch, 0.1, 1e-5, work / "trl")}
    rounds: dict[str, list[list[dict]]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, step in sides.items():
            rounds[name].append(timed_steps(step, args.steps, args.warmup))
    result = {"machine": machine_info(args.threads), "batch_pairs": args.batch, "steps": args.steps,
              "mean_reply_tokens": round(sum(len(r) - s for r, s in zip(pairs.chosen + pairs.rejected,
                                                                         pairs.chosen_start + pairs.rejected_start))
                                         / (2 * len(pairs)), 1)}
    for name, runs in rounds.items():
        best = min(runs, key=lambda steps: statistics.median(s["total_s"] for s in steps))
        result[name] = {k: round(statistics.median(s[k] for s in best) * 1000, 2) for k in best[0]}
        result[name] = {k.replace("_s", "_ms"): v for k, v in result[name].items()}
    result["speedup"] = round(result["trl"]["total_ms"] / result["ours"]["total_ms"], 2)
    write_report(result, args.out)
    for name in rounds:
        print(f"{name:5s} " + "  ".join(f"{k} {v:.1f}" for k, v in result[name].items()))
    print(f"ours is {result['speedup']:.2f}x TRL's DPOTrainer per step (batch {args.batch} pairs, "
          f"{result['mean_reply_tokens']} reply tokens on average, {args.threads} threads)")


if __name__ == "__main__":
    main()
