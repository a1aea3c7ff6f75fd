"""Flags and helpers the command groups share: --json, --resume/--overwrite, a stage's config
resolved from a saved run, and the decoding flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chatfoundry.config import load_yaml, resolve_config
from chatfoundry import hub
from chatfoundry.errors import UserError


def json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last line")


def run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    json_flag(p)


def stage_config(cls, args):
    """The stage's config: defaults < the resumed (or re-evaluated) run's config.yaml < --config YAML < flags."""
    base = None
    if args.resume or getattr(args, "eval_only", False):
        out = Path(getattr(args, "out", cls().out))
        saved = out / "config.yaml"
        if not saved.is_file():
            raise UserError(f"{saved}: no run to {'resume' if args.resume else 'evaluate'} here")
        base = from_where_it_ran(load_yaml(saved), out)
    return resolve_config(cls, args, base)

# Config fields that name files or folders; `reward` and `labeler` may (rm:PATH, python:FILE.py:FUNC),
# as may `prompts` (a JSONL file, or the world).
PATH_KEYS = ("init", "rm", "files", "cache_dir", "path", "reward", "labeler", "prompts", "eval_prompts")


def from_where_it_ran(tree: dict, out: Path) -> dict:
    """A saved run's relative paths, rebased to the folder the run was started in, so that
    --resume and --eval_only work from any folder: the config's `out` is the --out given then,
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
        return {k: walk(v) if isinstance(v, dict) else rebase(v) if k in PATH_KEYS else v for k, v in node.items()}

    return walk(tree) if root != Path.cwd().resolve() else tree


def generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint folder (or the run folder holding it)")
    p.add_argument("--prompt", default="", help="text to continue (default: start a fresh document)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    compile_flag(p)
    json_flag(p)


def compile_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decoding step with torch.compile (decoder-only models): several "
                        "times faster per token on a CPU, after compiling for tens of seconds on first use "
                        "(and again for a first batch of several rows)")


def maybe_compile(model, args):
    """The model, its decoding step compiled when --compile asks (generation.compile_for_decoding)."""
    from chatfoundry.generation import compile_for_decoding
    from chatfoundry.models.decoder import DecoderLM

    if not args.compile:
        return model
    if not isinstance(model, DecoderLM):
        raise UserError("--compile: only decoder-only models compile their decoding step for now")
    return compile_for_decoding(model)


def decode_result(tokenizer, prompt_ids: list[int], out, stops=()) -> dict:
    """The --json shape: the first (best) sequence at the top level, every sequence in `sequences`."""
    from chatfoundry.textgen import TextStream

    def text(ids):
        return TextStream(tokenizer, stops, list(ids)).flush()  # decoded, cut before a stop string

    seqs = [{"text": text(ids), "token_ids": ids, "logprobs": lps, "score": score}
            for ids, lps, score in zip(out.sequences, out.token_logprobs, out.scores)]
    return {**{k: seqs[0][k] for k in ("text", "token_ids", "logprobs")}, "prompt_token_ids": prompt_ids,
            "sequences": seqs}


def generation_model(args):
    """(model, tokenizer, decoder prompt ids, input ids, text the output continues). A decoder LM
    continues the prompt; an encoder-decoder (T5) reads it as its input and writes from its
    decoder's start token, through the same decoding code (`Seq2SeqLM.bind`)."""
    from chatfoundry.checkpoint import load_model
    from chatfoundry.models.seq2seq import Seq2SeqLM
    from chatfoundry.textgen import prompt_ids
    from chatfoundry.train.seq2seq import encode_inputs

    model, tokenizer = load_model(hub.resolve(args.ckpt), args.device, seq2seq=True)
    model = maybe_compile(model, args)
    if not isinstance(model, Seq2SeqLM):
        ids = prompt_ids(tokenizer, args.prompt, model.config.block_size, "--prompt")
        return model, tokenizer, ids, ids, args.prompt
    if not args.prompt:
        raise UserError("--prompt: an encoder-decoder model needs an input text")
    inputs = encode_inputs(tokenizer, [args.prompt])[0]
    if len(inputs) > model.config.block_size:
        raise UserError(f"--prompt: {len(inputs)} tokens exceed the model's block_size {model.config.block_size}")
    return model.bind([inputs]), tokenizer, [model.config.decoder_start_token_id], inputs, ""
