"""The recipe's stages as commands: pipeline, pretrain, sft, finetune-seq2seq, label, self-instruct, rm, ppo, dpo,
grpo, best-of-n, calibrate, scaling, cot, finetune-head. Each parses its config (defaults < a resumed run's config.yaml < --config < flags) and
calls its stage's `run`.
"""

from __future__ import annotations

from chatfoundry.commands.common import json_flag, run_flags, stage_config
from chatfoundry.config import add_config_args, resolve_config
from chatfoundry.errors import UserError


def _stage(sub, name: str, cls: type, run, help: str, description: str, aliases: dict | None = None,
           resumable: bool = True, overwrite_help: str = "replace a run already in --out", report=None):
    """A stage's subcommand: its config's fields as flags, then `run(config, ...)`. A resumable stage
    takes --resume and reads a resumed run's config.yaml; the others restart or --overwrite. `report`:
    the result as text for a person, printed before --json's line."""
    p = sub.add_parser(name, help=help, description=description)
    add_config_args(p, cls, aliases=aliases)
    p.set_defaults(config_class=cls)  # for tools that resolve a command line's config without running it
    if resumable:
        run_flags(p)
        p.set_defaults(func=lambda args: run(stage_config(cls, args), resume=args.resume, overwrite=args.overwrite))
    else:
        p.add_argument("--overwrite", action="store_true", help=overwrite_help)
        json_flag(p)
        p.set_defaults(func=lambda args: _reported(run(resolve_config(cls, args), overwrite=args.overwrite), report))
    return p


def _reported(result: dict, report) -> dict:
    if report and (text := report(result)):
        print(text)
    return result


def add_parsers(sub) -> None:
    from chatfoundry import align_compare, cot, pipeline, scaling
    from chatfoundry.eval import calibration
    from chatfoundry.train import (best_of_n, dpo, grpo, head, label, ppo, pretrain, reward, self_instruct, seq2seq,
                                   sft)

    _stage(sub, "pipeline", pipeline.PipelineConfig, pipeline.run,
           help="the whole recipe on the built-in world: pretrain, SFT, label, RM, PPO, report",
           description="Pretrain (tokenizer included), SFT, label, reward model and PPO on the built-in "
                       "task world, each stage in its own folder under --out; a finished stage is "
                       "skipped, so an interrupted pipeline resumes. Ends with report.md and its plots. "
                       "Any stage's setting is a flag, e.g. --ppo.iterations 20.",
           resumable=False, overwrite_help="run every stage again, replacing what --out holds")
    _stage(sub, "align-compare", align_compare.AlignCompareConfig, align_compare.run,
           help="best-of-n, PPO, GRPO and DPO on one SFT model and reward model: the gold reward each buys for its KL",
           description="Each alignment method at several strengths (--ppo_kl, --grpo_kl, --dpo_beta; best-of-k "
                       "for k up to --n) from a pipeline's SFT model, reward model and comparisons (--pipeline, or "
                       "--sft/--rm/--data), scored on the world's held-out prompts by the gold reward: frontier.png "
                       "(gold gain against KL), overoptimization.png (the RM's score and the gold reward against "
                       "sqrt(KL), Gao et al.'s forms fitted) and report.md (the points and the gold reward's parts). "
                       "A finished run is skipped, so an interrupted comparison resumes.",
           resumable=False, overwrite_help="run every method again")
    _stage(sub, "pretrain", pretrain.PretrainConfig, pretrain.run,
           help="pretrain a decoder LM (causal LM), a BERT-style encoder (--objective mlm) "
                "or a T5 (--objective span)",
           description="Train a tokenizer (unless one is given), tokenize the text into cached "
                       "shards and pretrain a GPT-2-, GPT-NeoX- (the default) or Llama-flavoured "
                       "decoder (--objective clm, the default; section --model.*), a BERT-style "
                       "encoder with the masked-LM objective (--objective mlm; sections --encoder.* "
                       "and --mlm.*) or a T5-style encoder-decoder by span corruption (--objective "
                       "span; sections --seq2seq.* and --span.*). Run under `torchrun "
                       "--nproc_per_node N` for data-parallel training.",
           aliases={"--data": "data.files", "--tokenizer": "tokenizer.path"})
    _stage(sub, "sft", sft.SFTConfig, sft.run,
           help="supervised finetuning: teach a pretrained model the assistant format",
           description="Finetune a pretrained checkpoint on conversations (the task world's train "
                       "split, or JSONL files: text, prompt/completion, messages, Alpaca, or the "
                       "chosen/best reply of preference and ranking files), learning the assistant "
                       "turns only; scores the result on the world's test split.",
           aliases={"--data": "data.files"})
    _stage(sub, "finetune-seq2seq", seq2seq.FinetuneSeq2SeqConfig, seq2seq.run,
           help="finetune an encoder-decoder (T5) on input/target pairs",
           description="Teach a span-corruption-pretrained T5 checkpoint to map inputs to targets: "
                       "JSONL lines {\"input\": ..., \"target\": ...} or a task of the built-in world "
                       "(world:strings/reverse). Reports exact match of greedy outputs on held-out inputs "
                       "(the world's test split, or val_fraction of a file).")
    _stage(sub, "label", label.LabelConfig, label.run,
           help="sample K responses per prompt from a chat model and rank them (comparison data)",
           description="Sample K responses to each prompt from the policy (--prompts: the task world, "
                       "or a JSONL file of {\"prompt\": ...} lines) and have a labeler rank them: a "
                       "simulated human (the world's gold reward + noise, ties), a reward model "
                       "(rm:PATH) or a Python function (python:MODULE:FUNC, called as FUNC(prompt, "
                       "response, **fields) -> float). Writes train.jsonl and held-out val.jsonl in the "
                       "rankings format `chatfoundry rm` reads.",
           resumable=False, overwrite_help="replace labels already in --out")
    _stage(sub, "self-instruct", self_instruct.SelfInstructConfig, self_instruct.run,
           help="Self-Instruct / Alpaca: a teacher writes new instructions and answers them; filtered, as SFT data",
           description="Show the writer (--writer, default the --teacher) a few seed instructions (--seed_tasks: "
                       "world, or a JSONL file of {\"instruction\"} or {\"prompt\"} lines) as a list of "
                       "\"Question: ...\" lines and let it write the next; drop malformed instructions, world "
                       "questions of the held-out splits, ones the world cannot read back (--unverifiable) and "
                       "near-duplicates (ROUGE-L above --rouge); the teacher answers the rest greedily, and "
                       "malformed answers and answers the world's verifier marks wrong are dropped. Writes "
                       "data.jsonl in Alpaca's format (instruction, input, output) for `chatfoundry sft --data`, "
                       "and reports the teacher tokens and CPU-seconds spent, each filter's drops and the data's "
                       "diversity.",
           resumable=False, overwrite_help="replace the data already in --out")
    _stage(sub, "rm", reward.RMConfig, reward.run,
           help="train a reward model on ranked comparisons (K-wise Bradley-Terry)",
           description="Start from the SFT checkpoint's body with a scalar head and learn to order "
                       "responses as the comparisons do: a `chatfoundry label` folder, or JSONL files "
                       "of rankings (prompt, responses, ranks) or pairs (prompt, chosen, rejected). "
                       "Reports held-out pairwise accuracy and Spearman correlation with the gold reward.",
           aliases={"--data": "data.files"})
    p = _stage(sub, "ppo", ppo.PPOConfig, ppo.run,
               help="RLHF: optimise a chat model against a reward with PPO (KL to SFT)",
               description="InstructGPT's PPO: the policy and a frozen reference start from the SFT model, "
                           "the critic from the reward model; rewards are the reward's score (--reward "
                           "rm:PATH, verifier or python:MODULE:FUNC) minus beta * KL to the reference per "
                           "token; clipped surrogate (or the KL-penalty objective), GAE, optional PPO-ptx. "
                           "Prompts from --prompts (the task world, or a JSONL file of {\"prompt\": ...} "
                           "lines). Scores greedy and sampled answers to the held-out prompts before and "
                           "after (the reward, KL, win rates; the world adds its gold reward).")
    p.add_argument("--eval_only", action="store_true",
                   help="train nothing: score the finished run in --out (its config.yaml, then these flags) "
                        "against its reference again, e.g. --eval.samples 16 for a smaller standard error; "
                        "writes nothing")
    p.set_defaults(func=lambda args: _ppo(args, ppo))
    _stage(sub, "dpo", dpo.DPOConfig, dpo.run,
           help="direct preference optimisation: a chat model learns from comparisons, no reward model",
           description="DPO (Rafailov et al.) or IPO: the policy and a frozen reference start from the SFT model; "
                       "the loss raises the chosen reply's log-probability ratio to the reference above the "
                       "rejected one's, with beta weighing the KL. Comparisons: a `chatfoundry label` folder, or "
                       "JSONL files of preferences (prompt, chosen, rejected) or rankings (prompt, responses, "
                       "ranks). Reports held-out pairs' accuracy by the implicit reward and, on the held-out "
                       "prompts (--prompts), greedy and sampled answers against SFT: the gold reward where the "
                       "prompts have a verifier, and the KL.",
           aliases={"--data": "data.files"})
    _stage(sub, "grpo", grpo.GRPOConfig, grpo.run,
           help="GRPO / RLOO: a chat model against a reward, a group of samples per prompt as the baseline",
           description="Sample --group responses to each prompt (--prompts: the task world, or a JSONL file of "
                       "{\"prompt\": ...} lines), score them (--reward rm:PATH, verifier or python:MODULE:FUNC), "
                       "give each its advantage within its group (grpo: normalised; rloo: leave-one-out) and take "
                       "PPO's clipped surrogate, with no critic; the KL to the SFT reference in the loss (k3) or "
                       "in the reward. Scores greedy and sampled answers to the held-out prompts before and after.")
    _stage(sub, "best-of-n", best_of_n.BestOfNConfig, best_of_n.run,
           help="n samples per prompt from a chat model, the reward's best kept: rejection-sampling data and "
                "the best-of-k curve",
           description="Sample --n responses to each train prompt (--prompts: the task world, or a JSONL file of "
                       "{\"prompt\": ...} lines) from the SFT model and score them (--reward rm:PATH, verifier or "
                       "python:MODULE:FUNC). Writes samples.jsonl (each prompt's responses ranked by the reward: "
                       "`rm` and `dpo` read it) and best.jsonl (the best response as a chat: `sft --data` reads "
                       "it), and scores best-of-k for k = 1, 2, 4, ..., n on the held-out prompts: the gold "
                       "reward of the pick where the prompts have a verifier, at KL log k - (k - 1) / k.",
           resumable=False, overwrite_help="replace what --out holds")
    _stage(sub, "scaling", scaling.ScalingConfig, scaling.run,
               help="a scaling law on your corpus: an IsoFLOP sweep of pretrain runs, L(N, D) fitted, a larger run predicted",
               description="For each compute budget (--budgets, training FLOPs), pretrain models of each width "
                           "(--widths) on the tokens the budget buys them, each an ordinary pretrain run under "
                           "--out/runs/ (a finished run is skipped: the sweep resumes). Fits Chinchilla's "
                           "approach 2 (IsoFLOP minima) and approach 3 (L = E + A/N^alpha + B/D^beta, with bootstrap "
                           "intervals), then trains one run --predict times the largest budget at the law's "
                           "compute-optimal width and reports the predicted loss against the actual one. Writes "
                           "scaling.json, isoflop.png, law.png and optimal.png.",
               resumable=False, overwrite_help="train every run again", report=scaling.format_result)
    _stage(sub, "cot", cot.CotConfig, cot.run,
               help="chain of thought, measured: SFT on worked against direct answers to multi-step questions, per size",
               description="Write a corpus of the arithmetic table and multi-step questions (train split) answered "
                           "directly or worked, and per model size (--sizes) and seed (--seeds): pretrain on it, ask "
                           "the base model the held-out questions zero-shot with and without \"Let's think step by "
                           "step.\", then SFT it twice on the same questions, answered directly and worked out step "
                           "by step, and score both on the held-out questions (exact match of the final number; "
                           "whether the steps check). Every run is an ordinary pretrain or sft run under "
                           "--out/SIZE/seedS/ (a finished one is skipped: the comparison resumes). Writes cot.json "
                           "and cot.png.",
               resumable=False, overwrite_help="train every run again", report=cot.format_result)
    _stage(sub, "calibrate", calibration.CalibrateConfig, calibration.run,
           help="does a model know what it does not know? calibration on multiple choice, and hallucination",
           description="Ask each checkpoint held-out multiple-choice questions of the world (facts and arithmetic "
                       "with four options, compare with two) and read its probability of each option, renormalised "
                       "over the options (--form option: each answer's sentence; letter: GPT-4's A/B/C/D). Chat "
                       "models (--ckpt) are asked in their chat template, base models (--base) in the quiz form "
                       "of their corpus. Reports accuracy, ECE (with a bootstrap interval), adaptive ECE, Brier "
                       "and mean confidence per checkpoint and family, the temperature fitted on --fit_split and "
                       "ECE after it, and from greedy answers the share confidently wrong and abstaining on real "
                       "and made-up countries. Writes calibration.json, reliability.png and hallucination.png.",
           resumable=False)
    _stage(sub, "finetune-head", head.HeadConfig, head.run,
           help="finetune a classification or regression head on an encoder",
           description="Put BERT's pooler and a linear head on an encoder checkpoint (chatfoundry "
                       "pretrain --objective mlm, or an imported BERT) and finetune it: --task "
                       "classify (cross-entropy) or regress (squared error). Data: JSONL lines "
                       "{\"text\": ..., \"label\": ...}, or by default the task world's prompts "
                       "labelled by family. Reports held-out accuracy, or RMSE and Spearman's rho; "
                       "saves a BertForSequenceClassification folder.",
           aliases={"--data": "data.files"},
           resumable=False)


def _ppo(args, ppo) -> dict:
    if args.eval_only:
        if args.resume or args.overwrite:
            raise UserError("--eval_only: trains nothing; drop --resume and --overwrite")
        return ppo.evaluate_run(stage_config(ppo.PPOConfig, args))
    return ppo.run(stage_config(ppo.PPOConfig, args), resume=args.resume, overwrite=args.overwrite)


