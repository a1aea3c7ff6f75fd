"""Continuous batching for the server: every decode step, finished rows leave and waiting jobs join.

One worker thread owns the model and a running batch of up to `max_batch` rows over one
preallocated KV cache (iteration-level scheduling, as Orca, vLLM and TGI do). Each round it

1. takes in the jobs submitted since the last round;
2. drops the rows whose client went away (`job.cancel`), freeing their slots;
3. admits waiting jobs into free slots: a job's prompt is prefilled alone, straight into its slot
   of the shared cache, and its first token comes from that prefill;
4. runs one decode step for every row at once and streams each row its token; a row leaves at
   its EOS, stop string or `max_new_tokens`.

The cache layout. All rows end at one shared write column `pos`: row i holds its tokens in
columns [pos - length_i, pos) of slot i, and a key mask marks those columns real (positions count
a row's real tokens only, so the left padding is exact: each row computes what it would alone).
A joining prompt of P tokens goes to [pos - P, pos). Because every row ends at `pos`, moving all
of them by the same offset is one slice copy (`_shift`): right when a prompt longer than `pos`
joins, left when the leading columns no row uses grow (attention reads [0, pos], so they cost
compute) or when `pos` reaches the context. That is why admission needs no look-ahead: the width
in use is always the longest live row's length, and each row fits the context alone
(prompt + max_new_tokens, which the API checks), so a left shift always makes room.
Live rows fill slots [0, n) with no gaps (a leaving row's slot takes the last row), so a step
runs on the cache's first n slots and no compute goes to empty ones.

Settings per row: rows with equal sampling settings are picked together by the generator's own
picker (`generation._picker`), rows with a repetition penalty or n-gram ban one by one with their
own history, so every row gets exactly the processors it would alone. At temperature 0 a row's
tokens equal its lone greedy run.

A seeded job replays exactly: it waits until the running batch drains, then runs alone through
the generator's token loop (`generation._steps`), as `generate` would, and nothing joins it.
So does a job that does not fit the context alone (the loop slides its window); the API never
sends one.

Admission is fair between requests: a free slot goes to the waiting job whose request has the
fewest rows running, the earliest first among equals (jobs of one request share `job.request`;
a job without one is a request of its own). And one request holds at most `max_batch -
max_batch // 4` rows (12 of 16): rows are never preempted, so without that reserve a request
with many choices that found the server idle would hold every slot until its rows end. So a
new request's first choice joins within a step or so, however many choices came before it, and
a request with many choices fills only the slots nobody else waits for. A job picked to run
alone (seeded) holds back the others until the batch has drained. Waiting jobs whose client
went away (`job.cancel`) are dropped before they cost a step.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import queue
import threading
from collections.abc import Iterator

import torch

from chatfoundry.generation import Picker, _picker, _steps  # the generator's picker and lone token loop
from chatfoundry.models.layers import KVCache
from chatfoundry.textgen import TextStream


@dataclasses.dataclass
class _Row:
    job: object  # api.Job: ids, cfg, stops, cancel
    out: queue.Queue
    text: TextStream
    pick: Picker
    group: object  # rows with equal groups are picked together
    history: list[int]  # prompt and tokens so far, for repetition penalties and n-gram bans
    count: int = 0  # tokens emitted
    length: int = 0  # cache columns it holds, ending at the batch's `pos`
    last: int = -1  # the token to feed at the next step


class Batcher:
    """`submit(job)` -> an iterator of the job's events; concurrent jobs decode as rows of one batch.

    Counters for tests and metrics: `batch_sizes` (jobs served by each run of the batch, from its
    first row until it drains; a seeded job's lone run counts 1), `active` (rows decoding now),
    `cancelled` (jobs dropped because their stream was closed), `steps` and `row_steps` (decode
    steps, and rows over all of them: their ratio is the mean batch), `shifts` (realignments).
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, window: float = 0.005, start: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.window = max_batch, window
        self.context = model.config.block_size
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: list = []  # (job, out) taken from the inbox, not yet admitted, in arrival order
        self.rows: list[_Row] = []  # row i lives in slot i of the cache
        self.pos = 0  # the shared write column: every row ends here
        self._k: list[torch.Tensor] = []  # per layer (max_batch, kv heads, context, head dim), on first use
        self._v: list[torch.Tensor] = []
        self._mask = torch.zeros(0, 0, dtype=torch.bool)  # (max_batch, context): columns holding real tokens
        self.batch_sizes: list[int] = []
        self.cancelled = self.steps = self.row_steps = self.shifts = 0
        self._run_open = False
        self._closing = False
        self._thread = threading.Thread(target=self._work, daemon=True)
        if start:
            self.start()

    @property
    def active(self) -> int:
        return len(self.rows)

    def start(self) -> None:
        self._thread.start()
        atexit.register(self.close)  # a thread that ran torch, killed at exit, aborts the process

    def close(self) -> None:
        """Stop the worker once the jobs already queued are done."""
        if self._thread.is_alive():
            self.inbox.put(None)
            self._thread.join()

    def submit(self, job) -> Iterator[dict]:
        out: queue.Queue = queue.Queue()
        self.inbox.put((job, out))
        return self._events(job, out)

    @staticmethod
    def _events(job, out: queue.Queue) -> Iterator[dict]:
        try:
            while (event := out.get()) is not None:
                if "error" in event:
                    raise event["error"]
                yield event
        finally:  # closed early (a client gone): the worker drops the row before its next step
            job.cancel.set()

    # ---------------------------------------------------------------- the worker

    def _work(self) -> None:
        while self.step(block=True):
            pass

    def step(self, block: bool = False) -> bool:
        """One round: take in new jobs, drop cancelled rows, admit waiting jobs, decode one token
        per row. With `block`, first wait for a job when there is nothing to do. False once closed
        and drained. (The worker thread loops on it; a test may call it by hand with start=False.)"""
        self._take_in(block and not self.rows and not self.waiting)
        if self._closing and not self.rows and not self.waiting:
            return False
        with torch.inference_mode():
            for row in [r for r in self.rows if r.job.cancel.is_set()]:
                self._leave(row)
                self.cancelled += 1
                row.out.put(None)
            self._admit()
            if self.rows:
                self._decode_step()
        if not self.rows:
            self._run_open = False
        return True

    def _take_in(self, block: bool) -> None:
        def take(item) -> None:
            if item is None:
                self._closing = True
            else:
                self.waiting.append(item)

        if block:
            take(self.inbox.get())
            try:  # stragglers of the same moment start together
                while len(self.waiting) < self.max_batch and not self._closing:
                    take(self.inbox.get(timeout=self.window))
            except queue.Empty:
                pass
        try:
            while True:
                take(self.inbox.get_nowait())
        except queue.Empty:
            pass

    def _admit(self) -> None:
        kept = []
        for job, out in self.waiting:
            if job.cancel.is_set():  # gone before it started
                self.cancelled += 1
                out.put(None)
            else:
                kept.append((job, out))
        self.waiting = kept
        while self.waiting and len(self.rows) < self.max_batch:
            i = self._fairest()
            if i is None:
                return  # every waiting request holds its share: the free slots stay for newcomers
            job, out = self.waiting[i]
            alone = job.cfg.seed is not None or not self._fits(job)
            if alone and self.rows:
                return  # it waits for the batch to drain, and so do the others
            del self.waiting[i]
            if alone:
                self.batch_sizes.append(1)
                self._run_open = False
            else:
                if not self._run_open:
                    self.batch_sizes.append(0)
                    self._run_open = True
                self.batch_sizes[-1] += 1
            try:
                self._run_alone(job, out) if alone else self._join(job, out)
            except Exception as e:  # noqa: BLE001 - this request hears of it; the worker lives on
                _fail(out, e)

    def _fairest(self) -> int | None:
        """Index in `waiting` of the job to admit next: of the requests below their share of
        the batch, the one with the fewest rows running; the earliest job among equals."""
        share = self.max_batch - self.max_batch // 4
        running = collections.Counter(_request(r.job) for r in self.rows)
        counts = [running[_request(job)] for job, _ in self.waiting]
        eligible = [i for i, n in enumerate(counts) if n < share]
        return min(eligible, key=lambda i: (counts[i], i)) if eligible else None

    def _fits(self, job) -> bool:
        """Whether the job runs within the context alone: its prompt, then max_new_tokens - 1 more
        cached tokens (the last one is never fed back)."""
        n_new = job.cfg.max_new_tokens
        return 1 <= len(job.ids) and n_new >= 1 and len(job.ids) + n_new - 1 <= self.context

    def _join(self, job, out: queue.Queue) -> None:
        """Prefill the prompt alone into the next free slot, at columns [pos - P, pos); emit its
        first token; the row joins the batch unless that token already ends it."""
        ids, cfg = job.ids, job.cfg
        row = _Row(job, out, TextStream(self.tokenizer, [s for s in job.stops if s]), _picker(self.model, cfg),
                   _group(cfg), list(ids), length=len(ids))
        if not self._k:
            cache = self.model.new_cache(self.max_batch)
            self._k, self._v = cache.k, cache.v
            self._mask = torch.zeros(self.max_batch, self.context, dtype=torch.bool, device=self._k[0].device)
        if not self.rows:
            self.pos = len(ids)  # an empty batch starts where this prompt ends: no padding at all
        elif len(ids) > self.pos:
            self._shift(len(ids) - self.pos)  # make room on the left for the longer prompt
        slot, lo = len(self.rows), self.pos - len(ids)
        # a cache over just this slot's columns from lo: the prompt is computed exactly as alone
        own = KVCache([k[slot:slot + 1, :, lo:] for k in self._k], [v[slot:slot + 1, :, lo:] for v in self._v])
        prompt = torch.tensor([ids], device=self._k[0].device)
        logits, _ = self.model(prompt, cache=own)
        logits = logits[:, -1, :].float()
        token = int(row.pick(logits, prompt)[0])
        logprob = float(torch.log_softmax(logits, dim=-1)[0, token])
        self._mask[slot, :lo] = False
        self._mask[slot, lo:self.pos] = True
        if not self._emit(row, token, logprob):
            self.rows.append(row)

    def _decode_step(self) -> None:
        """Feed every row its last token at column `pos`, pick each row's next one."""
        if self.pos >= self.context or self._lead() * 4 >= self.pos:
            self._shift(-self._lead())
        n, rows = len(self.rows), self.rows
        device = self._k[0].device
        self._mask[:n, self.pos] = True
        key_mask = self._mask[:n, :self.pos + 1]
        cache = KVCache([k[:n] for k in self._k], [v[:n] for v in self._v], self.pos)
        tokens = torch.tensor([[r.last] for r in rows], device=device)
        try:
            logits, _ = self.model(tokens, cache=cache, key_mask=None if bool(key_mask.all()) else key_mask)
        except Exception as e:  # noqa: BLE001 - every row of the batch hears of it; the worker lives on
            for row in rows:
                _fail(row.out, e)
            self.rows = []
            return
        self.pos += 1
        self.steps += 1
        self.row_steps += n
        logits = logits[:, -1, :].float()
        picked, failed = self._pick(logits)
        chosen = torch.log_softmax(logits, dim=-1).gather(1, picked[:, None]).squeeze(1).tolist()
        done = []
        for i, (row, token) in enumerate(zip(rows, picked.tolist())):
            row.length += 1
            if i in failed:
                _fail(row.out, failed[i])
                done.append(row)
            elif self._emit(row, token, chosen[i]):
                done.append(row)
        for row in done:
            self._leave(row)

    def _pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, Exception]]:
        """Each row's next token, by its own settings: one picker call per group of rows with equal
        settings, or per row when the settings read the row's history. A group whose picking fails
        gets its error (and token 0 as a placeholder); the other rows go on."""
        groups: dict[object, list[int]] = {}
        for i, row in enumerate(self.rows):
            groups.setdefault(row.group, []).append(i)
        picked = torch.zeros(len(self.rows), dtype=torch.long, device=logits.device)
        failed: dict[int, Exception] = {}
        for idx in groups.values():
            first = self.rows[idx[0]]
            try:
                if _reads_history(first.job.cfg):
                    for i in idx:
                        history = torch.tensor([self.rows[i].history], device=logits.device)
                        picked[i] = self.rows[i].pick(logits[i:i + 1], history)[0]
                else:
                    at = torch.tensor(idx, device=logits.device)
                    picked[at] = first.pick(logits[at], logits.new_zeros(len(idx), 0, dtype=torch.long))
            except Exception as e:  # noqa: BLE001
                failed.update(dict.fromkeys(idx, e))
        return picked, failed

    def _emit(self, row: _Row, token: int, logprob: float) -> bool:
        """Stream one token of a row; True when the row is finished (its finish event sent)."""
        row.count += 1
        row.last = token
        row.history.append(token)
        row.out.put({"text": row.text.push(token), "token": token, "logprob": logprob})
        if token in row.job.cfg.eos_ids or row.text.stopped:
            _finish(row, "stop")
        elif row.count >= row.job.cfg.max_new_tokens:
            _finish(row, "length")
        else:
            return False
        return True

    def _run_alone(self, job, out: queue.Queue) -> None:
        """A seeded (or too long) job: the generator's own loop, as `generation.stream` runs it."""
        row = _Row(job, out, TextStream(self.tokenizer, [s for s in job.stops if s]), None, None, [])
        for tokens, logprobs in _steps(self.model, [job.ids], job.cfg.max_new_tokens, _picker(self.model, job.cfg)):
            if job.cancel.is_set():
                self.cancelled += 1
                out.put(None)
                return
            if self._emit(row, int(tokens[0]), float(logprobs[0])):
                return
        _finish(row, "length")  # only when the loop ran dry, as with max_new_tokens 0

    # ---------------------------------------------------------------- the cache layout

    def _lead(self) -> int:
        """Leading columns no live row uses."""
        return self.pos - max(r.length for r in self.rows)

    def _shift(self, by: int) -> None:
        """Move every row's columns by `by` (right when > 0): all rows end at `pos`, so it is one
        slice copy of the columns in use, [pos - longest row, pos)."""
        if by == 0:
            return
        n, lo = len(self.rows), self.pos - max(r.length for r in self.rows)
        src, dst = slice(lo, self.pos), slice(lo + by, self.pos + by)
        for buf in self._k + self._v:
            buf[:n, :, dst] = buf[:n, :, src].clone()  # clone: the two ranges may overlap
        self._mask[:n, dst] = self._mask[:n, src].clone()
        self._mask[:n, :lo + by] = False
        self.pos += by
        self.shifts += 1

    def _leave(self, row: _Row) -> None:
        """Free a row's slot: the last row moves into it, so live rows stay in slots [0, n)."""
        i, last = self.rows.index(row), len(self.rows) - 1
        if i != last:
            lo = self.pos - self.rows[last].length
            for buf in self._k + self._v:
                buf[i, :, lo:self.pos] = buf[last, :, lo:self.pos]
            self._mask[i, :self.pos] = self._mask[last, :self.pos]
            self.rows[i] = self.rows[last]
        self.rows.pop()


def _request(job) -> object:
    """Which request a job belongs to: its `request` key, or the job itself."""
    key = getattr(job, "request", None)
    return id(job) if key is None else key


def _reads_history(cfg) -> bool:
    return cfg.repetition_penalty != 1.0 or cfg.no_repeat_ngram_size > 0


def _group(cfg) -> tuple:
    """The settings that decide how a token is picked (not the length, the EOS ids or a seed)."""
    key = dataclasses.replace(cfg, max_new_tokens=1, eos_token_id=None, seed=None)
    return tuple((f.name, repr(getattr(key, f.name))) for f in dataclasses.fields(key))


def _finish(row: _Row, reason: str) -> None:
    rest = row.text.flush()  # text held back for a stop string that never came
    if rest:
        row.out.put({"text": rest, "token": -1, "logprob": 0.0})
    row.out.put({"finish_reason": reason, "completion_tokens": row.count})
    row.out.put(None)


def _fail(out: queue.Queue, error: Exception) -> None:
    out.put({"error": error})
    out.put(None)
