"""The recipe's stages as commands: pipeline, pretrain, sft, finetune-seq2seq, label, rm, ppo,
finetune-head. Each parses its config (defaults < a resumed run's config.yaml < --config < flags) and
calls its stage's `run`.
"""

from __future__ import annotations

from chatfoundry.commands.common import json_flag, run_flags, stage_config
from chatfoundry.config import add_config_args, resolve_config
from chatfoundry.errors import UserError


def _pipeline_parser(sub) -> None:
    from chatfoundry.pipeline import PipelineConfig

    p = sub.add_parser("pipeline", help="the whole recipe on the built-in world: pretrain, SFT, label, RM, PPO, report",
                       description="Pretrain (tokenizer included), SFT, label, reward model and PPO on the built-in "
                                   "task world, each stage in its own folder under --out; a finished stage is "
                                   "skipped, so an interrupted pipeline resumes. Ends with report.md and its plots. "
                                   "Any stage's setting is a flag, e.g. --ppo.iterations 20.")
    add_config_args(p, PipelineConfig)
    p.add_argument("--overwrite", action="store_true", help="run every stage again, replacing what --out holds")
    json_flag(p)
    p.set_defaults(func=_pipeline)

def _pipeline(args) -> dict:
    from chatfoundry.pipeline import PipelineConfig, run

    return run(resolve_config(PipelineConfig, args), overwrite=args.overwrite)

def _pretrain_parser(sub) -> None:
    from chatfoundry.train.pretrain import PretrainConfig

    p = sub.add_parser("pretrain", help="pretrain a decoder LM (causal LM), a BERT-style encoder (--objective mlm) "
                                        "or a T5 (--objective span)",
                       description="Train a tokenizer (unless one is given), tokenize the text into cached "
                                   "shards and pretrain a GPT-2-, GPT-NeoX- (the default) or Llama-flavoured "
                                   "decoder (--objective clm, the default; section --model.*), a BERT-style "
                                   "encoder with the masked-LM objective (--objective mlm; sections --encoder.* "
                                   "and --mlm.*) or a T5-style encoder-decoder by span corruption (--objective "
                                   "span; sections --seq2seq.* and --span.*). Run under `torchrun "
                                   "--nproc_per_node N` for data-parallel training.")
    add_config_args(p, PretrainConfig, aliases={"--data": "data.files", "--tokenizer": "tokenizer.path"})
    run_flags(p)
    p.set_defaults(func=_pretrain)

def _pretrain(args) -> dict:
    from chatfoundry.train.pretrain import PretrainConfig, run

    return run(stage_config(PretrainConfig, args), resume=args.resume, overwrite=args.overwrite)

def _sft_parser(sub) -> None:
    from chatfoundry.train.sft import SFTConfig

    p = sub.add_parser("sft", help="supervised finetuning: teach a pretrained model the assistant format",
                       description="Finetune a pretrained checkpoint on conversations (the task world's train "
                                   "split, or JSONL files: text, prompt/completion, messages, Alpaca, or the "
                                   "chosen/best reply of preference and ranking files), learning the assistant "
                                   "turns only; scores the result on the world's test split.")
    add_config_args(p, SFTConfig, aliases={"--data": "data.files"})
    run_flags(p)
    p.set_defaults(func=_sft)

def _sft(args) -> dict:
    from chatfoundry.train.sft import SFTConfig, run

    return run(stage_config(SFTConfig, args), resume=args.resume, overwrite=args.overwrite)

def _seq2seq_parser(sub) -> None:
    from chatfoundry.train.seq2seq import FinetuneSeq2SeqConfig

    p = sub.add_parser("finetune-seq2seq", help="finetune an encoder-decoder (T5) on input/target pairs",
                       description="Teach a span-corruption-pretrained T5 checkpoint to map inputs to targets: "
                                   "JSONL lines {\"input\": ..., \"target\": ...} or a task of the built-in world "
                                   "(world:strings/reverse). Reports exact match of greedy outputs on held-out inputs "
                                   "(the world's test split, or val_fraction of a file).")
    add_config_args(p, FinetuneSeq2SeqConfig)
    run_flags(p)
    p.set_defaults(func=_seq2seq)

def _seq2seq(args) -> dict:
    from chatfoundry.train.seq2seq import FinetuneSeq2SeqConfig, run

    return run(stage_config(FinetuneSeq2SeqConfig, args), resume=args.resume, overwrite=args.overwrite)

def _label_parser(sub) -> None:
    from chatfoundry.train.label import LabelConfig

    p = sub.add_parser("label", help="sample K responses per prompt from a chat model and rank them (comparison data)",
                       description="Sample K responses to each prompt from the policy (--prompts: the task world, "
                                   "or a JSONL file of {\"prompt\": ...} lines) and have a labeler rank them: a "
                                   "simulated human (the world's gold reward + noise, ties), a reward model "
                                   "(rm:PATH) or a Python function (python:MODULE:FUNC, called as FUNC(prompt, "
                                   "response, **fields) -> float). Writes train.jsonl and held-out val.jsonl in the "
                                   "rankings format `chatfoundry rm` reads.")
    add_config_args(p, LabelConfig)
    p.add_argument("--overwrite", action="store_true", help="replace labels already in --out")
    json_flag(p)
    p.set_defaults(func=_label)

def _label(args) -> dict:
    from chatfoundry.train.label import LabelConfig, run

    return run(resolve_config(LabelConfig, args), overwrite=args.overwrite)

def _rm_parser(sub) -> None:
    from chatfoundry.train.reward import RMConfig

    p = sub.add_parser("rm", help="train a reward model on ranked comparisons (K-wise Bradley-Terry)",
                       description="Start from the SFT checkpoint's body with a scalar head and learn to order "
                                   "responses as the comparisons do: a `chatfoundry label` folder, or JSONL files "
                                   "of rankings (prompt, responses, ranks) or pairs (prompt, chosen, rejected). "
                                   "Reports held-out pairwise accuracy and Spearman correlation with the gold reward.")
    add_config_args(p, RMConfig, aliases={"--data": "data.files"})
    run_flags(p)
    p.set_defaults(func=_rm)

def _rm(args) -> dict:
    from chatfoundry.train.reward import RMConfig, run

    return run(stage_config(RMConfig, args), resume=args.resume, overwrite=args.overwrite)

def _ppo_parser(sub) -> None:
    from chatfoundry.train.ppo import PPOConfig

    p = sub.add_parser("ppo", help="RLHF: optimise a chat model against a reward with PPO (KL to SFT)",
                       description="InstructGPT's PPO: the policy and a frozen reference start from the SFT model, "
                                   "the critic from the reward model; rewards are the reward's score (--reward "
                                   "rm:PATH, verifier or python:MODULE:FUNC) minus beta * KL to the reference per "
                                   "token; clipped surrogate (or the KL-penalty objective), GAE, optional PPO-ptx. "
                                   "Prompts from --prompts (the task world, or a JSONL file of {\"prompt\": ...} "
                                   "lines). Scores greedy and sampled answers to the held-out prompts before and "
                                   "after (the reward, KL, win rates; the world adds its gold reward).")
    add_config_args(p, PPOConfig)
    run_flags(p)
    p.add_argument("--eval-only", action="store_true",
                   help="train nothing: score the finished run in --out (its config.yaml, then these flags) against "
                        "its reference again, e.g. --eval.samples 16 for a smaller standard error; writes nothing")
    p.set_defaults(func=_ppo)

def _ppo(args) -> dict:
    from chatfoundry.train.ppo import PPOConfig, evaluate_run, run

    if args.eval_only:
        if args.resume or args.overwrite:
            raise UserError("--eval-only: trains nothing; drop --resume and --overwrite")
        return evaluate_run(stage_config(PPOConfig, args))
    return run(stage_config(PPOConfig, args), resume=args.resume, overwrite=args.overwrite)

def _finetune_head_parser(sub) -> None:
    from chatfoundry.train.head import HeadConfig

    p = sub.add_parser("finetune-head", help="finetune a classification or regression head on an encoder",
                       description="Put BERT's pooler and a linear head on an encoder checkpoint (chatfoundry "
                                   "pretrain --objective mlm, or an imported BERT) and finetune it: --task "
                                   "classify (cross-entropy) or regress (squared error). Data: JSONL lines "
                                   "{\"text\": ..., \"label\": ...}, or by default the task world's prompts "
                                   "labelled by family. Reports held-out accuracy, or RMSE and Spearman's rho; "
                                   "saves a BertForSequenceClassification folder.")
    add_config_args(p, HeadConfig, aliases={"--data": "data.files"})
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    json_flag(p)
    p.set_defaults(func=_finetune_head)

def _finetune_head(args) -> dict:
    from chatfoundry.train.head import HeadConfig, run

    return run(resolve_config(HeadConfig, args), overwrite=args.overwrite)


def add_parsers(sub) -> None:
    for add in (_pipeline_parser, _pretrain_parser, _sft_parser, _seq2seq_parser, _label_parser, _rm_parser, _ppo_parser, _finetune_head_parser):
        add(sub)
