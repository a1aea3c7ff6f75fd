"""Text -> token shards on disk -> random fixed-length blocks.

Text is tokenized once into flat uint16 (or uint32) arrays, `train.bin` and `val.bin`, with
the end-of-text id between documents, and cached under a key made of the tokenizer's hash and
the inputs' identity, so the second run (and every DDP rank) memory-maps them instantly.
Batches are random windows of block_size + 1 tokens, drawn by a seeded NumPy generator whose
state is the data position a resumed run continues from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chatfoundry.config import default_cache_dir
from chatfoundry.data.formats import read_jsonl
from chatfoundry.errors import UserError
from chatfoundry.tokenizer import encode_batch_ids, special_id, tokenizer_hash

CHUNK_CHARS = 1 << 16  # encode in ~64 KB pieces cut at line ends: parallel in Rust, bounded memory


def resolve_inputs(paths: list[str]) -> list[Path]:
    """Files as given; folders expand to their non-hidden files, sorted. Fails naming the bad path."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts))
            if not found:
                raise UserError(f"{p}: folder has no files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such file or folder")
    for f in files:
        if not os.access(f, os.R_OK):
            raise UserError(f"{f}: not readable")
    return files


def read_documents(files: list[Path]) -> Iterator[str]:
    """One document per text file, or per line of a .jsonl file (its "text", as `world export`'s
    corpus.jsonl and Hub text datasets hold them). An empty corpus is an error a user should hear about."""
    any_text = False
    for f in files:
        for text in _jsonl_texts(f) if f.suffix == ".jsonl" else [_read_text(f)]:
            if text.strip():
                any_text = True
                yield text
    if not any_text:
        raise UserError(f"{', '.join(map(str, files))}: corpus is empty")


def _read_text(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{f}: not UTF-8 text (byte {e.start})") from None


def _jsonl_texts(f: Path) -> Iterator[str]:
    for lineno, obj in read_jsonl(f):
        if not isinstance(obj.get("text"), str):
            raise UserError(f"{f}:{lineno}: a corpus line needs a \"text\" string")
        yield obj["text"]


def _chunks(text: str) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def tokenize_documents(tokenizer, documents: Iterator[str]) -> np.ndarray:
    eos = special_id(tokenizer, "eos")
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    parts: list[np.ndarray] = []
    for doc in documents:
        parts.extend(np.asarray(ids, dtype=dtype) for ids in encode_batch_ids(tokenizer, _chunks(doc)))
        if eos is not None:
            parts.append(np.asarray([eos], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


@dataclass
class Shards:
    train: np.ndarray
    val: np.ndarray


def publish(tmp: Path, folder: Path, marker: str) -> None:
    """Move a cache entry written in `tmp` (a folder private to this process) into place. An entry
    without its `marker` file is a broken one and is replaced; a complete one that another
    process landed meanwhile is kept."""
    if not (folder / marker).is_file():
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached the same entry first
        shutil.rmtree(tmp, ignore_errors=True)


def build_shards(tokenizer, source_key: str, documents: "callable", val_fraction: float,
                 cache_dir: Path | None = None) -> Shards:
    """Memory-mapped train/val token arrays, tokenizing `documents()` only on a cache miss.

    `source_key` identifies the text (file paths with sizes and mtimes, or the built-in corpus's
    parameters); together with the tokenizer's hash and the split it names the cache entry.
    """
    key = hashlib.sha256(f"{tokenizer_hash(tokenizer)}|{source_key}|{val_fraction}".encode()).hexdigest()[:20]
    folder = (cache_dir or default_cache_dir()) / "shards" / key
    if not (folder / "meta.json").is_file():
        tokens = tokenize_documents(tokenizer, documents())
        n_val = int(len(tokens) * val_fraction)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tokens[: len(tokens) - n_val].tofile(tmp / "train.bin")
        tokens[len(tokens) - n_val:].tofile(tmp / "val.bin")
        meta = {"dtype": tokens.dtype.name, "train_tokens": len(tokens) - n_val, "val_tokens": n_val,
                "source": source_key}
        (tmp / "meta.json").write_text(json.dumps(meta))
        publish(tmp, folder, "meta.json")
    meta = json.loads((folder / "meta.json").read_text())

    def load(name: str) -> np.ndarray:
        n = meta[f"{name}_tokens"]
        if n == 0:
            return np.zeros(0, dtype=meta["dtype"])
        return np.memmap(folder / f"{name}.bin", dtype=meta["dtype"], mode="r", shape=(n,))

    return Shards(load("train"), load("val"))


def files_key(files: list[Path]) -> str:
    # ":lines": a .jsonl file is read a document per line since 2026-12-07, not as raw text; the
    # mark keeps the shards and tokenizers cached from its raw text from being used again
    return "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" + (":lines" if f.suffix == ".jsonl" else "")
                    for f in files)


class BlockSampler:
    """Random windows of `block + 1` tokens; the same seed draws the same windows everywhere.

    Every DDP rank draws the whole global batch and keeps its own slice, so a run on N
    processes sees exactly the data of a run on one.
    """

    def __init__(self, data: np.ndarray, block: int, seed: int):
        self.data, self.block = data, block
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> torch.Tensor:
        starts = self.rng.integers(0, len(self.data) - self.block, size=n)
        return torch.from_numpy(np.stack([self.data[s:s + self.block + 1] for s in starts]).astype(np.int64))

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
