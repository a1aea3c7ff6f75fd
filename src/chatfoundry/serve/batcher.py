"""Dynamic batching for the server: jobs that arrive together decode as rows of one batch.

One worker thread owns the model. It takes every job waiting (up to `max_batch`, after a short
`window` for stragglers), groups those that can share a decoding (the same sampling settings, no
seed: a seeded job runs alone so that it replays exactly), and runs each group through the
generator's batched token loop (left padding and a key mask make each row as if it ran alone).
Every row streams its own events, as `api.run_job` does, and leaves the batch at its own EOS, stop
string, `max_new_tokens` or cancellation; the batch ends when no row is left.
"""

from __future__ import annotations

import atexit
import dataclasses
import queue
import threading
from collections.abc import Iterator

import torch

from chatfoundry.generation import _picker, _steps  # the batched token loop behind generate_batch
from chatfoundry.textgen import TextStream


@dataclasses.dataclass
class _Row:
    job: object  # api.Job
    out: queue.Queue
    text: TextStream
    count: int = 0


class Batcher:
    """`submit(job)` -> an iterator of the job's events; jobs submitted together share a batch."""

    def __init__(self, model, tokenizer, max_batch: int = 16, window: float = 0.005, start: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.window = max_batch, window
        self.inbox: queue.Queue = queue.Queue()
        self.batch_sizes: list[int] = []  # rows of every decoding run so far (for tests and metrics)
        self._thread = threading.Thread(target=self._work, daemon=True)
        if start:
            self.start()

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
        finally:  # closed early (a client gone): the worker drops the row at its next token
            job.cancel.set()

    # ---------------------------------------------------------------- the worker

    def _work(self) -> None:
        while True:
            waiting = [self.inbox.get()]
            try:  # stragglers of the same moment join
                while len(waiting) < self.max_batch:
                    waiting.append(self.inbox.get(timeout=self.window))
            except queue.Empty:
                pass
            closing = None in waiting
            for group in _groups([w for w in waiting if w is not None]):
                try:
                    with torch.inference_mode():
                        self._decode(group)
                except Exception as e:  # noqa: BLE001 - each request hears of it; the worker lives on
                    for _, out in group:
                        out.put({"error": e})
                        out.put(None)
            if closing:
                return

    def _decode(self, group: list[tuple]) -> None:
        rows = [_Row(job, out, TextStream(self.tokenizer, [s for s in job.stops if s])) for job, out in group]
        cfg = group[0][0].cfg
        self.batch_sizes.append(len(rows))
        steps = _steps(self.model, [r.job.ids for r in rows], max(r.job.cfg.max_new_tokens for r in rows),
                       _picker(self.model, cfg))
        live = list(range(len(rows)))
        for tokens, logprobs in steps:
            for i in list(live):
                row = rows[i]
                if row.job.cancel.is_set():
                    live.remove(i)
                    row.out.put(None)
                    continue
                token = int(tokens[i])
                row.count += 1
                row.out.put({"text": row.text.push(token), "token": token, "logprob": float(logprobs[i])})
                if token in row.job.cfg.eos_ids or row.text.stopped:
                    finish = "stop"
                elif row.count >= row.job.cfg.max_new_tokens:
                    finish = "length"
                else:
                    continue
                live.remove(i)
                _finish(row, finish)
            if not live:
                break
        for i in live:  # only when the loop ran dry, as with max_new_tokens 0
            _finish(rows[i], "length")


def _finish(row: _Row, reason: str) -> None:
    rest = row.text.flush()  # text held back for a stop string that never came
    if rest:
        row.out.put({"text": rest, "token": -1, "logprob": 0.0})
    row.out.put({"finish_reason": reason, "completion_tokens": row.count})
    row.out.put(None)


def _groups(waiting: list[tuple]) -> list[list[tuple]]:
    """Jobs that can share one decoding: equal settings apart from the length, and no seed."""
    groups: dict[object, list[tuple]] = {}
    for n, (job, out) in enumerate(waiting):
        key = n if job.cfg.seed is not None else dataclasses.replace(job.cfg, max_new_tokens=1)
        groups.setdefault(_hashable(key), []).append((job, out))
    return list(groups.values())


def _hashable(key) -> object:
    if isinstance(key, int):
        return key
    return tuple((f.name, repr(getattr(key, f.name))) for f in dataclasses.fields(key))
