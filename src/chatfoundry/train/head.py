"""Heads on a pretrained encoder: classify or regress a text from its sentence vector.

    an MLM-pretrained encoder (chatfoundry pretrain --objective mlm) or an imported BERT
      -> its body + BERT's pooler (tanh(dense(h[CLS]))) + dropout + Linear(hidden, num_labels)
      -> texts as [CLS] text [SEP], right-padded; the whole network is finetuned
      -> classify: cross-entropy over the classes; regress: squared error on standardized targets
         (the scale is folded back into the last layer at the end, so the saved model outputs
         the targets' own units and transformers reads the same numbers)
      -> run/checkpoint/ (BertForSequenceClassification: num_labels, id2label, problem_type),
         metrics.jsonl, loss.png, score.png; held-out accuracy, or RMSE and Spearman's rho

Data: JSONL lines {"text": ..., "label": ...} (data/formats.py), or by default the task world's
prompts labelled by family (arithmetic, strings, facts, compare, unanswerable): trained on its
train split, scored on its test split, whose questions are about other countries, words and
numbers than any training prompt.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from chatfoundry import checkpoint as ckpt
from chatfoundry.config import require
from chatfoundry.data import world
from chatfoundry.data.formats import load_labelled
from chatfoundry.errors import UserError
from chatfoundry.metrics import plot_curves, read_metrics
from chatfoundry.models.encoder import EncoderClassifier
from chatfoundry.textenc import encode_texts, pad_rows
from chatfoundry.tokenizer import encoder_ids
from chatfoundry.train import stage
from chatfoundry.train.loop import Epochs, TrainConfig, accumulation, fit, make_optimizer, trainer_state, wrap


@dataclass
class HeadDataConfig:
    files: list[str] = field(default_factory=list)  # JSONL {"text", "label"}; empty: the world's prompts by family
    per_family: int = 600  # world: training prompts per family (its train split)
    test_per_family: int = 100  # world: held-out prompts per family (its test split)
    val_fraction: float = 0.2  # files: share held out for scoring

    def validate(self) -> None:
        require(self.per_family > 0, "data.per_family", f"must be > 0, got {self.per_family}")
        require(self.test_per_family > 0, "data.test_per_family", f"must be > 0, got {self.test_per_family}")
        require(0 < self.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")


def _head_train() -> TrainConfig:
    return TrainConfig(steps=300, batch_size=32, lr=5e-4, warmup_steps=30, weight_decay=0.01, eval_every=100,
                       eval_batches=8, save_every=300)


@dataclass
class HeadConfig(stage.StageConfig):
    init: str = ""  # the encoder checkpoint (or run folder) to start from
    out: str = "runs/head"  # run folder: checkpoint/, config.yaml, metrics.jsonl, loss.png, score.png
    task: Literal["classify", "regress"] = "classify"  # classify: cross-entropy over labels; regress: squared error
    dropout: float = 0.1  # before the last layer, as BERT's classifier
    max_len: int = 0  # tokens per text with [CLS] and [SEP]; 0: the model's context
    data: HeadDataConfig = field(default_factory=HeadDataConfig)
    train: TrainConfig = field(default_factory=_head_train)

    def validate(self) -> None:
        require(bool(self.init), "init", "give the encoder checkpoint to finetune (--init DIR)")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.max_len == 0 or self.max_len >= 3, "max_len", f"must be 0 or >= 3, got {self.max_len}")
        require(bool(self.data.files) or self.task == "classify", "data.files",
                "regress needs labelled JSONL files ({\"text\": ..., \"label\": number}); "
                "the built-in world labels prompts by family, a classification task")


# ---------------------------------------------------------------- data


def _world(cfg: HeadConfig) -> tuple[list, list, list, str]:
    def prompts(split: str, n: int) -> list[tuple[str, str]]:
        return [(t.prompt, family) for family in world.FAMILIES for t in world.tasks(split, family, n, cfg.seed)]

    return (prompts("train", cfg.data.per_family), prompts("val", cfg.data.test_per_family),
            prompts("test", cfg.data.test_per_family), "the task world's prompts by family")


def _files(cfg: HeadConfig) -> tuple[list, list, list, str]:
    examples = load_labelled(cfg.data.files, cfg.task)
    if len(examples) < 2:
        raise UserError(f"data: {len(examples)} example; need at least 2 (one to train, one to score)")
    random.Random(cfg.seed).shuffle(examples)
    n_held = max(1, round(len(examples) * cfg.data.val_fraction))
    held = examples[:n_held]
    return examples[n_held:], held, held, f"{len(examples)} examples from files"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their average rank)."""
    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average the ranks of equal values
            same = x == v
            r[same] = r[same].mean()
        return r

    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


# ---------------------------------------------------------------- the stage


def run(cfg: HeadConfig, overwrite: bool = False, log=print) -> dict:
    """Finetune a head as configured; returns the summary that `--json` prints."""
    with stage.start("finetune-head", cfg, False, overwrite, log) as r:
        return _run(r, *_inputs(cfg))


def _inputs(cfg: HeadConfig):
    """The encoder, its tokenizer, the examples and the labels, checked before the folder is touched."""
    body_model, tokenizer = ckpt.load_encoder(cfg.init)
    train, val, test, source = _files(cfg) if cfg.data.files else _world(cfg)
    if not train:
        raise UserError("data: nothing left to train on after holding out data.val_fraction")
    classify = cfg.task == "classify"
    labels = sorted({y for _, y in train + test}) if classify else ["value"]
    if classify and cfg.data.files and len(labels) < 2:
        raise UserError(f"data: every label is {labels[0]!r}; classification needs at least two classes")
    if not cfg.data.files:
        labels = list(world.FAMILIES)
    max_len = cfg.max_len or body_model.config.max_position_embeddings
    require(max_len <= body_model.config.max_position_embeddings, "max_len",
            f"{max_len} exceeds the model's context {body_model.config.max_position_embeddings}")
    return body_model, tokenizer, train, val, test, labels, source, max_len


def _tensors(examples, tokenizer, labels, classify, max_len):
    rows, cut = encode_texts(tokenizer, [x for x, _ in examples], max_len)
    index = {name: i for i, name in enumerate(labels)}
    targets = [index[y] for _, y in examples] if classify else [y for _, y in examples]
    return rows, torch.tensor(targets, dtype=torch.long if classify else torch.float32), cut


def _run(r: stage.Run, body_model, tokenizer, train, val, test, labels, source, max_len) -> dict:
    cfg, rt, out, log = r.cfg, r.rt, r.out, r.log
    torch.manual_seed(cfg.seed)
    classify = cfg.task == "classify"
    pad_id = encoder_ids(tokenizer)["pad"] or 0
    rows, targets, cut = _tensors(train, tokenizer, labels, classify, max_len)
    # Regression learns standardized targets: one learning rate fits any unit.
    mean, std = (0.0, 1.0) if classify else (targets.mean().item(), targets.std().item() if len(targets) > 1 else 1.0)
    std = std or 1.0
    body = {k.removeprefix("body."): v for k, v in body_model.state_dict().items() if k.startswith("body.")} \
        if hasattr(body_model, "body") else body_model.state_dict()
    model = EncoderClassifier.from_encoder(body, body_model.config, len(labels), cfg.dropout).to(rt.device)
    model.head = {"task": cfg.task, "labels": labels, "dropout": cfg.dropout}
    optimizer = make_optimizer(model, cfg.train, rt.device)
    micro, accum = accumulation(cfg.train, rt)
    order = Epochs(len(rows), cfg.seed)

    if rt.is_main:
        r.prepare(("metrics.jsonl", "loss.png", "score.png"))
        log(f"finetune-head: {cfg.task}, {len(labels)} output{'s' if len(labels) > 1 else ''}; {len(train):,} "
            f"training texts from {source}" + (f" ({cut} cut to {max_len} tokens)" if cut else "")
            + f"; {len(val):,} for validation, {len(test):,} held out; device {rt.device}")
    metrics = r.metrics()
    train_model = wrap(model, rt)

    def micro_batches():
        picked = [order.next() for _ in range(cfg.train.batch_size)]
        mine = picked[rt.rank * micro * accum:(rt.rank + 1) * micro * accum]
        batches = []
        for i in range(accum):
            part = mine[i * micro:(i + 1) * micro]
            ids, key_mask = pad_rows([rows[j] for j in part], pad_id)
            batches.append((ids.to(rt.device), key_mask.to(rt.device), targets[part].to(rt.device)))
        return batches

    def loss_fn(m, batch):
        ids, key_mask, y = batch
        out_ = m(ids, key_mask)
        return F.cross_entropy(out_.float(), y) if classify else F.mse_loss(out_.float()[:, 0], (y - mean) / std)

    def predict(examples) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions, targets): class indices, or values in the targets' units."""
        ex_rows, ex_targets, _ = _tensors(examples, tokenizer, labels, classify, max_len)
        preds = []
        with torch.no_grad():
            for start in range(0, len(ex_rows), 64):
                ids, key_mask = pad_rows(ex_rows[start:start + 64], pad_id)
                y = model(ids.to(rt.device), key_mask.to(rt.device)).float().cpu()
                preds.append(y.argmax(-1) if classify else y[:, 0] * std + mean)
        return torch.cat(preds), ex_targets

    def scores(examples, prefix: str) -> dict[str, float]:
        if not examples:
            return {}
        preds, ys = predict(examples)
        if classify:
            return {f"{prefix}_accuracy": (preds == ys).float().mean().item()}
        rmse = (preds - ys).pow(2).mean().sqrt().item()
        return {f"{prefix}_rmse": rmse, f"{prefix}_spearman": spearman(preds.numpy(), ys.numpy())}

    def evaluate(step: int):
        return scores(val, "val")

    def save(step: int):
        if rt.is_main:
            ckpt.save_checkpoint(out / ckpt.CHECKPOINT, _exported(model, mean, std), tokenizer,
                                 trainer_state(step, optimizer, order=order.state()))
        rt.barrier()

    start = time.perf_counter()
    last = fit(train_model, optimizer, rt, cfg.train, micro_batches=micro_batches, loss_fn=loss_fn,
               evaluate=evaluate, save=save, log=metrics, tokens_per_step=cfg.train.batch_size * max_len,
               desc="finetune-head")
    train_s = time.perf_counter() - start
    model.eval()
    summary = {"out": str(out), "checkpoint": str(out / ckpt.CHECKPOINT), "task": cfg.task, "labels": labels,
               "train_examples": len(train), "held_out_examples": len(test), "steps": cfg.train.steps,
               "train_loss": last.get("loss"), **{k: v for k, v in last.items() if k.startswith("val_")},
               **scores(test, "test"), "train_s": round(train_s, 2)}
    if classify:  # accuracy per true class on the held-out texts
        preds, ys = predict(test)
        summary["test_accuracy_per_label"] = {name: round((preds[ys == i] == i).float().mean().item(), 4)
                                              for i, name in enumerate(labels) if (ys == i).any()}
    if rt.is_main:
        records = read_metrics(out / "metrics.jsonl")
        plot_curves(records, out / "loss.png", {"loss": "train loss"}, title=f"finetune-head ({cfg.task})",
                    ylabel="cross-entropy" if classify else "squared error (standardized targets)")
        series = {"val_accuracy": "validation accuracy"} if classify else {"val_spearman": "validation Spearman"}
        plot_curves(records, out / "score.png", series, title=f"finetune-head ({cfg.task}): held-out score",
                    ylabel="accuracy" if classify else "Spearman's rho")
        main = ("test_accuracy",) if classify else ("test_rmse", "test_spearman")
        log("held out: " + ", ".join(f"{k} {summary[k]:.4f}" for k in main))
    summary["wall_s"] = r.wall_s()
    return summary


def _exported(model: EncoderClassifier, mean: float, std: float) -> EncoderClassifier:
    """The model that outputs targets in their own units: y = std * (w.h + b) + mean, folded into w and b."""
    if mean == 0.0 and std == 1.0:
        return model
    import copy

    folded = copy.deepcopy(model)
    with torch.no_grad():
        folded.classifier.weight.mul_(std)
        folded.classifier.bias.mul_(std).add_(mean)
    return folded
