"""The `chatfoundry` command. Each subcommand parses its flags and calls one module.

Errors a user can cause print one line and exit with status 2; with `--json` the last line of
standard output is a JSON summary that scripts (and later stages) read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from chatfoundry.config import ArgumentParser, add_config_args, load_yaml, resolve_config
from chatfoundry.errors import UserError


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last line")


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    _json_flag(p)


# ---------------------------------------------------------------- pretrain


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
    _run_flags(p)
    p.set_defaults(func=_pretrain)


def _pretrain(args) -> dict:
    from chatfoundry.train.pretrain import PretrainConfig, run

    return run(_stage_config(PretrainConfig, args), resume=args.resume, overwrite=args.overwrite)


def _stage_config(cls, args):
    """The stage's config: defaults < the resumed (or re-evaluated) run's config.yaml < --config YAML < flags."""
    base = None
    if args.resume or getattr(args, "eval_only", False):
        out = Path(getattr(args, "out", cls().out))
        saved = out / "config.yaml"
        if not saved.is_file():
            raise UserError(f"{saved}: no run to {'resume' if args.resume else 'evaluate'} here")
        base = _from_where_it_ran(load_yaml(saved), out)
    return resolve_config(cls, args, base)


# Config fields that name files or folders; `reward` and `labeler` may (rm:PATH, python:FILE.py:FUNC),
# as may `prompts` (a JSONL file, or the world).
_PATH_KEYS = ("init", "rm", "files", "cache_dir", "path", "reward", "labeler", "prompts", "eval_prompts")


def _from_where_it_ran(tree: dict, out: Path) -> dict:
    """A saved run's relative paths, rebased to the folder the run was started in, so that
    --resume and --eval-only work from any folder: the config's `out` is the --out given then,
    so that folder is the run's folder now less that suffix. Unchanged if it cannot tell."""
    then = Path(str(tree.get("out", "")))
    now = out.resolve().parts
    if then.is_absolute() or not then.parts or ".." in then.parts or now[-len(then.parts):] != then.parts:
        return tree
    root = Path(*now[:-len(then.parts)])

    def rebase(v):
        if isinstance(v, list):
            return [rebase(x) for x in v]
        if not isinstance(v, str) or not v or v in ("verifier", "simulated", "world") or v.startswith("world:"):
            return v
        if v.startswith("rm:"):
            return "rm:" + rebase(v[3:])
        if v.startswith("python:"):  # a module on sys.path stays; a file's path is rebased
            target, _, name = v[7:].rpartition(":")
            return f"python:{rebase(target)}:{name}" if target.endswith(".py") or "/" in target else v
        return v if Path(v).is_absolute() else str(root / v)

    def walk(node: dict) -> dict:
        return {k: walk(v) if isinstance(v, dict) else rebase(v) if k in _PATH_KEYS else v for k, v in node.items()}

    return walk(tree) if root != Path.cwd().resolve() else tree


# ---------------------------------------------------------------- encoders: heads, fill-mask, embed


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
    _json_flag(p)
    p.set_defaults(func=_finetune_head)


def _finetune_head(args) -> dict:
    from chatfoundry.train.head import HeadConfig, run

    return run(resolve_config(HeadConfig, args), overwrite=args.overwrite)


def _fill_mask_parser(sub) -> None:
    p = sub.add_parser("fill-mask", help="the tokens a masked-LM encoder puts in each [MASK] of a text",
                       description="Print the top tokens, with probabilities, for each [MASK] in --text. With "
                                   "--json the last line is {\"text\", \"predictions\": [{token, token_id, prob}, "
                                   "...]} for the first [MASK] (and \"per_mask\" for all of them).")
    p.add_argument("--ckpt", required=True, help="an encoder checkpoint (BertForMaskedLM) or its run folder")
    p.add_argument("--text", required=True, help='text with [MASK] where a token is hidden, e.g. "Paris is a [MASK] city."')
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="cpu")
    _json_flag(p)
    p.set_defaults(func=_fill_mask)


def _fill_mask(args) -> dict:
    from chatfoundry.checkpoint import load_encoder
    from chatfoundry.textenc import MASK, fill_mask

    if args.top_k <= 0:
        raise UserError(f"--top-k: must be > 0, got {args.top_k}")
    if MASK not in args.text:
        raise UserError(f"--text: has no {MASK} to fill (e.g. \"Paris is the capital of {MASK}.\")")
    model, tokenizer = load_encoder(args.ckpt, args.device, kinds=("mlm",))
    per_mask = fill_mask(model, tokenizer, args.text, args.top_k)
    for i, predictions in enumerate(per_mask):
        if not args.json:
            print(f"[MASK] #{i + 1}:" if len(per_mask) > 1 else args.text)
            for p in predictions:
                print(f"  {p['prob']:.4f}  {p['token']}")
    return {"text": args.text, "predictions": per_mask[0], "per_mask": per_mask}


def _embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="print a sentence vector per text from an encoder",
                       description="One vector per --text: the mean of the final hidden states over the text's "
                                   "tokens ([CLS] and [SEP] included; --pooling mean, the default: works without "
                                   "finetuning) or the final hidden state of [CLS] (--pooling cls). Any encoder "
                                   "checkpoint: masked-LM, BertModel or a finetuned head's body.")
    p.add_argument("--ckpt", required=True, help="an encoder checkpoint or its run folder")
    p.add_argument("--text", required=True, action="append", help="a text to embed; repeat for several")
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean")
    p.add_argument("--device", default="cpu")
    _json_flag(p)
    p.set_defaults(func=_embed)


def _embed(args) -> dict:
    from chatfoundry.checkpoint import load_encoder
    from chatfoundry.textenc import embed_texts

    bad = [i for i, t in enumerate(args.text) if not t.strip()]
    if bad:
        raise UserError(f"--text #{bad[0] + 1}: is empty")
    model, tokenizer = load_encoder(args.ckpt, args.device)
    body = model.body if hasattr(model, "body") else model
    vectors = embed_texts(body, tokenizer, args.text, args.pooling)
    if not args.json:
        for v in vectors.tolist():
            print(" ".join(f"{x:.6f}" for x in v))
    return {"pooling": args.pooling, "dim": vectors.shape[1], "texts": args.text,
            "embeddings": [[round(x, 6) for x in v] for v in vectors.tolist()]}


# ---------------------------------------------------------------- sft, eval and the task world


def _sft_parser(sub) -> None:
    from chatfoundry.train.sft import SFTConfig

    p = sub.add_parser("sft", help="supervised finetuning: teach a pretrained model the assistant format",
                       description="Finetune a pretrained checkpoint on conversations (the task world's train "
                                   "split, or JSONL files: text, prompt/completion, messages, Alpaca, or the "
                                   "chosen/best reply of preference and ranking files), learning the assistant "
                                   "turns only; scores the result on the world's test split.")
    add_config_args(p, SFTConfig, aliases={"--data": "data.files"})
    _run_flags(p)
    p.set_defaults(func=_sft)


def _sft(args) -> dict:
    from chatfoundry.train.sft import SFTConfig, run

    return run(_stage_config(SFTConfig, args), resume=args.resume, overwrite=args.overwrite)


def _seq2seq_parser(sub) -> None:
    from chatfoundry.train.seq2seq import FinetuneSeq2SeqConfig

    p = sub.add_parser("finetune-seq2seq", help="finetune an encoder-decoder (T5) on input/target pairs",
                       description="Teach a span-corruption-pretrained T5 checkpoint to map inputs to targets: "
                                   "JSONL lines {\"input\": ..., \"target\": ...} or a task of the built-in world "
                                   "(world:strings/reverse). Reports exact match of greedy outputs on held-out inputs "
                                   "(the world's test split, or val_fraction of a file).")
    add_config_args(p, FinetuneSeq2SeqConfig)
    _run_flags(p)
    p.set_defaults(func=_seq2seq)


def _seq2seq(args) -> dict:
    from chatfoundry.train.seq2seq import FinetuneSeq2SeqConfig, run

    return run(_stage_config(FinetuneSeq2SeqConfig, args), resume=args.resume, overwrite=args.overwrite)


# ---------------------------------------------------------------- comparisons and the reward model


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
    _json_flag(p)
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
    _run_flags(p)
    p.set_defaults(func=_rm)


def _rm(args) -> dict:
    from chatfoundry.train.reward import RMConfig, run

    return run(_stage_config(RMConfig, args), resume=args.resume, overwrite=args.overwrite)


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
    _run_flags(p)
    p.add_argument("--eval-only", action="store_true",
                   help="train nothing: score the finished run in --out (its config.yaml, then these flags) against "
                        "its reference again, e.g. --eval.samples 16 for a smaller standard error; writes nothing")
    p.set_defaults(func=_ppo)


def _ppo(args) -> dict:
    from chatfoundry.train.ppo import PPOConfig, evaluate_run, run

    if args.eval_only:
        if args.resume or args.overwrite:
            raise UserError("--eval-only: trains nothing; drop --resume and --overwrite")
        return evaluate_run(_stage_config(PPOConfig, args))
    return run(_stage_config(PPOConfig, args), resume=args.resume, overwrite=args.overwrite)


def _score_parser(sub) -> None:
    p = sub.add_parser("score", help="print a reward model's score of a response (or several) to a prompt")
    p.add_argument("--rm", required=True, help="reward model checkpoint (or the run folder holding it)")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--response", required=True, action="append", help="a response to score; repeat for several")
    p.add_argument("--system", default=None, help="a system message before the prompt")
    p.add_argument("--device", default="cpu")
    _json_flag(p)
    p.set_defaults(func=_score)


def _score(args) -> dict:
    from chatfoundry.checkpoint import load_reward_model
    from chatfoundry.scoring import score_texts

    bad = [i for i, r in enumerate(args.response) if not r.strip()]
    if bad or not args.prompt.strip():
        raise UserError("--prompt: is empty" if not args.prompt.strip() else f"--response #{bad[0] + 1}: is empty")
    model, tokenizer = load_reward_model(args.rm, args.device)
    prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    rewards = score_texts(model, tokenizer, [prompt] * len(args.response), args.response)
    for reward, response in zip(rewards, args.response):
        print(f"{reward:+.4f}  {response}" if len(rewards) > 1 else f"{reward:.4f}")
    return {"rewards": [round(r, 6) for r in rewards], "reward": round(rewards[0], 6)}


def _pipeline_parser(sub) -> None:
    from chatfoundry.pipeline import PipelineConfig

    p = sub.add_parser("pipeline", help="the whole recipe on the built-in world: pretrain, SFT, label, RM, PPO, report",
                       description="Pretrain (tokenizer included), SFT, label, reward model and PPO on the built-in "
                                   "task world, each stage in its own folder under --out; a finished stage is "
                                   "skipped, so an interrupted pipeline resumes. Ends with report.md and its plots. "
                                   "Any stage's setting is a flag, e.g. --ppo.iterations 20.")
    add_config_args(p, PipelineConfig)
    p.add_argument("--overwrite", action="store_true", help="run every stage again, replacing what --out holds")
    _json_flag(p)
    p.set_defaults(func=_pipeline)


def _pipeline(args) -> dict:
    from chatfoundry.pipeline import PipelineConfig, run

    return run(resolve_config(PipelineConfig, args), overwrite=args.overwrite)


def _eval_parser(sub) -> None:
    from chatfoundry.data.world import FAMILIES, SPLITS

    p = sub.add_parser("eval", help="score a chat checkpoint on the task world (exact match, gold reward)")
    p.add_argument("--ckpt", required=True, help="checkpoint folder (or the run folder holding it)")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--per-family", type=int, default=100, help="questions per family")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ", ".join(FAMILIES))
    p.add_argument("--system", default=None, help="a system message to put before each question")
    p.add_argument("--tool-questions", type=int, default=0,
                   help="also score N held-out calculator questions with the calculator on offer and without")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="folder for eval.json (every answer) and eval.png")
    p.add_argument("--device", default="cpu")
    _json_flag(p)
    p.set_defaults(func=_eval)


def _eval(args) -> dict:
    from chatfoundry.checkpoint import load_model
    from chatfoundry.data.world import FAMILIES
    from chatfoundry.eval.world import evaluate_world, format_report, write_report

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise UserError(f"--families: {unknown[0] if unknown else 'empty'!r} is not one of {', '.join(FAMILIES)}")
    for name in ("per_family", "max_new_tokens", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')}: must be > 0")
    if args.tool_questions < 0:
        raise UserError("--tool-questions: must be >= 0")
    model, tokenizer = load_model(args.ckpt, args.device)
    report = evaluate_world(model, tokenizer, args.split, args.per_family, families, args.system,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            tool_questions=args.tool_questions)
    print(format_report(report))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_report(report, Path(args.out), f"{args.ckpt} on the world's {args.split} split")
    summary = {k: v for k, v in report.items() if k != "answers"}
    if "tool_use" in summary:
        summary["tool_use"] = {k: v for k, v in summary["tool_use"].items() if k != "answers"}
    return summary


def _chat_parser(sub) -> None:
    from chatfoundry.serve.chat import ChatParams

    p = sub.add_parser("chat", help="talk to a chat checkpoint in the terminal (or answer a prompt piped on stdin)",
                       description="An interactive chat with history and streamed answers; /help lists the "
                                   "commands (/reset, /system TEXT, /params NAME=VALUE, /exit). With stdin piped, "
                                   "reads it as one message and prints the answer.")
    p.add_argument("--ckpt", required=True, help="checkpoint folder (or the run folder holding it)")
    p.add_argument("--system", default=None, help="the system message")
    defaults = ChatParams()
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy")
    p.add_argument("--top-p", type=float, default=defaults.top_p)
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="0: off")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tools", default="", help="tools on offer, comma-separated (built in: calculator); the model's "
                                                "calls run and their results go back to it")
    p.add_argument("--device", default="cpu")
    _compile_flag(p)
    p.set_defaults(func=_chat)


def _chat(args) -> dict:
    from chatfoundry.checkpoint import load_model
    from chatfoundry.serve.chat import ChatParams, ChatSession, run_repl, set_param
    from chatfoundry.tools import TOOLS
    from chatfoundry.tokenizer import SPECIAL_TOKENS, special_id

    params = ChatParams()
    for name in ("temperature", "top_p", "top_k", "max_new_tokens", "seed"):
        value = getattr(args, name)
        if value is not None:
            try:
                set_param(params, f"{name}={value}")
            except ValueError as e:
                raise UserError(f"--{name.replace('_', '-')}: {e}") from None
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise UserError(f"--tools: unknown tool {unknown[0]!r}: built in are {', '.join(TOOLS)}")
    model, tokenizer = load_model(args.ckpt, args.device)
    model = _maybe_compile(model, args)
    if names and special_id(tokenizer, "tool") is None:
        raise UserError(f"--tools: {args.ckpt}: the tokenizer has no {SPECIAL_TOKENS['tool']} token to call tools with")
    status = run_repl(ChatSession(model, tokenizer, system=args.system, params=params,
                                  tools={n: TOOLS[n] for n in names}))
    if status:
        raise SystemExit(status)
    return {}


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a chat checkpoint over an OpenAI-compatible HTTP API",
                       description="GET /health, GET /v1/models, POST /v1/chat/completions and /v1/completions "
                                   "(streamed with stream: true); the openai client works against it. Listens on "
                                   "127.0.0.1 unless --host says otherwise.")
    p.add_argument("--ckpt", required=True, help="checkpoint folder (or the run folder holding it)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 routes")
    p.add_argument("--model-name", default=None, help="the model's id in the API (default: the folder's name); "
                                                      "a request naming another model gets this one")
    p.add_argument("--max-choices", type=int, default=None,
                   help="choices one request may ask for, prompts x n (default: 32); more get a 400")
    p.add_argument("--device", default="cpu")
    _compile_flag(p)
    p.set_defaults(func=_serve)


def _serve(args) -> dict:
    from pathlib import Path

    from chatfoundry.checkpoint import load_model
    from chatfoundry.serve.api import MAX_CHOICES, check_api_key, create_app

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: must be in 0..65535, got {args.port}")
    check_api_key(args.api_key)  # before loading: a key no client can send is refused at once
    max_choices = MAX_CHOICES if args.max_choices is None else args.max_choices
    if max_choices < 1:
        raise UserError(f"--max-choices: must be >= 1, got {max_choices}")
    model, tokenizer = load_model(args.ckpt, args.device)
    model = _maybe_compile(model, args)
    import uvicorn

    name = args.model_name or Path(args.ckpt).resolve().name
    app = create_app(model, tokenizer, name, api_key=args.api_key, max_choices=max_choices)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return {}


def _world_parser(sub) -> None:
    from chatfoundry.data.world import CROWD

    p = sub.add_parser("world", help="the built-in task world: export its corpus and datasets")
    wsub = p.add_subparsers(dest="action", required=True, parser_class=ArgumentParser)
    e = wsub.add_parser("export", help="write the corpus and every dataset as JSONL (text, messages, "
                                       "prompt/completion, Alpaca, preference, rankings)")
    e.add_argument("--out", required=True, help="folder to write into")
    e.add_argument("--conversations", type=int, default=8000, help="SFT conversations in sft_train.jsonl")
    e.add_argument("--test-per-family", type=int, default=100)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--crowd", nargs="+", metavar="WRITER:WEIGHT", default=None,
                   help="who writes the SFT demonstrations (each line records its writer); default: the world's crowd "
                        "(" + " ".join(f"{w}:{x:g}" for w, x in CROWD.items()) + "); careful:1 gives the references")
    _json_flag(e)
    e.set_defaults(func=_world_export)


def _world_export(args) -> dict:
    from chatfoundry.data.world import export, parse_crowd

    if args.conversations <= 0 or args.test_per_family <= 0:
        raise UserError("--conversations and --test-per-family: must be > 0")
    try:
        crowd = parse_crowd(args.crowd) if args.crowd is not None else None
    except ValueError as e:
        raise UserError(f"--crowd: {e}") from None
    counts = export(args.out, args.conversations, args.test_per_family, args.seed, crowd=crowd)
    for name, n in counts.items():
        print(f"{Path(args.out) / name}: {n:,} records")
    return {"out": args.out, "files": counts}


# ---------------------------------------------------------------- sample


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="print continuations of a prompt from a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint folder (or the run folder holding it)")
    p.add_argument("--prompt", default="", help="text to continue (default: start a fresh document)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40, help="0: no top-k filter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    _json_flag(p)
    p.set_defaults(func=_sample)


def _sample(args) -> dict:
    from chatfoundry.checkpoint import load_model
    from chatfoundry.textgen import generate_text

    for name in ("num_samples", "max_new_tokens", "top_k"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 0")
    if args.temperature < 0:
        raise UserError("--temperature: must be >= 0")
    model, tokenizer = load_model(args.ckpt, args.device)
    texts = generate_text(model, tokenizer, args.prompt, args.num_samples, args.max_new_tokens, args.temperature,
                          args.top_k, args.seed)
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1} ---\n{args.prompt}{text}")
    return {"prompt": args.prompt, "samples": texts}


# ---------------------------------------------------------------- generate and decode-compare


def _generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint folder (or the run folder holding it)")
    p.add_argument("--prompt", default="", help="text to continue (default: start a fresh document)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    _compile_flag(p)
    _json_flag(p)


def _compile_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decoding step with torch.compile (decoder-only models): several "
                        "times faster per token on a CPU, after compiling for tens of seconds on first use "
                        "(and again for a first batch of several rows)")


def _maybe_compile(model, args):
    """The model, its decoding step compiled when --compile asks (generation.compile_for_decoding)."""
    from chatfoundry.generation import compile_for_decoding
    from chatfoundry.models.decoder import DecoderLM

    if not args.compile:
        return model
    if not isinstance(model, DecoderLM):
        raise UserError("--compile: only decoder-only models compile their decoding step for now")
    return compile_for_decoding(model)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="decode a prompt: greedy, beam search or sampling (top-k, top-p, min-p)",
                       description="Continue a prompt with one decoding strategy. With --json the last line "
                                   "holds text, prompt_token_ids, token_ids (the new tokens) and logprobs "
                                   "(one per new token, under the model's own distribution).")
    _generation_flags(p)
    p.add_argument("--strategy", choices=("greedy", "beam", "sample"), default="greedy")
    p.add_argument("--num-beams", type=int, default=4, help="beam: beams kept")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam: score = logprob / length ** this")
    p.add_argument("--early-stopping", choices=("true", "false", "never"), default="false")
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0, help="sample: logits / temperature")
    p.add_argument("--top-k", type=int, default=0, help="sample: keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample: nucleus mass in (0, 1] (1: off)")
    p.add_argument("--min-p", type=float, default=None, help="sample: drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the text before this string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print the text as tokens arrive (greedy and sample)")
    p.set_defaults(func=_generate)


def _decode_result(tokenizer, prompt_ids: list[int], out, stops=()) -> dict:
    """The --json shape: the first (best) sequence at the top level, every sequence in `sequences`."""
    from chatfoundry.textgen import TextStream

    def text(ids):
        return TextStream(tokenizer, stops, list(ids)).flush()  # decoded, cut before a stop string

    seqs = [{"text": text(ids), "token_ids": ids, "logprobs": lps, "score": score}
            for ids, lps, score in zip(out.sequences, out.token_logprobs, out.scores)]
    return {**{k: seqs[0][k] for k in ("text", "token_ids", "logprobs")}, "prompt_token_ids": prompt_ids,
            "sequences": seqs}


def _generation_model(args):
    """(model, tokenizer, decoder prompt ids, input ids, text the output continues). A decoder LM
    continues the prompt; an encoder-decoder (T5) reads it as its input and writes from its
    decoder's start token, through the same decoding code (`Seq2SeqLM.bind`)."""
    from chatfoundry.checkpoint import load_model
    from chatfoundry.models.seq2seq import Seq2SeqLM
    from chatfoundry.textgen import prompt_ids
    from chatfoundry.train.seq2seq import encode_inputs

    model, tokenizer = load_model(args.ckpt, args.device, seq2seq=True)
    model = _maybe_compile(model, args)
    if not isinstance(model, Seq2SeqLM):
        ids = prompt_ids(tokenizer, args.prompt, model.config.block_size, "--prompt")
        return model, tokenizer, ids, ids, args.prompt
    if not args.prompt:
        raise UserError("--prompt: an encoder-decoder model needs an input text")
    inputs = encode_inputs(tokenizer, [args.prompt])[0]
    if len(inputs) > model.config.block_size:
        raise UserError(f"--prompt: {len(inputs)} tokens exceed the model's block_size {model.config.block_size}")
    return model.bind([inputs]), tokenizer, [model.config.decoder_start_token_id], inputs, ""


def _generate(args) -> dict:
    from chatfoundry.generation import GenerationConfig, generate
    from chatfoundry.textgen import complete
    from chatfoundry.tokenizer import special_id

    model, tokenizer, ids, inputs, shown = _generation_model(args)
    if args.temperature < 0:
        raise UserError(f"--temperature: must be >= 0, got {args.temperature}")
    sampling = args.strategy == "sample" and args.temperature > 0  # temperature 0: greedy
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=sampling, temperature=args.temperature if sampling else 1.0,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size, num_beams=args.num_beams if args.strategy == "beam" else 1,
        length_penalty=args.length_penalty, num_return_sequences=args.num_return_sequences,
        early_stopping={"true": True, "false": False}.get(args.early_stopping, "never"),
        eos_token_id=special_id(tokenizer, "eos"), seed=args.seed)
    cfg.validate()
    if cfg.num_beams == 1 and cfg.num_return_sequences == 1:  # one sequence: stream it, stop strings and all
        if args.stream:
            print(shown, end="", flush=True)
        show = (lambda piece: print(piece, end="", flush=True)) if args.stream else None
        result = complete(model, tokenizer, ids, cfg, args.stop, on_text=show)
        if args.stream:
            print()
        else:
            print(f"--- {args.strategy} (total logprob {sum(result['logprobs']):.2f}) ---\n{shown}{result['text']}")
        seq = {k: result[k] for k in ("text", "token_ids", "logprobs")}
        return {**result, "prompt_token_ids": inputs, "sequences": [{**seq, "score": sum(result["logprobs"])}]}
    if args.stream:
        raise UserError("--stream: streams one sequence; use --num-return-sequences 1 and no beam search")
    result = _decode_result(tokenizer, inputs, generate(model, ids, cfg), args.stop)
    for i, seq in enumerate(result["sequences"]):
        print(f"--- {args.strategy} {i + 1} (total logprob {sum(seq['logprobs']):.2f}) ---\n{shown}{seq['text']}")
    return result


# The strategies the talk contrasts, from most to least conservative.
COMPARE = {
    "greedy": dict(),
    "beam (4)": dict(num_beams=4),
    "sample (T=1)": dict(do_sample=True),
    "top-k (k=10)": dict(do_sample=True, top_k=10),
    "top-p (p=0.9)": dict(do_sample=True, top_p=0.9),
    "top-p (p=0.9, T=0.7)": dict(do_sample=True, top_p=0.9, temperature=0.7),
}


def _compare_parser(sub) -> None:
    p = sub.add_parser("decode-compare", help="each decoding strategy's output side by side with its total logprob")
    _generation_flags(p)
    p.set_defaults(func=_compare)


def _compare(args) -> list:
    from chatfoundry.generation import GenerationConfig, generate
    from chatfoundry.tokenizer import special_id

    model, tokenizer, ids, inputs, _ = _generation_model(args)
    rows = []
    for name, knobs in COMPARE.items():
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=special_id(tokenizer, "eos"),
                               seed=args.seed, **knobs)
        out = _decode_result(tokenizer, inputs, generate(model, ids, cfg))
        rows.append({"strategy": name, "text": out["text"], "logprob": sum(out["logprobs"]),
                     "tokens": len(out["token_ids"])})
    width = max(len(r["strategy"]) for r in rows)
    print(f"prompt: {args.prompt!r}")
    for r in rows:
        print(f"{r['strategy']:<{width}}  logprob {r['logprob']:8.2f} ({r['tokens']:3} tokens)  "
              f"{r['text']!r}")
    return rows


# ---------------------------------------------------------------- convert


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="import a Hugging Face GPT-2/Llama/Mistral/Qwen2/BERT/T5 folder, or export ours "
                                       "for transformers")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="SRC", help="a local transformers model folder to import")
    way.add_argument("--to-hf", metavar="SRC", help="our checkpoint (or run folder) to export")
    p.add_argument("--out", required=True, help="folder to write")
    _json_flag(p)
    p.set_defaults(func=_convert)


def _convert(args) -> dict:
    from chatfoundry.convert import from_hf, to_hf

    result = from_hf(args.from_hf, args.out) if args.from_hf else to_hf(args.to_hf, args.out)
    kind = " sequence-classification (reward model)" if result.get("reward_model") else ""
    print(f"wrote {result['out']} ({result['architecture'] or 'chatfoundry'}{kind} layout)")
    if result.get("note"):
        print("note: " + result["note"])
    return result


# ---------------------------------------------------------------- tokenizer


def _tokenizer_parser(sub) -> None:
    from chatfoundry.tokenizer import KINDS

    p = sub.add_parser("tokenizer", help="train, encode and decode with a tokenizer")
    tsub = p.add_subparsers(dest="action", required=True, parser_class=ArgumentParser)
    t = tsub.add_parser("train", help="train a tokenizer on text files (default: the built-in corpus)")
    t.add_argument("files", nargs="*", help="text files or folders")
    t.add_argument("--kind", choices=KINDS, default="bpe", help="bpe is byte-level BPE (GPT-2); char is characters")
    t.add_argument("--vocab-size", type=int, default=2048)
    t.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    _json_flag(t)
    t.set_defaults(func=_tokenizer_train)
    e = tsub.add_parser("encode", help="text -> token ids")
    e.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder with one")
    e.add_argument("--text", required=True)
    _json_flag(e)
    e.set_defaults(func=_tokenizer_encode)
    d = tsub.add_parser("decode", help="token ids -> text")
    d.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder with one")
    d.add_argument("ids", nargs="+", type=int)
    d.add_argument("--skip-special", action="store_true", help="drop special tokens from the text")
    _json_flag(d)
    d.set_defaults(func=_tokenizer_decode)


def _tokenizer_train(args) -> dict:
    from chatfoundry.data import corpus
    from chatfoundry.data.shards import read_documents, resolve_inputs
    from chatfoundry.tokenizer import save_tokenizer, train_tokenizer

    if args.files:
        docs = read_documents(resolve_inputs(args.files))
    else:
        docs = iter(corpus.generate_corpus().split("\n\n"))
    tok = train_tokenizer(docs, args.kind, args.vocab_size)
    save_tokenizer(tok, args.out)
    print(f"{args.kind} tokenizer with {tok.get_vocab_size()} tokens written to {args.out}/tokenizer.json")
    return {"path": str(Path(args.out) / "tokenizer.json"), "kind": args.kind, "vocab_size": tok.get_vocab_size()}


def _tokenizer_encode(args) -> dict:
    from chatfoundry.tokenizer import load_tokenizer

    enc = load_tokenizer(args.tokenizer).encode(args.text, add_special_tokens=False)
    if not args.json:
        print(" ".join(map(str, enc.ids)))
    return {"ids": enc.ids, "tokens": enc.tokens}


def _tokenizer_decode(args) -> dict:
    from chatfoundry.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    bad = [i for i in args.ids if not 0 <= i < tok.get_vocab_size()]
    if bad:
        raise UserError(f"ids: {bad[0]} is outside the vocabulary (0..{tok.get_vocab_size() - 1})")
    text = tok.decode(args.ids, skip_special_tokens=args.skip_special)
    if not args.json:
        print(text)
    return {"text": text}


# ---------------------------------------------------------------- presets


def _presets_parser(sub) -> None:
    p = sub.add_parser("presets", help="list the model size presets with parameters and FLOPs per token")
    p.add_argument("--vocab-size", type=int, default=2048)
    _json_flag(p)
    p.set_defaults(func=_presets)


def _presets(args) -> list:
    import torch

    from chatfoundry.models.decoder import FLAVOURS, PRESETS, DecoderConfig, DecoderLM, flops_per_token, num_params

    if args.vocab_size <= 0:
        raise UserError("--vocab-size: must be > 0")
    rows = []
    print(f"{'preset':8} {'flavour':8} {'layers':>6} {'heads':>5} {'kv':>3} {'embd':>5} {'block':>5} "
          f"{'params':>10} {'train GFLOPs/token':>18}")
    for name in PRESETS:
        for flavour in FLAVOURS:
            cfg = DecoderConfig.from_preset(name, flavour)
            cfg.vocab_size = args.vocab_size
            with torch.device("meta"):
                params = num_params(DecoderLM(cfg))
            flops = flops_per_token(cfg)
            rows.append({"preset": name, "flavour": flavour, "params": params, "flops_per_token": flops})
            print(f"{name:8} {flavour:8} {cfg.n_layer:6} {cfg.n_head:5} {cfg.n_kv_head:3} {cfg.n_embd:5} "
                  f"{cfg.block_size:5} {params:10,} {flops / 1e9:18.4f}")
    return rows


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="chatfoundry", allow_abbrev=False,
                            description="The ChatGPT recipe, small enough to read and run on a laptop.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for add in (_pipeline_parser, _pretrain_parser, _sft_parser, _seq2seq_parser, _label_parser, _rm_parser, _ppo_parser, _score_parser,
                _eval_parser, _chat_parser, _serve_parser, _world_parser, _sample_parser, _generate_parser,
                _compare_parser, _convert_parser, _tokenizer_parser, _presets_parser, _finetune_head_parser,
                _fill_mask_parser, _embed_parser):
        add(sub)
    from chatfoundry.rl.cli import add_rl_parser

    add_rl_parser(sub)  # chatfoundry rl train | compare | play
    return parser


def main(argv: list[str] | None = None) -> int:
    from chatfoundry.train.loop import TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except UserError as e:
        print(f"chatfoundry {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"chatfoundry {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"chatfoundry {args.command}: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False) and os.environ.get("RANK", "0") == "0":  # one summary under torchrun
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
