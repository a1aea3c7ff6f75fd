"""Stage 1, pretraining: next-token prediction (causal LM) on raw text.

    text files or the built-in corpus
      -> tokenizer (given, or trained here and cached)
      -> token shards (cached memmaps) -> random blocks of block_size + 1 tokens
      -> DecoderLM trained with cross-entropy on every position
      -> run/checkpoint/, run/metrics.jsonl, run/loss.png, run/samples.txt

`objective: mlm` trains a BERT-style EncoderLM on the same shards instead: masked tokens are
predicted from both sides (train/mlm.py), scored by held-out masked-token accuracy against the
unigram baseline (run/accuracy.png); the `encoder` section shapes the model, `model` is unused.
With `objective: span` the same windows train a T5-style encoder-decoder (`seq2seq` section)
to write back the spans dropped from them (span corruption, train/span.py); the tokenizer gains
the sentinel tokens <extra_id_0> ...

Every check a user can fail runs before the output folder is touched.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from chatfoundry import checkpoint as ckpt
from chatfoundry.config import require
from chatfoundry.data import builtin
from chatfoundry.data.shards import (BlockSampler, build_shards, default_cache_dir, files_key, publish,
                                     read_documents, resolve_inputs)
from chatfoundry.errors import UserError
from chatfoundry.metrics import plot_curves, read_metrics
from chatfoundry.models import encoder as enc
from chatfoundry.models.decoder import DecoderConfig, DecoderLM, flops_per_token, num_params
from chatfoundry.models.seq2seq import Seq2SeqConfig, Seq2SeqLM
from chatfoundry.train import span, stage
from chatfoundry.textgen import generate_text
from chatfoundry.tokenizer import SPECIAL_TOKENS, TOKENIZER_FORMAT, load_tokenizer, save_tokenizer, special_id, train_tokenizer
from chatfoundry.train.loop import (TrainConfig, accumulation, fit, make_optimizer, restore, save_shards, shard, sharded,
                                    trainer_state, wrap)
from chatfoundry.train.mlm import MaskedLM, MLMConfig


@dataclass
class DataConfig:
    files: list[str] = field(default_factory=list)  # text files or folders; empty: the built-in corpus
    corpus_chars: int = builtin.DEFAULT_CHARS  # size of the built-in corpus
    corpus_seed: int = builtin.DEFAULT_SEED  # the built-in corpus's generator seed: another seed, other documents
    val_fraction: float = 0.05  # the corpus's tail held out for validation
    cache_dir: str = ""  # token shards and trained tokenizers; empty: ~/.cache/chatfoundry

    def validate(self) -> None:
        require(self.corpus_chars > 0, "data.corpus_chars", f"must be > 0, got {self.corpus_chars}")
        require(0 < self.val_fraction < 0.5, "data.val_fraction", f"must be in (0, 0.5), got {self.val_fraction}")


@dataclass
class TokenizerConfig:
    path: str = ""  # a tokenizer.json or a folder with one; empty: train one on the data
    kind: Literal["bpe", "wordpiece", "unigram", "char"] = "bpe"  # the algorithm trained when path is empty
    vocab_size: int = 2048  # ignored by kind=char, whose vocabulary is the corpus's characters

    def validate(self) -> None:
        floor = len(SPECIAL_TOKENS) + (256 if self.kind == "bpe" else 0)
        require(self.path or self.kind == "char" or self.vocab_size > floor, "tokenizer.vocab_size",
                f"{self.vocab_size} is too small: {self.kind} needs more than {floor} "
                f"({len(SPECIAL_TOKENS)} special tokens" + (" + 256 bytes)" if self.kind == "bpe" else ")"))


@dataclass
class SampleConfig:
    prompt: str = ""  # empty: start a fresh document
    num_samples: int = 3  # samples shown at the end (objective span: denoised validation windows); 0: none
    max_new_tokens: int = 100  # tokens per final sample (objective clm)
    temperature: float = 0.8  # sampling temperature (final samples, samples.txt); 0: greedy
    top_k: int = 40  # sample among the k likeliest tokens; 0: all

    def validate(self) -> None:
        require(self.num_samples >= 0, "sample.num_samples", "must be >= 0")
        require(self.max_new_tokens > 0, "sample.max_new_tokens", "must be > 0")
        require(self.temperature >= 0, "sample.temperature", "must be >= 0")
        require(self.top_k >= 0, "sample.top_k", "must be >= 0")


@dataclass
class SpanConfig:
    """Span corruption (objective: span), with T5's settings."""

    noise_density: float = 0.15  # share of each window's tokens dropped
    mean_noise_span_length: float = 3.0  # mean length of a dropped span, in tokens
    extra_ids: int = 100  # sentinel tokens <extra_id_0> .. added to the tokenizer

    def validate(self) -> None:
        require(0 < self.noise_density < 1, "span.noise_density", f"must be in (0, 1), got {self.noise_density}")
        require(self.mean_noise_span_length >= 1, "span.mean_noise_span_length",
                f"must be >= 1, got {self.mean_noise_span_length}")
        require(self.extra_ids >= 2, "span.extra_ids", f"must be >= 2, got {self.extra_ids}")


@dataclass
class PretrainConfig(stage.StageConfig):
    out: str = "runs/pretrain"  # run folder: checkpoint/, config.yaml, metrics.jsonl, samples.txt, loss.png
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast matmuls, fp32 weights
    compile: bool = False  # torch.compile the model
    # Under torchrun: ddp keeps a whole copy of the model and AdamW on every process; fsdp (FSDP2,
    # clm only) shards the weights, gradients and AdamW's moments across the processes
    dist: Literal["ddp", "fsdp"] = "ddp"
    # clm: a decoder (section `model`) predicts each next token; mlm: a BERT-style encoder
    # (section `encoder`) predicts masked tokens from both sides (section `mlm`); span: a T5
    # (section `seq2seq`) writes back the spans dropped from its input (section `span`)
    objective: Literal["clm", "mlm", "span"] = "clm"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # GPT-2's block with rotary positions: on the built-in world it pretrains to a lower loss than
    # learned positions (0.719 against 0.777 at batch 16) and its SFT model answers better (README).
    model: DecoderConfig = field(default_factory=lambda: DecoderConfig.from_preset("tiny", "neox"))
    encoder: enc.EncoderConfig = field(default_factory=enc.EncoderConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    seq2seq: Seq2SeqConfig = field(default_factory=Seq2SeqConfig)
    span: SpanConfig = field(default_factory=SpanConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> None:
        name = {"mlm": "encoder.max_position_embeddings", "span": "seq2seq.block_size"}.get(self.objective,
                                                                                         "model.block_size")
        require(self.train.block_size <= self.context, "train.block_size",
                f"{self.train.block_size} exceeds {name} {self.context} (the model's maximum context)")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
                f"unknown device {self.device!r}; auto, cpu, cuda or cuda:N")
        require(self.dist == "ddp" or self.objective == "clm", "dist", "fsdp shards the decoder (objective clm) only")

    @property
    def context(self) -> int:
        return self.encoder.max_position_embeddings if self.objective == "mlm" else self.arch.block_size

    @property
    def block_size(self) -> int:
        return self.train.block_size or self.context

    @property
    def arch(self) -> DecoderConfig | enc.EncoderConfig | Seq2SeqConfig:
        """The config of the model this objective trains."""
        return {"mlm": self.encoder, "span": self.seq2seq}.get(self.objective, self.model)


# ---------------------------------------------------------------- data and tokenizer


def _source(cfg: PretrainConfig):
    """(cache key, documents()) for the configured text; validates paths without reading them all."""
    if cfg.data.files:
        files = resolve_inputs(cfg.data.files)
        return "files:" + files_key(files), lambda: read_documents(files)
    key = f"builtin:{builtin.corpus_version()}:{cfg.data.corpus_chars}:{cfg.data.corpus_seed}"
    return key, lambda: iter(builtin.generate_corpus(cfg.data.corpus_chars, cfg.data.corpus_seed).split("\n\n"))


def _tokenizer(cfg: PretrainConfig, rt: stage.Runtime, key: str, documents, cache: Path):
    """The configured tokenizer, or one trained on the data (once: cached by data and settings)."""
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    folder = cache / "tokenizers" / _digest(f"{key}|{cfg.tokenizer.kind}|{cfg.tokenizer.vocab_size}|{TOKENIZER_FORMAT}")
    if rt.is_main and not (folder / "tokenizer.json").is_file():
        tok = train_tokenizer(documents(), cfg.tokenizer.kind, cfg.tokenizer.vocab_size)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")  # two runs may train it at once
        shutil.rmtree(tmp, ignore_errors=True)
        save_tokenizer(tok, tmp)
        publish(tmp, folder, "tokenizer.json")
    rt.barrier()
    return load_tokenizer(folder)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# ---------------------------------------------------------------- the stage


def run(cfg: PretrainConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Pretrain as configured; returns the summary that `--json` prints."""
    with stage.start("pretrain", cfg, resume, overwrite, log, dtype=cfg.dtype) as r:
        return _run(r, *_source(cfg))


def _run(r: stage.Run, key: str, documents) -> dict:
    cfg, rt, out, resume, log = r.cfg, r.rt, r.out, r.resume, r.log
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    tokenizer = load_tokenizer(ckpt.resolve_checkpoint(out)) if resume else _tokenizer(cfg, rt, key, documents, cache)
    if rt.is_main:
        build_shards(tokenizer, key, documents, cfg.data.val_fraction, cache)
    rt.barrier()
    shards = build_shards(tokenizer, key, documents, cfg.data.val_fraction, cache)
    block = cfg.block_size
    for name, data in (("training", shards.train), ("validation", shards.val)):
        if len(data) <= block + 1:
            raise UserError(f"data: the {name} split has {len(data)} tokens, too few for block size {block}; "
                            "give more text or a smaller train.block_size")

    mlm, spans = cfg.objective == "mlm", cfg.objective == "span"
    section = {"mlm": "encoder", "span": "seq2seq"}.get(cfg.objective, "model")  # the section of the model trained
    if spans:  # after the shards: sentinels never occur in the text, so they change no token of it
        sentinels = span.add_sentinels(tokenizer, cfg.span.extra_ids)
        span.check_spans(block, cfg.span.noise_density, cfg.span.mean_noise_span_length, len(sentinels))
        eos = special_id(tokenizer, "eos")
        require(eos is not None, "tokenizer", "span corruption ends inputs and targets with <|eos|>; the tokenizer lacks it")
    elif not mlm:
        prompt_len = len(tokenizer.encode(cfg.sample.prompt, add_special_tokens=False).ids)
        require(prompt_len < cfg.model.block_size, "sample.prompt",
                f"{prompt_len} tokens leave no room in the model's context of {cfg.model.block_size}")
    vocab = tokenizer.get_vocab_size()
    require(cfg.arch.vocab_size == 0 or cfg.arch.vocab_size >= vocab, f"{section}.vocab_size",
            f"{cfg.arch.vocab_size} is smaller than the tokenizer's {vocab} tokens")
    setattr(cfg, section, replace(cfg.arch, vocab_size=cfg.arch.vocab_size or vocab))
    micro, accum = accumulation(cfg.train, rt)
    model = (enc.EncoderLM if mlm else Seq2SeqLM if spans else DecoderLM)(cfg.arch).to(rt.device)
    # All processes draw the same windows (same seed) and keep their own slice of each step.
    masked = MaskedLM(cfg.mlm, tokenizer, shards.train, shards.val, block, cfg.seed) if mlm else None
    sampler = masked.sampler if mlm else BlockSampler(shards.train, block, cfg.seed)
    span_rng = np.random.default_rng([cfg.seed, 1])  # where the spans fall
    start_step = 0
    if resume:
        loaded, _ = ckpt.load_encoder(out, kinds=("mlm",)) if mlm else ckpt.load_model(out, seq2seq=spans)
        changed = [f.name for f in fields(cfg.arch) if "dropout" not in f.name
                   and getattr(loaded.config, f.name, None) != getattr(cfg.arch, f.name)]
        if changed:
            name = changed[0]
            raise UserError(f"{section}.{name}: {getattr(cfg.arch, name)!r} differs from the checkpoint's "
                            f"{getattr(loaded.config, name, None)!r}; a resumed run keeps its model")
        model.load_state_dict(loaded.state_dict())
    model = shard(model, rt, cfg.dist)
    optimizer = make_optimizer(model, cfg.train, rt.device)
    if resume:
        state = restore(out, optimizer, cfg.train, model)
        sampler.set_state(state["sampler"])
        if spans:
            span_rng.bit_generator.state = state["span_rng"]
        start_step = int(state["step"])

    if rt.is_main:
        r.prepare(("metrics.jsonl", "samples.txt", "loss.png", "accuracy.png"))
    metrics = r.metrics(start_step)
    if mlm:
        params, flops = enc.num_params(model), enc.flops_per_token(cfg.encoder, block, cfg.mlm.mask_prob)
        what = f"BERT-style encoder (masked LM, {cfg.mlm.mask_prob:.0%} of tokens), {flops / 1e6:.1f} MFLOPs/token (training)"
    elif spans:
        params, flops = num_params(model), None
        what = (f"T5 encoder-decoder, span corruption ({cfg.span.noise_density:g} of tokens in spans of "
                f"{cfg.span.mean_noise_span_length:g})")
    else:
        params, flops = num_params(model), flops_per_token(cfg.model, block)
        what = f"{cfg.model.flavour} flavour, {flops / 1e6:.1f} MFLOPs/token (training)"
    if rt.is_main:
        log(f"model: {what}, {params / 1e6:.2f}M parameters; tokens: {len(shards.train):,} train / {len(shards.val):,} val; "
            f"batch {cfg.train.batch_size} x {block} = {micro} x {accum} steps x {rt.world} processes"
            f"{' (FSDP)' if sharded(model) else ''}; device {rt.device}")

    train_model = wrap(model, rt, cfg.compile)

    def corrupted(windows: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return span.span_batch(windows[:, :block], cfg.span.noise_density, cfg.span.mean_noise_span_length,
                               sentinels, eos, rng)

    def micro_batches():
        if mlm:  # the whole step's batch corrupted at once: every process draws the same masks
            batch = masked.sample(cfg.train.batch_size)
        elif spans:  # every process corrupts the whole batch alike (same rng), as it draws it
            batch = corrupted(sampler.sample(cfg.train.batch_size), span_rng)
            mine = {k: v[rt.rank * micro * accum:(rt.rank + 1) * micro * accum] for k, v in batch.items()}
            return [{k: v[i * micro:(i + 1) * micro].to(rt.device, non_blocking=True) for k, v in mine.items()}
                    for i in range(accum)]
        else:
            batch = (sampler.sample(cfg.train.batch_size),)
        mine = [b[rt.rank * micro * accum:(rt.rank + 1) * micro * accum] for b in batch]
        return [tuple(b[i * micro:(i + 1) * micro].to(rt.device, non_blocking=True) for b in mine)
                for i in range(accum)]

    def loss_fn(m, batch):
        if mlm:
            return masked.loss(m, batch)
        if spans:
            return m(batch["input_ids"], labels=batch["labels"])[1]
        (rows,) = batch
        return m(rows[:, :-1], rows[:, 1:])[1]

    eval_sampler_seed = cfg.seed + 1  # fixed validation windows: curves compare like with like

    def val_batches():
        ev, rng = BlockSampler(shards.val, block, eval_sampler_seed), np.random.default_rng([eval_sampler_seed, 1])
        for _ in range(cfg.train.eval_batches):
            yield corrupted(ev.sample(micro), rng) if spans else ev.sample(micro)

    @torch.no_grad()
    def evaluate(step: int):
        if mlm:
            return masked.evaluate(model, micro, cfg.train.eval_batches, rt.device)
        losses = [loss_fn(model, {k: v.to(rt.device) for k, v in b.items()} if spans else (b.to(rt.device),)).item()
                  for b in val_batches()]
        val = float(np.mean(losses))
        scores = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        if rt.is_main or sharded(model):  # one sample per evaluation (every FSDP process takes part in it)
            text = (_denoised(model, tokenizer, next(val_batches()), 1) if spans else
                    generate_text(model, tokenizer, cfg.sample.prompt, 1, 60, cfg.sample.temperature, cfg.sample.top_k,
                                  seed=cfg.seed))[0]
        if rt.is_main:
            with (out / "samples.txt").open("a") as f:
                f.write(f"--- step {step} (val loss {val:.3f}) ---\n{text}\n\n")
        return scores

    def save(step: int):
        shards = save_shards(out, model, optimizer, rt)
        if rt.is_main:
            extra = {"span_rng": span_rng.bit_generator.state} if spans else {}
            ckpt.save_checkpoint(out / ckpt.CHECKPOINT, model, tokenizer,
                                 trainer_state(step, optimizer, sampler=sampler.state(), **extra),
                                 weights=shards.weights, shards=shards.folder)
        rt.barrier()

    train_start = time.perf_counter()
    last = fit(train_model, optimizer, rt, cfg.train, micro_batches=micro_batches, loss_fn=loss_fn,
               evaluate=evaluate, save=save, log=metrics, tokens_per_step=cfg.train.batch_size * block,
               start_step=start_step, desc="pretrain")
    train_s = time.perf_counter() - train_start

    summary = {"out": str(out), "checkpoint": str(out / ckpt.CHECKPOINT), "objective": cfg.objective,
               "steps": cfg.train.steps, "params": params, "flops_per_token": flops, "train_loss": last.get("loss"),
               "val_loss": last.get("val_loss"), "val_ppl": last.get("val_ppl"),
               "tokens_per_s": last.get("tokens_per_s"), "train_s": round(train_s, 2)}
    if mlm:
        summary.update({k: last.get(k) for k in ("val_accuracy", "unigram_accuracy", "unigram_loss")})
        if rt.is_main:
            records = read_metrics(out / "metrics.jsonl")
            plot_curves(records, out / "loss.png", {"loss": "train loss", "val_loss": "validation loss (all [MASK])",
                                                    "unigram_loss": "unigram baseline"},
                        title=f"masked-LM pretraining ({params / 1e6:.2f}M parameters)",
                        ylabel="cross-entropy on masked tokens (nats)")
            plot_curves(records, out / "accuracy.png", {"val_accuracy": "model", "unigram_accuracy": "unigram baseline"},
                        title="held-out masked-token accuracy", ylabel="accuracy")
            log(f"held-out masked-token accuracy {last.get('val_accuracy', 0):.3f} "
                f"(unigram baseline {last.get('unigram_accuracy', 0):.3f})")
    elif rt.is_main:
        if sharded(model):  # the whole model, as saved, for the samples
            model = ckpt.load_model(out, rt.device)[0]
        records = read_metrics(out / "metrics.jsonl")
        plot_curves(records, out / "loss.png", {"loss": "train loss", "val_loss": "validation loss"},
                    title=f"pretraining{' (span corruption)' if spans else ''} ({params / 1e6:.2f}M parameters)",
                    ylabel="cross-entropy (nats/token)")
        if spans:
            samples = _denoised(model, tokenizer, next(val_batches()), cfg.sample.num_samples) if cfg.sample.num_samples else []
        else:
            samples = generate_text(model, tokenizer, cfg.sample.prompt, cfg.sample.num_samples,
                                    cfg.sample.max_new_tokens, cfg.sample.temperature, cfg.sample.top_k, seed=cfg.seed)
        for i, text in enumerate(samples):
            log(f"--- sample {i + 1} ---\n{'' if spans else cfg.sample.prompt}{text}")
        summary["samples"] = samples
    summary["wall_s"] = r.wall_s()
    return summary


def _denoised(model: Seq2SeqLM, tokenizer, batch: dict[str, torch.Tensor], n: int) -> list[str]:
    """A span-corruption model's greedy answers to `n` corrupted windows, beside the truth."""
    from chatfoundry.generation import GenerationConfig, generate_seq2seq

    inputs, labels = batch["input_ids"][:n].tolist(), batch["labels"][:n].tolist()
    was_training = model.training
    model.eval()
    out = generate_seq2seq(model, inputs, GenerationConfig(max_new_tokens=len(labels[0]),
                                                           eos_token_id=special_id(tokenizer, "eos")))
    model.train(was_training)
    show = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731 - sentinels stay visible
    return [f"input:  {show(x)}\nmodel:  {show(got)}\ntarget: {show(y)}"
            for x, y, got in zip(inputs, labels, out.sequences)]
