"""Models and datasets from the Hugging Face Hub by name: `hf:ORG/NAME[@REVISION]`.

The Hub's own clients do the work, as the optional extra `chatfoundry[hub]`: `huggingface_hub`'s
`snapshot_download` gives a repo's files as a folder of its cache (HF_HOME, HF_HUB_CACHE; with
HF_HUB_OFFLINE=1 the cache alone; a token for gated repos), and `datasets` reads a dataset's files.
Nothing here runs unless a user names `hf:`, so chatfoundry itself never reaches the network.

- A model's snapshot holds what `convert --from_hf` reads. A stage's `--init hf:ORG/NAME` uses the
  snapshot converted once into one of our checkpoints, cached per commit (`checkpoint`).
- A dataset `hf:ORG/DATASET[@REVISION][:SPLIT]` (split train unless named; slices as datasets
  writes them, train[:1000]) gives its rows to the parsers JSONL lines go to (data/formats.py), so
  every --data and --prompts that takes a file takes a dataset. Its snapshot is fetched here, and
  datasets reads that folder: `load_dataset("ORG/DATASET")` offline looks in datasets' own cache of
  prepared tables, not in the hub cache, so a cached dataset would not load by name.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from chatfoundry.config import default_cache_dir
from chatfoundry.errors import UserError

PREFIX = "hf:"
INSTALL = "pip install 'chatfoundry[hub]'"

# The files convert reads. Shards are model-00001-of-00002.safetensors; "model*" leaves out the
# other copies of the weights some repos carry (Mistral's consolidated.safetensors).
MODEL_FILES = ["config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json"]
# Data files datasets reads as rows, and the README whose YAML names a dataset's configs and splits.
DATA_FILES = ["README.md", "*.parquet", "*.arrow", "*.jsonl", "*.json", "*.csv"]


_NAME = re.compile(r"[\w.-]+/[\w.-]+(@\S+)?")  # ORG/NAME[@REVISION]


def model_folder(src: str) -> Path:
    """A transformers model folder: `src` itself, or the snapshot of the Hub model it names,
    hf:ORG/NAME[@REVISION] or, where no such local folder is, ORG/NAME as transformers reads it."""
    if src.startswith(PREFIX) or (not Path(src).exists() and _NAME.fullmatch(src)):
        return model_snapshot(src.removeprefix(PREFIX))
    return Path(src)


def model_snapshot(name: str) -> Path:
    """The snapshot folder of the Hub model `ORG/NAME[@REVISION]`, with the files convert reads."""
    folder = _snapshot(name, "model", MODEL_FILES)
    if not any(folder.glob("model*.safetensors")):
        # An older repo with its weights as a pickle alone (convert reads it with weights_only=True);
        # asked for only now, as repos with both would fetch the weights twice.
        folder = _snapshot(name, "model", MODEL_FILES + ["pytorch_model.bin"])
    return folder


@functools.lru_cache(maxsize=None)  # once a process: a run's every use sees one commit and asks the Hub once
def checkpoint(name: str) -> Path:
    """The Hub model `ORG/NAME[@REVISION]` as our checkpoint: its snapshot, converted on first use."""
    from chatfoundry.convert import from_hf

    snapshot = model_snapshot(name)
    # Named by the snapshot's commit (its folder's name): a commit never changes, so its conversion
    # is reused, and a new revision of the repo is converted afresh.
    out = default_cache_dir() / "hub" / f"{name.partition('@')[0].replace('/', '--')}@{snapshot.name}"
    if not (out / "config.json").is_file():
        # Converted beside it and renamed into place: processes of one torchrun job may race here,
        # and the first rename wins (the folder only ever appears whole).
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            from_hf(snapshot, tmp / "checkpoint")
            os.rename(tmp / "checkpoint", out)
            print(f"{PREFIX}{name}: converted to {out}", file=sys.stderr)
        except OSError:
            if not (out / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(path: str) -> str:
    """A Hub model name, hf:ORG/NAME[@REVISION], as the folder of its converted checkpoint; any
    other path as it is. Commands and stages call it where they read a model's name, above
    checkpoint.py: the converter this needs itself loads and saves through checkpoint.py."""
    return str(checkpoint(path.removeprefix(PREFIX))) if str(path).startswith(PREFIX) else path


def dataset_rows(spec: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of the Hub dataset `ORG/DATASET[@REVISION][:SPLIT]`; `where` is
    "hf:ORG/DATASET:SPLIT row N", N counting from 0 as `dataset[N]` does."""
    name, _, split = spec.partition(":")
    split = split or "train"
    try:
        import datasets
    except ImportError:
        raise UserError(f"{PREFIX}{name}: Hub datasets need the datasets package: {INSTALL}") from None
    folder = _snapshot(name, "dataset", DATA_FILES)
    try:
        rows = datasets.load_dataset(str(folder), split=split)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetsError) as e:
        # An unknown split ("Should be one of ['train']"), no readable data files, a table that fails to parse
        raise UserError(f"{PREFIX}{name}: {_first_line(e)}") from None
    for i, row in enumerate(rows):
        # A table gives each row every column, null where the row has no value; a JSONL line
        # leaves the key out, and the parsers read an absent key, not a null.
        yield f"{PREFIX}{name}:{split} row {i}", {k: v for k, v in row.items() if v is not None}


def _snapshot(name: str, repo_type: str, patterns: list[str]) -> Path:
    """The local folder of a repo's files matching `patterns`, fetched into the hub cache unless
    there already; every failure one UserError naming `hf:name` and what to do."""
    where, (repo, _, revision) = PREFIX + name, name.partition("@")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                           RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise UserError(f"{where}: Hub models and datasets need the huggingface_hub package: {INSTALL}") from None
    try:
        return Path(snapshot_download(repo, repo_type=repo_type, revision=revision or None, allow_patterns=patterns,
                                      library_name="chatfoundry"))
    except HFValidationError as e:
        raise UserError(f"{where}: not a Hub name ORG/NAME[@REVISION] ({_first_line(e)})") from None
    except LocalEntryNotFoundError as e:  # not cached, and offline or the Hub out of reach
        fetch = f"hf download {repo}" + (" --repo-type dataset" if repo_type == "dataset" else "")
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"{where}: not in the hub cache (HF_HUB_OFFLINE=1, cache {constants.HF_HUB_CACHE}): "
                            f"fetch it where there is a network ({fetch}) or unset HF_HUB_OFFLINE") from None
        reason = _first_line(e.__cause__ or e)
        raise UserError(f"{where}: not in the hub cache and the Hub cannot be reached ({reason})") from None
    except GatedRepoError:  # before RepositoryNotFoundError, which it is a kind of
        raise UserError(f"{where}: a gated repo: accept its terms at https://huggingface.co/"
                        f"{'datasets/' if repo_type == 'dataset' else ''}{repo} and log in (hf auth login, "
                        "or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{where}: {repo} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise UserError(f"{where}: no {repo_type} {repo} on the Hub, or a private one (log in: hf auth login, "
                        "or HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise UserError(f"{where}: the Hub refused ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
