"""Supervised finetuning: the chat-format loss mask, rows and batches (padded and packed), the CLI
end to end (artifacts, world eval, every file format, bad input, resume) and a learning test: the
model answers a trained question with the exact reply and stops by itself at <|end|>."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from chatfoundry.checkpoint import load_model
from chatfoundry.data import world
from chatfoundry.data.builtin import generate_corpus
from chatfoundry.data.formats import Example, load_sft
from chatfoundry.data.world import FAMILIES
from chatfoundry.errors import UserError
from chatfoundry.generation import GenerationConfig, generate
from chatfoundry.metrics import read_metrics
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.tokenizer import load_tokenizer, render_chat, special_id, train_tokenizer
from chatfoundry.train.sft import Batches, SFTConfig, encode, to_rows

from conftest import TINY, cli_subprocess_cmd, last_json, randomize, run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SFT = ("--train.steps 6 --train.batch_size 4 --train.eval_every 3 --train.save_every 3 --train.warmup_steps 1 "
       "--data.conversations 64 --eval.per_family 3 --eval.max_new_tokens 8 --device cpu").split()
# A user file's run: a few steps, no world eval.
QUICK = ("--train.steps 4 --train.batch_size 4 --train.eval_every 2 --train.save_every 2 --train.warmup_steps 1 "
         "--eval.per_family 0 --device cpu").split()
# Long enough to learn PAIRS by heart.
LEARN = ("--train.steps 100 --train.lr 3e-3 --train.batch_size 8 --train.warmup_steps 5 --train.eval_every 50 "
         "--train.save_every 100 --eval.per_family 0 --device cpu").split()
PAIRS = [("hi", "hello there."), ("what is 2+3?", "5."), ("name a color", "blue.")]


def cli_json(argv: list[str]) -> dict:
    """Run the CLI in this process for a module-scoped fixture (capsys is per test): its --json summary."""
    from chatfoundry.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--json"]) == 0  # stderr (the error line) is shown by pytest on failure
    return last_json(out.getvalue())


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def exchange(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """One TINY pretrained run (char tokenizer, block 32) shared by every test here."""
    out = tmp_path_factory.mktemp("pre") / "run"
    cli_json(["pretrain", *TINY, "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def tok(pre):
    return load_tokenizer(pre / "checkpoint")


@pytest.fixture(scope="module")
def sft_run(pre, tmp_path_factory):
    """SFT on the task world with the world eval: (out dir, --json summary)."""
    out = tmp_path_factory.mktemp("sft") / "run"
    return out, cli_json(["sft", "--init", str(pre), "--out", str(out), *SFT])


@pytest.fixture(scope="module")
def learned(pre, tmp_path_factory):
    """SFT on 40 copies of three short exchanges."""
    tmp = tmp_path_factory.mktemp("learn")
    data = write_jsonl(tmp / "chat.jsonl", [exchange(u, a) for _ in range(40) for u, a in PAIRS])
    return tmp / "run", cli_json(["sft", "--init", str(pre), "--out", str(tmp / "run"), "--data", data, *LEARN])


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(iter(generate_corpus(20000).split("\n\n")), "bpe", 400)


# ---------------------------------------------------------------- tokens, the loss mask and rows


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_encode_is_the_chat_template_and_learns_assistant_turns_only(kind, request):
    tok = request.getfixturevalue("tok" if kind == "char" else "bpe")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there."}, {"role": "user", "content": "and you?"},
                {"role": "assistant", "content": "fine, thanks."}]
    [(ids, learn)] = encode([Example(messages=tuple(messages))], tok)
    assert ids == tok.encode(render_chat(messages), add_special_tokens=False).ids and len(learn) == len(ids)
    # Walk the ids: learn from after each <|assistant|> up to and including the <|end|> closing it.
    assistant, end = special_id(tok, "assistant"), special_id(tok, "end")
    expected, inside = [], False
    for t in ids:
        expected.append(inside)
        inside = (t == assistant) or (inside and t != end)
    assert learn == expected
    replies = [tok.encode(text, add_special_tokens=False).ids for text in ("hello there.", "fine, thanks.")]
    assert [t for t, keep in zip(ids, learn) if keep] == replies[0] + [end] + replies[1] + [end]


def test_encode_plain_text_and_a_tokenizer_without_chat_tokens(tok):
    [(ids, learn)] = encode([Example(text="To be, or not to be.")], tok)
    assert ids == tok.encode("To be, or not to be.", add_special_tokens=False).ids + [special_id(tok, "eos")]
    assert all(learn) and len(learn) == len(ids)
    bare = Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(UserError, match="chat tokens"):
        encode([Example(text="a")], bare)


def test_to_rows_masks_cuts_and_drops():
    short = ([1, 2, 3, 4, 5], [False, False, True, True, False])
    long = (list(range(10, 22)), [False] * 3 + [True] * 9)  # 12 tokens, block 8: cut to 9
    late = (list(range(30, 42)), [False] * 10 + [True] * 2)  # learns only past the context: dropped
    nothing = ([1, 2, 3], [False] * 3)  # learns nothing at all: dropped
    rows, cut = to_rows([short, long, late, nothing], block=8)
    assert cut == 2
    assert rows == [([1, 2, 3, 4], [-100, 3, 4, -100]), (list(range(10, 18)), [-100, -100, 13, 14, 15, 16, 17, 18])]


# ---------------------------------------------------------------- batches


def numbered_rows(lengths) -> list[tuple[list[int], list[int]]]:
    """Row i is the token i + 1 repeated; its last target is masked."""
    return [([i + 1] * n, [i + 1] * (n - 1) + [-100]) for i, n in enumerate(lengths)]


def test_padded_batches():
    rows = numbered_rows([3, 7, 5, 2, 9, 4, 6])
    b = Batches(rows, batch_size=4, block=16, pad_id=0, seed=1, packing=False)
    for _ in range(3):  # wraps into a second epoch
        batch = b.next()
        idx, tgt = batch["idx"], batch["targets"]
        assert set(batch) == {"idx", "targets"} and idx.shape == tgt.shape and idx.shape[0] == 4
        for r in range(4):
            n = len(rows[int(idx[r, 0]) - 1][0])
            assert idx.shape[1] >= n and (idx[r, :n] == idx[r, 0]).all()
            assert (idx[r, n:] == 0).all() and (tgt[r, n:] == -100).all()
        assert idx.shape[1] == max(len(rows[int(i) - 1][0]) for i in idx[:, 0])


def segments_of(batch) -> list[list[tuple[list[int], list[int]]]]:
    """Per packed row, its sequences (inputs, targets), padding left out."""
    out = []
    for idx, tgt, seg in zip(batch["idx"].tolist(), batch["targets"].tolist(), batch["segments"].tolist()):
        seqs: dict[int, tuple[list, list]] = {}
        for t, y, s in zip(idx, tgt, seg):
            seqs.setdefault(s, ([], []))[0].append(t)
            seqs[s][1].append(y)
        out.append([seqs[s] for s in sorted(seqs) if any(t != 0 for t in seqs[s][0])])
    return out


def test_packed_rows_are_full_width_and_split_no_sequence():
    rows = numbered_rows([3, 7, 5, 2, 9, 4, 6, 8, 1, 5])
    b = Batches(rows, batch_size=2, block=12, pad_id=0, seed=3, packing=True)
    seen = []
    for _ in range(6):
        batch = b.next()
        assert batch["idx"].shape == batch["targets"].shape == batch["segments"].shape == (2, 12)
        for seg in batch["segments"].tolist():
            assert seg[0] == 0 and all(0 <= b_ - a <= 1 for a, b_ in zip(seg, seg[1:]))
        for row in segments_of(batch):
            for x, y in row:
                assert (x, y) == rows[x[0] - 1], "a sequence was split or mixed"
                seen.append(x[0])
        # First fit: the step ends only when the next sequence has room in no row.
        free = [12 - sum(len(x) for x, _ in row) for row in segments_of(batch)]
        assert len(rows[b.order.peek()][0]) > max(free)
    assert len(seen) > len(rows)  # several per row, into a second epoch
    assert sorted(seen[:len(rows)]) == list(range(1, len(rows) + 1))  # an epoch holds every row once


@pytest.mark.parametrize("packing", [False, True])
def test_batches_state_resumes_the_same_sequence(packing):
    rows = numbered_rows([3, 7, 5, 2, 9, 4, 6])
    a = Batches(rows, 3, 12, 0, seed=5, packing=packing)
    for _ in range(2):
        a.next()
    state = json.loads(json.dumps(a.state()))  # survives a round trip through a file
    ahead = [a.next() for _ in range(4)]
    b = Batches(rows, 3, 12, 0, seed=5, packing=packing)
    b.set_state(state)
    for x, y in zip(ahead, [b.next() for _ in range(4)]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])  # learned positions and rotary ones restart per segment
def test_packed_loss_equals_the_sequences_run_one_by_one(flavour):
    torch.manual_seed(0)
    model = randomize(DecoderLM(tiny_config(flavour, n_kv_head=2)), seed=1).eval()
    g = torch.Generator().manual_seed(2)
    rows = []
    for n in (5, 11, 3, 8, 14, 6, 9, 4):
        x = torch.randint(1, 61, (n,), generator=g).tolist()
        y = [t if keep else -100 for t, keep in zip(torch.randint(1, 61, (n,), generator=g).tolist(),
                                                    (torch.rand(n, generator=g) > 0.3).tolist())]
        rows.append((x, y))
    batch = Batches(rows, batch_size=3, block=32, pad_id=0, seed=0, packing=True).next()
    with torch.no_grad():
        logits, _ = model(batch["idx"], segments=batch["segments"])
        packed = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100,
                                 reduction="sum")
        alone, count = 0.0, 0
        for row in segments_of(batch):
            for x, y in row:
                logits, _ = model(torch.tensor([x]))
                alone += F.cross_entropy(logits[0], torch.tensor(y), ignore_index=-100, reduction="sum")
                count += 1
    assert count >= 4  # several sequences share a row
    assert packed.item() == pytest.approx(float(alone), abs=1e-4)


# ---------------------------------------------------------------- the stage through the CLI


def test_sft_run_leaves_every_artifact(sft_run, tok):
    out, summary = sft_run
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "eval.json", "eval.png"):
        assert (out / name).is_file(), name
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (out / "checkpoint" / name).is_file(), name
    eos = json.loads((out / "checkpoint" / "generation_config.json").read_text())["eos_token_id"]
    assert isinstance(eos, list) and special_id(tok, "end") in eos
    assert summary["steps"] == 6 and summary["checkpoint"] == str(out / "checkpoint")
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r] == [3, 6]
    assert set(summary["families"]) == set(FAMILIES)
    for scores in summary["families"].values():
        assert scores["n"] == 3 and 0 <= scores["exact_match"] <= 1 and 0 <= scores["gold_reward"] <= 1
    report = json.loads((out / "eval.json").read_text())
    assert report["families"] == summary["families"] and len(report["answers"]) == 3 * len(FAMILIES)
    # What the crowd's demonstrations are worth by the gold reward, per writer.
    data = summary["data"]
    assert set(data["writers"]) == set(world.WRITERS) and 0.85 < data["gold_reward"] < 0.97
    assert data["writers"]["careful"]["gold_reward"] == 1.0 > data["writers"]["terse"]["gold_reward"]
    assert sum(w["share"] for w in data["writers"].values()) == pytest.approx(1, abs=1e-3)


def test_eval_cli_prints_the_same_scores(sft_run, tmp_path, capsys):
    out, summary = sft_run
    code, stdout, err = run_cli(["eval", "--ckpt", str(out), "--per_family", "3", "--max_new_tokens", "8",
                                 "--tool_questions", "3", "--out", str(tmp_path), "--json"], capsys)
    assert code == 0, err
    families = last_json(stdout)["families"]
    tool_use = last_json(stdout)["tool_use"]  # SFT scored the calculator questions the same way
    assert tool_use == summary["tool_use"] and tool_use["n"] == 3 and "with the calculator" in stdout
    assert set(families) == set(FAMILIES) and all({"exact_match", "gold_reward"} <= s.keys() for s in families.values())
    assert families == summary["families"]  # the saved checkpoint is the model the run scored
    answers = json.loads((tmp_path / "eval.json").read_text())["answers"]
    assert answers == json.loads((out / "eval.json").read_text())["answers"]


def test_sft_learns_to_answer_and_to_stop(learned, pre):
    out, summary = learned
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert summary["train_loss"] < 0.15 * losses[0] and summary["val_loss"] < 0.15 * losses[0]
    model, tok = load_model(out)
    base, _ = load_model(pre)
    end, eos = special_id(tok, "end"), special_id(tok, "eos")
    for user, reply in PAIRS:
        prompt = tok.encode(render_chat([{"role": "user", "content": user}], add_generation_prompt=True),
                            add_special_tokens=False).ids
        cfg = GenerationConfig(max_new_tokens=24, eos_token_id=[end, eos])
        ids = generate(model, prompt, cfg).sequences[0]
        assert ids[-1] == end and len(ids) < 20, tok.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=True) == reply
        assert tok.decode(generate(base, prompt, cfg).sequences[0], skip_special_tokens=True) != reply


def test_chat_cli_answers_piped_stdin(learned, capsys, monkeypatch):
    out, _ = learned
    args = ["chat", "--ckpt", str(out), "--temperature", "0"]
    done = subprocess.run([*cli_subprocess_cmd(), *args], input="hi\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "hello there."
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # empty piped input, in-process (no second start-up)
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "no input" in err


FORMATS = {
    "text": ({"text": "The cat sat on the mat."}, "The cat sat on the mat.<|eos|>"),
    "prompt_completion": ({"prompt": "hi", "completion": "hello."}, "hello.<|end|>"),
    "messages": (exchange("hi", "hello."), "hello.<|end|>"),
    "alpaca": ({"instruction": "Say hi.", "input": "", "output": "hi."}, "hi.<|end|>"),
    "preference": ({"prompt": "hi", "chosen": "hello.", "rejected": "go away."}, "hello.<|end|>"),
}


@pytest.mark.parametrize("fmt", [*FORMATS, "messages --data.packing"])
def test_sft_from_each_file_format(fmt, pre, tok, tmp_path, capsys):
    fmt, *extra = fmt.split()
    record, learned_text = FORMATS[fmt]
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", [record] * 12)
    [(ids, learn)] = encode(load_sft(data)[:1], tok)
    assert tok.decode([t for t, k in zip(ids, learn) if k], skip_special_tokens=False) == learned_text
    out = tmp_path / "run"
    code, stdout, err = run_cli(["sft", "--init", str(pre), "--out", str(out), "--data", data, *QUICK, *extra,
                                 "--json"], capsys)
    assert code == 0, err
    assert last_json(stdout)["examples"] > 0 and "families" not in last_json(stdout)
    assert (out / "checkpoint" / "model.safetensors").is_file()


def test_bad_input_exits_2_and_writes_nothing(pre, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(exchange("hi", "hello.")) + "\n" + '{"messages": [\n')
    out = tmp_path / "out"
    code, _, err = run_cli(["sft", "--init", str(pre), "--out", str(out), "--data", str(data), *QUICK], capsys)
    assert code == 2 and f"{data}:2" in err and not out.exists()

    code, _, err = run_cli(["sft", "--out", str(out), *QUICK], capsys)
    assert code == 2 and "init" in err and not out.exists()

    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["sft", "--out", str(tmp_path / "empty"), "--resume", *QUICK], capsys)
    assert code == 2 and "resume" in err and list((tmp_path / "empty").iterdir()) == []


def test_resume_gives_the_same_weights_as_a_straight_run(pre, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [exchange(u, a) for _ in range(8) for u, a in PAIRS])
    # A flat learning rate after warmup: the schedule of a 3-step run is then the start of a 6-step one.
    args = ["--init", str(pre), "--data", data, *QUICK, "--train.save_every", "3", "--train.min_lr_ratio", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(["sft", *args, "--out", str(a), "--train.steps", "6"], capsys)[0] == 0
    assert run_cli(["sft", *args, "--out", str(b), "--train.steps", "3"], capsys)[0] == 0
    code, stdout, err = run_cli(["sft", "--out", str(b), "--resume", "--train.steps", "6", "--json"], capsys)
    assert code == 0 and last_json(stdout)["steps"] == 6, err
    wa, wb = load_file(a / "checkpoint" / "model.safetensors"), load_file(b / "checkpoint" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    steps = [r["step"] for r in read_metrics(b / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_world_export(tmp_path, capsys):
    out = tmp_path / "world"
    code, stdout, err = run_cli(["world", "export", "--out", str(out), "--conversations", "50",
                                 "--test_per_family", "5", "--json"], capsys)
    assert code == 0, err
    files = last_json(stdout)["files"]
    assert files["sft_train.jsonl"] == 50 and files["test.jsonl"] == 5 * len(FAMILIES)
    for name, n in files.items():
        assert n > 0 and len((out / name).read_text().splitlines()) == n, name
    assert load_sft(out / "sft_train.jsonl")


def test_packing_is_the_default_and_prompt_tuning_pads():
    from chatfoundry.cli import build_parser
    from chatfoundry.config import resolve_config

    def resolve(*argv):
        cfg = resolve_config(SFTConfig, build_parser().parse_args(["sft", "--init", "x", *argv]))
        cfg.validate()
        return cfg

    assert resolve().data.packing is True and resolve().train.batch_size == 16  # rows of the context
    assert resolve("--peft", "prompt").data.packing is False  # a soft prompt goes before each conversation
    assert resolve("--data.packing", "false").data.packing is False
    assert resolve("--data.packing").data.packing is True  # an optional bool is a bare flag too
    assert SFTConfig(init="x").packed and not SFTConfig(init="x", peft="prompt").packed  # unvalidated, in code
