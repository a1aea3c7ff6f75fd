"""Using a model: score, eval, chat, serve, sample, generate, decode-compare, fill-mask, embed.
"""

from __future__ import annotations

from pathlib import Path

from chatfoundry.commands.common import compile_flag, decode_result, generation_flags, generation_model, json_flag, maybe_compile
from chatfoundry import hub
from chatfoundry.errors import UserError


def _score_parser(sub) -> None:
    p = sub.add_parser("score", help="print a reward model's score of a response (or several) to a prompt")
    p.add_argument("--rm", required=True, help="reward model checkpoint (or the run folder holding it)")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--response", required=True, action="append", help="a response to score; repeat for several")
    p.add_argument("--system", default=None, help="a system message before the prompt")
    p.add_argument("--device", default="cpu")
    json_flag(p)
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


def _eval_parser(sub) -> None:
    from chatfoundry.data.world import FAMILIES, MULTISTEP, SPLITS

    p = sub.add_parser("eval", help="score a chat checkpoint (or a base one, k-shot) on the task world (exact match, gold reward)")
    p.add_argument("--ckpt", required=True, help="checkpoint folder (or the run folder holding it)")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--per_family", type=int, default=100, help="questions per family")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ", ".join(FAMILIES)
                   + f", or {MULTISTEP} (the multi-step questions of `cot`)")
    p.add_argument("--system", default=None, help="a system message to put before each question")
    p.add_argument("--tool_questions", type=int, default=0,
                   help="also score N held-out calculator questions with the calculator on offer and without")
    p.add_argument("--shots", type=int, default=None, metavar="K",
                   help="ask a base (pretrained) model in its corpus' quiz form (\"Question: ...\\nAnswer: ...\"), after "
                        "K worked questions of the same family from the train split (0: zero-shot; fewer where the "
                        "context is short: shots_used says how many); the answer is read to the end of its line. "
                        "Without it, a chat model is asked in its chat template")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--out", default=None, help="folder for eval.json (every answer) and eval.png")
    p.add_argument("--device", default="cpu")
    json_flag(p)
    p.set_defaults(func=_eval)


def _eval(args) -> dict:
    from chatfoundry.checkpoint import load_model
    from chatfoundry.data.world import FAMILIES, MULTISTEP
    from chatfoundry.eval.world import evaluate_world, format_report, write_report

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in (*FAMILIES, MULTISTEP)]
    if unknown or not families:
        raise UserError(f"--families: {unknown[0] if unknown else 'empty'!r} is not one of "
                        f"{', '.join((*FAMILIES, MULTISTEP))}")
    for name in ("per_family", "max_new_tokens", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name}: must be > 0")
    if args.tool_questions < 0:
        raise UserError("--tool_questions: must be >= 0")
    if args.shots is not None and (args.shots < 0 or args.system or args.tool_questions):
        raise UserError("--shots: must be >= 0" if args.shots < 0 else
                        f"--shots asks a base model in the quiz form; --{'system' if args.system else 'tool_questions'} "
                        "is for a chat model")
    model, tokenizer = load_model(hub.resolve(args.ckpt), args.device)
    report = evaluate_world(model, tokenizer, args.split, args.per_family, families, args.system,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            tool_questions=args.tool_questions, shots=args.shots)
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
    p.add_argument("--top_p", type=float, default=defaults.top_p)
    p.add_argument("--top_k", type=int, default=defaults.top_k, help="0: off")
    p.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tools", default="", help="tools on offer, comma-separated (built in: calculator); the model's "
                                                "calls run and their results go back to it")
    p.add_argument("--device", default="cpu")
    compile_flag(p)
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
                raise UserError(f"--{name}: {e}") from None
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise UserError(f"--tools: unknown tool {unknown[0]!r}: built in are {', '.join(TOOLS)}")
    model, tokenizer = load_model(hub.resolve(args.ckpt), args.device)
    model = maybe_compile(model, args)
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
    p.add_argument("--api_key", default=None, help="require Authorization: Bearer KEY on /v1 routes")
    p.add_argument("--model_name", default=None, help="the model's id in the API (default: the folder's name); "
                                                      "a request naming another model gets this one")
    p.add_argument("--max_choices", type=int, default=None,
                   help="choices one request may ask for, prompts x n (default: 32); more get a 400")
    p.add_argument("--device", default="cpu")
    compile_flag(p)
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
        raise UserError(f"--max_choices: must be >= 1, got {max_choices}")
    model, tokenizer = load_model(hub.resolve(args.ckpt), args.device)
    model = maybe_compile(model, args)
    import uvicorn

    name = args.model_name or Path(args.ckpt).resolve().name
    app = create_app(model, tokenizer, name, api_key=args.api_key, max_choices=max_choices)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return {}


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="print continuations of a prompt from a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint folder (or the run folder holding it)")
    p.add_argument("--prompt", default="", help="text to continue (default: start a fresh document)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=40, help="0: no top-k filter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    json_flag(p)
    p.set_defaults(func=_sample)


def _sample(args) -> dict:
    from chatfoundry.checkpoint import load_model
    from chatfoundry.textgen import generate_text

    for name in ("num_samples", "max_new_tokens", "top_k"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name}: must be >= 0")
    if args.temperature < 0:
        raise UserError("--temperature: must be >= 0")
    model, tokenizer = load_model(hub.resolve(args.ckpt), args.device)
    texts = generate_text(model, tokenizer, args.prompt, args.num_samples, args.max_new_tokens, args.temperature,
                          args.top_k, args.seed)
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1} ---\n{args.prompt}{text}")
    return {"prompt": args.prompt, "samples": texts}


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="decode a prompt: greedy, beam search or sampling (top-k, top-p, min-p)",
                       description="Continue a prompt with one decoding strategy. With --json the last line "
                                   "holds text, prompt_token_ids, token_ids (the new tokens) and logprobs "
                                   "(one per new token, under the model's own distribution).")
    generation_flags(p)
    p.add_argument("--strategy", choices=("greedy", "beam", "sample"), default="greedy")
    p.add_argument("--num_beams", type=int, default=4, help="beam: beams kept")
    p.add_argument("--length_penalty", type=float, default=1.0, help="beam: score = logprob / length ** this")
    p.add_argument("--early_stopping", choices=("true", "false", "never"), default="false")
    p.add_argument("--num_return_sequences", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0, help="sample: logits / temperature")
    p.add_argument("--top_k", type=int, default=0, help="sample: keep the k most likely tokens (0: off)")
    p.add_argument("--top_p", type=float, default=1.0, help="sample: nucleus mass in (0, 1] (1: off)")
    p.add_argument("--min_p", type=float, default=None, help="sample: drop tokens below min_p x the top probability")
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--no_repeat_ngram_size", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the text before this string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print the text as tokens arrive (greedy and sample)")
    p.set_defaults(func=_generate)


def _generate(args) -> dict:
    from chatfoundry.generation import GenerationConfig, generate
    from chatfoundry.textgen import complete
    from chatfoundry.tokenizer import special_id

    model, tokenizer, ids, inputs, shown = generation_model(args)
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
        raise UserError("--stream: streams one sequence; use --num_return_sequences 1 and no beam search")
    result = decode_result(tokenizer, inputs, generate(model, ids, cfg), args.stop)
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
    generation_flags(p)
    p.set_defaults(func=_compare)


def _compare(args) -> list:
    from chatfoundry.generation import GenerationConfig, generate
    from chatfoundry.tokenizer import special_id

    model, tokenizer, ids, inputs, _ = generation_model(args)
    rows = []
    for name, knobs in COMPARE.items():
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=special_id(tokenizer, "eos"),
                               seed=args.seed, **knobs)
        out = decode_result(tokenizer, inputs, generate(model, ids, cfg))
        rows.append({"strategy": name, "text": out["text"], "logprob": sum(out["logprobs"]),
                     "tokens": len(out["token_ids"])})
    width = max(len(r["strategy"]) for r in rows)
    print(f"prompt: {args.prompt!r}")
    for r in rows:
        print(f"{r['strategy']:<{width}}  logprob {r['logprob']:8.2f} ({r['tokens']:3} tokens)  "
              f"{r['text']!r}")
    return rows


def _fill_mask_parser(sub) -> None:
    p = sub.add_parser("fill-mask", help="the tokens a masked-LM encoder puts in each [MASK] of a text",
                       description="Print the top tokens, with probabilities, for each [MASK] in --text. With "
                                   "--json the last line is {\"text\", \"predictions\": [{token, token_id, prob}, "
                                   "...]} for the first [MASK] (and \"per_mask\" for all of them).")
    p.add_argument("--ckpt", required=True, help="an encoder checkpoint (BertForMaskedLM) or its run folder")
    p.add_argument("--text", required=True, help='text with [MASK] where a token is hidden, e.g. "Paris is a [MASK] city."')
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--device", default="cpu")
    json_flag(p)
    p.set_defaults(func=_fill_mask)


def _fill_mask(args) -> dict:
    from chatfoundry.checkpoint import load_encoder
    from chatfoundry.textenc import MASK, fill_mask

    if args.top_k <= 0:
        raise UserError(f"--top_k: must be > 0, got {args.top_k}")
    if MASK not in args.text:
        raise UserError(f"--text: has no {MASK} to fill (e.g. \"Paris is the capital of {MASK}.\")")
    model, tokenizer = load_encoder(hub.resolve(args.ckpt), args.device, kinds=("mlm",))
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
    json_flag(p)
    p.set_defaults(func=_embed)


def _embed(args) -> dict:
    from chatfoundry.checkpoint import load_encoder
    from chatfoundry.textenc import embed_texts

    bad = [i for i, t in enumerate(args.text) if not t.strip()]
    if bad:
        raise UserError(f"--text #{bad[0] + 1}: is empty")
    model, tokenizer = load_encoder(hub.resolve(args.ckpt), args.device)
    body = model.body if hasattr(model, "body") else model
    vectors = embed_texts(body, tokenizer, args.text, args.pooling)
    if not args.json:
        for v in vectors.tolist():
            print(" ".join(f"{x:.6f}" for x in v))
    return {"pooling": args.pooling, "dim": vectors.shape[1], "texts": args.text,
            "embeddings": [[round(x, 6) for x in v] for v in vectors.tolist()]}


def add_parsers(sub) -> None:
    for add in (_score_parser, _eval_parser, _chat_parser, _serve_parser, _sample_parser, _generate_parser, _compare_parser, _fill_mask_parser, _embed_parser):
        add(sub)
