"""Data and checkpoints: world export, convert (transformers folders in and out), tokenizer, presets.
"""

from __future__ import annotations

from pathlib import Path

from chatfoundry.commands.common import json_flag
from chatfoundry.config import ArgumentParser
from chatfoundry.errors import UserError


def _world_parser(sub) -> None:
    from chatfoundry.data.world import CROWD

    p = sub.add_parser("world", help="the built-in task world: export its corpus and datasets")
    wsub = p.add_subparsers(dest="action", required=True, parser_class=ArgumentParser)
    e = wsub.add_parser("export", help="write the corpus and every dataset as JSONL (text, messages, "
                                       "prompt/completion, Alpaca, preference, rankings)")
    e.add_argument("--out", required=True, help="folder to write into")
    e.add_argument("--conversations", type=int, default=8000, help="SFT conversations in sft_train.jsonl")
    e.add_argument("--test_per_family", type=int, default=100)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--crowd", nargs="+", metavar="WRITER:WEIGHT", default=None,
                   help="who writes the SFT demonstrations (each line records its writer); default: the world's crowd "
                        "(" + " ".join(f"{w}:{x:g}" for w, x in CROWD.items()) + "); careful:1 gives the references")
    json_flag(e)
    e.set_defaults(func=_world_export)


def _world_export(args) -> dict:
    from chatfoundry.data.builtin import export
    from chatfoundry.data.world import parse_crowd

    if args.conversations <= 0 or args.test_per_family <= 0:
        raise UserError("--conversations and --test_per_family: must be > 0")
    try:
        crowd = parse_crowd(args.crowd) if args.crowd is not None else None
    except ValueError as e:
        raise UserError(f"--crowd: {e}") from None
    counts = export(args.out, args.conversations, args.test_per_family, args.seed, crowd=crowd)
    for name, n in counts.items():
        print(f"{Path(args.out) / name}: {n:,} records")
    return {"out": args.out, "files": counts}


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="import a Hugging Face GPT-2/Llama/Mistral/Qwen2/BERT/T5 folder, or export ours "
                                       "for transformers")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from_hf", metavar="SRC", help="a transformers model folder to import, or a Hub model "
                                                       "ORG/NAME[@REVISION] (fetched into the hub cache unless there)")
    way.add_argument("--to_hf", metavar="SRC", help="our checkpoint (or run folder) to export")
    p.add_argument("--out", required=True, help="folder to write")
    json_flag(p)
    p.set_defaults(func=_convert)


def _convert(args) -> dict:
    from chatfoundry import hub
    from chatfoundry.convert import from_hf, to_hf

    result = from_hf(hub.model_folder(args.from_hf), args.out) if args.from_hf else to_hf(args.to_hf, args.out)
    kind = " sequence-classification (reward model)" if result.get("reward_model") else ""
    print(f"wrote {result['out']} ({result['architecture'] or 'chatfoundry'}{kind} layout)")
    if result.get("note"):
        print("note: " + result["note"])
    return result


def _tokenizer_parser(sub) -> None:
    from chatfoundry.tokenizer import KINDS

    p = sub.add_parser("tokenizer", help="train, encode and decode with a tokenizer")
    tsub = p.add_subparsers(dest="action", required=True, parser_class=ArgumentParser)
    t = tsub.add_parser("train", help="train a tokenizer on text files (default: the built-in corpus)")
    t.add_argument("files", nargs="*", help="text files or folders")
    t.add_argument("--kind", choices=KINDS, default="bpe", help="bpe is byte-level BPE (GPT-2); char is characters")
    t.add_argument("--vocab_size", type=int, default=2048)
    t.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    json_flag(t)
    t.set_defaults(func=_tokenizer_train)
    e = tsub.add_parser("encode", help="text -> token ids")
    e.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder with one")
    e.add_argument("--text", required=True)
    json_flag(e)
    e.set_defaults(func=_tokenizer_encode)
    d = tsub.add_parser("decode", help="token ids -> text")
    d.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder with one")
    d.add_argument("ids", nargs="+", type=int)
    d.add_argument("--skip_special", action="store_true", help="drop special tokens from the text")
    json_flag(d)
    d.set_defaults(func=_tokenizer_decode)


def _tokenizer_train(args) -> dict:
    from chatfoundry.data import builtin
    from chatfoundry.data.shards import read_documents, resolve_inputs
    from chatfoundry.tokenizer import save_tokenizer, train_tokenizer

    if args.files:
        docs = read_documents(resolve_inputs(args.files))
    else:
        docs = iter(builtin.generate_corpus().split("\n\n"))
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


def _presets_parser(sub) -> None:
    p = sub.add_parser("presets", help="list the model size presets with parameters and FLOPs per token")
    p.add_argument("--vocab_size", type=int, default=2048)
    json_flag(p)
    p.set_defaults(func=_presets)


def _presets(args) -> list:
    import torch

    from chatfoundry.models.decoder import FLAVOURS, PRESETS, DecoderConfig, DecoderLM, flops_per_token, num_params

    if args.vocab_size <= 0:
        raise UserError("--vocab_size: must be > 0")
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


def add_parsers(sub) -> None:
    for add in (_world_parser, _convert_parser, _tokenizer_parser, _presets_parser):
        add(sub)
