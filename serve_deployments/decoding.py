"""Decoding many requests as one batch: a request's state (`Sequence`), the left-padded KV-cache batch that rows
join and leave between steps (`DecodeBatch`, pure torch), and the scheduler that feeds one such batch from many
concurrent callers on an event loop (`ContinuousBatcher`, asyncio). No Ray here: the LMServer deployment wraps it,
and the tests drive it directly.

Continuous batching: a request that arrives while others are decoding is prefilled and joins them at the next
step instead of waiting for the whole batch to finish, and a row that finishes leaves at once. Greedy output is
the same as decoding the request alone, whenever it joins.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable

import torch
from torch.nn import functional as F

from app.model import GPT, KVCache, sample_next_token
from app.tokenizer import Tokenizer


# ---- one sequence being decoded (pure Python: text, stop strings, finish) ------------------------------------


@dataclass
class Sequence:
    """A request's decoding state: its tokens, its text so far, and whether and why it finished."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    stop: tuple[str, ...]
    generator: torch.Generator | None
    tokenizer: Tokenizer
    token_ids: list[int] = field(default_factory=list)
    logprob_sum: float = 0.0  # natural-log probability of each generated token under the model (temperature 1)
    entropy_sum: float = 0.0  # entropy (nats) of the model's next-token distribution at each step
    prompt_logprob: float | None = None  # mean log-probability of the prompt's tokens after its first (prefill)
    text: str = ""  # the completion's text, cut before a stop string once one appears
    emitted: int = 0  # characters of text already streamed
    finish_reason: str | None = None  # "stop" (eos or a stop string) or "length"
    cancelled: bool = False  # the caller went away: the row leaves the batch at the next step

    def push(self, token: int, logprob: float, entropy: float) -> dict:
        """Append one generated token; returns the stream event {text (new), token_id, finish_reason}."""
        self.token_ids.append(token)
        self.logprob_sum += logprob
        self.entropy_sum += entropy
        if token == self.tokenizer.eos_id:
            self.finish_reason = "stop"
            return self._event(token, len(self.text))
        full = self.tokenizer.decode(self.token_ids)
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.finish_reason = full[:min(hits)], "stop"
            return self._event(token, len(self.text))
        self.text = full
        if len(self.token_ids) >= self.max_tokens:
            self.finish_reason = "length"
            return self._event(token, len(full))
        return self._event(token, len(full) - self._held_back(full))

    def _held_back(self, full: str) -> int:
        """Characters at the end not to stream yet: the start of a stop string, or an incomplete UTF-8 char."""
        hold = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if full.endswith(s[:n])), default=0)
        while hold < len(full) and full[len(full) - hold - 1] == "\ufffd":  # byte-level BPE mid-character
            hold += 1
        return hold

    def _event(self, token: int, upto: int) -> dict:
        delta = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return {"text": delta, "token_id": token, "finish_reason": self.finish_reason}

    def result(self, model: str) -> dict:
        n = len(self.token_ids)
        return {
            "text": self.text, "token_ids": list(self.token_ids), "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": n, "finish_reason": self.finish_reason,
            "mean_logprob": self.logprob_sum / n if n else 0.0, "mean_entropy": self.entropy_sum / n if n else 0.0,
            "prompt_logprob": self.prompt_logprob, "model": model,
        }


# ---- the batch: rows join and leave between steps (pure torch; unit-tested without Ray) ---------------------


class DecodeBatch:
    """Sequences decoding together as one left-padded batch with a KV cache; rows join and leave between steps.

    `add()` queues sequences at any time. Each `step()` adds one token to every row already decoding (one
    forward over the cache) and prefills the queued sequences, giving each its first token (one forward for all of
    them). Rows are left-padded so that every row's next input goes to the same cache slot, and they live in one
    preallocated cache that is changed in place: a finished row's place is taken by the last row (one row
    copied), a joining row is written after the others with its prompt ending where their next token goes, and
    attention reads only from the first slot some live row uses, so it spans the longest live context rather
    than the batch's history. The cache is moved or grown only when it runs out of rows or slots.
    """

    def __init__(self, model: GPT, seqs: Iterable[Sequence] = (), pad_id: int = 0) -> None:
        self.model, self.pad_id = model, pad_id
        self.device = model.embed.wte.weight.device
        self.pending: list[Sequence] = list(seqs)  # queued: prefilled at the next step
        self.rows: list[Sequence] = []  # decoding: the sequence in each cache row 0..B-1
        self._cache: list[KVCache] = []  # per layer, [rows capacity, H, slots capacity, hd]
        self._pad = torch.zeros(0, dtype=torch.long, device=self.device)  # [B]: each row's first real slot
        self._idx = torch.zeros(0, 1, dtype=torch.long, device=self.device)  # [B, 1]: each row's next input
        self._slot = 0  # the cache slot every row's next input goes to

    def add(self, seqs: Iterable[Sequence]) -> None:
        """Queue sequences; the next step prefills them and they decode with the rest from then on."""
        self.pending.extend(seqs)

    @property
    def done(self) -> bool:
        return not self.rows and not self.pending

    @property
    def span(self) -> tuple[int, int]:
        """(first, next) cache slot of the live rows: attention reads slots first..next."""
        return (int(self._pad.min()) if self.rows else self._slot), self._slot

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, dict]]:
        """One decode forward for the rows (if any) and one prefill forward for the queued sequences (if any);
        returns (sequence, stream event) for every sequence that got a token."""
        assert not self.done
        events: list[tuple[Sequence, dict]] = []
        if self.rows:
            lo, B = self.span[0], len(self.rows)
            cache = [KVCache(c.k[:B, :, lo:], c.v[:B, :, lo:]) for c in self._cache]
            logits = self.model.forward_padded(self._idx, self._pad - lo, cache, self._slot - lo)[:, -1]  # [B, V]
            self._idx = self._push(self.rows, logits, events)[:, None]
            self._slot += 1
        self._drop([r for r, s in enumerate(self.rows) if s.finish_reason is not None or s.cancelled])
        if self.pending:
            new, self.pending = self.pending, []
            width = max(len(s.prompt_ids) for s in new)
            idx = torch.full((len(new), width), self.pad_id, dtype=torch.long, device=self.device)  # [n, T]
            for row, s in enumerate(new):
                idx[row, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids, dtype=torch.long)
            pad = torch.tensor([width - len(s.prompt_ids) for s in new], device=self.device)  # [n]
            cache = self.model.new_kv_cache(len(new), self.device, length=width)
            logits = self.model.forward_padded(idx, pad, cache, 0)  # [n, T, V]
            _score_prompts(new, idx, pad, logits)
            tokens = self._push(new, logits[:, -1], events)
            keep = [r for r, s in enumerate(new) if s.finish_reason is None and not s.cancelled]
            if keep:
                self._join([new[r] for r in keep], cache, keep, width - pad[keep], tokens[keep])
        return events

    @staticmethod
    def _push(seqs: list[Sequence], logits: torch.Tensor, events: list[tuple[Sequence, dict]]) -> torch.Tensor:
        """Choose each row's next token from logits [B, V], append it to its sequence (adding the stream event to
        `events`); returns the tokens [B], the rows' next inputs."""
        tokens, logprobs, entropies = _choose(seqs, logits)
        for s, t, lp, h in zip(seqs, tokens.tolist(), logprobs.tolist(), entropies.tolist()):
            events.append((s, s.push(t, lp, h)))
        return tokens

    def _drop(self, gone: list[int]) -> None:
        """Remove rows (finished or cancelled): the last row moves into each freed place."""
        if not gone:
            return
        for r in reversed(gone):  # from the end, so the row moved in is never one still to remove
            last = len(self.rows) - 1
            if r != last:
                first = int(self._pad[last])
                for c in self._cache:
                    c.k[r, :, first:self._slot] = c.k[last, :, first:self._slot]
                    c.v[r, :, first:self._slot] = c.v[last, :, first:self._slot]
                self.rows[r], self._pad[r], self._idx[r] = self.rows[last], self._pad[last], self._idx[last]
            self.rows.pop()
        B = len(self.rows)
        self._pad, self._idx = self._pad[:B], self._idx[:B]
        if not B:  # idle: give the memory back
            self._cache, self._slot = [], 0

    def _join(self, seqs: list[Sequence], cache: list[KVCache], rows: list[int], lengths: torch.Tensor,
              tokens: torch.Tensor) -> None:
        """Append rows `rows` of a prefill cache (every prompt ends at its last slot) after the live rows."""
        B, n, longest = len(self.rows), len(seqs), int(lengths.max())
        width = cache[0].k.size(2)
        slot = max(self._slot, longest)  # every joiner's prompt must end at the shared next slot
        lo = min(self.span[0], slot - longest)
        to_go = max(s.max_tokens - len(s.token_ids) for s in [*self.rows, *seqs])  # inputs still to feed
        rows_cap, _, slots_cap, _ = self._cache[0].k.shape if self._cache else (0, 0, 0, 0)
        if B + n > rows_cap or slot + to_go > slots_cap:
            slot -= lo  # out of room: move everything so the first live slot is 0, and grow if still needed
            rows_cap = rows_cap if B + n <= rows_cap else max(B + n, 2 * rows_cap)
            slots_cap = max(slots_cap, slot + to_go, self.model.cfg.seq_len)
        self._move(slot - self._slot, rows_cap, slots_cap)
        m = min(slot, width)  # joiners' real tokens all lie in the prefill cache's last `longest` <= m slots
        for mine, theirs in zip(self._cache, cache):
            mine.k[B:B + n, :, slot - m:slot] = theirs.k[rows, :, width - m:]
            mine.v[B:B + n, :, slot - m:slot] = theirs.v[rows, :, width - m:]
        self.rows += seqs
        self._pad = torch.cat([self._pad, slot - lengths])
        self._idx = torch.cat([self._idx, tokens[:, None]])

    def _move(self, shift: int, rows_cap: int, slots_cap: int) -> None:
        """Shift the live rows' slots by `shift`, into new tensors when the capacity changes."""
        first, nxt = self.span
        old = self._cache
        if not old or (old[0].k.size(0), old[0].k.size(2)) != (rows_cap, slots_cap):
            self._cache = self.model.new_kv_cache(rows_cap, self.device, length=slots_cap)
        elif shift == 0:
            return
        B = len(self.rows)
        for was, now in zip(old, self._cache):
            now.k[:B, :, first + shift:nxt + shift] = was.k[:B, :, first:nxt].clone()  # clone: ranges may overlap
            now.v[:B, :, first + shift:nxt + shift] = was.v[:B, :, first:nxt].clone()
        self._pad = self._pad + shift
        self._slot = nxt + shift


class _Throwaway(Sequence):
    """A request that ignores its tokens and always runs to max_tokens (warm_up: no tokenizer, no early eos)."""

    def push(self, token: int, logprob: float, entropy: float) -> dict:
        self.token_ids.append(token)
        self.finish_reason = "length" if len(self.token_ids) >= self.max_tokens else None
        return {"text": "", "token_id": token, "finish_reason": self.finish_reason}


def warm_up(model: GPT, pad_id: int, steps: int = 48, seed: int = 0) -> float:
    """Decode throwaway requests through `model` in the shapes and layouts serving meets, so that a compiled
    model (GPT.compile_decoding) has its graphs before the first real request: one row and several, one-token and
    longer prompts, rows that finish at their prefill, rows joining mid-decode, and rows leaving so that the live
    slots start after the cache's first (a strided view, which the compiler guards apart from a contiguous one).
    A seeded schedule over `steps` steps, at most 6 rows. Returns the seconds it took."""
    import random
    import time

    start = time.perf_counter()
    rng, vocab = random.Random(seed), model.cfg.vocab_size

    def request(length: int | None = None, max_tokens: int | None = None) -> _Throwaway:
        prompt = [rng.randrange(vocab) for _ in range(length or rng.choice((1, 2, 5, 9)))]
        return _Throwaway(prompt, max_tokens or rng.choice((1, 3, 8, 20)), 0.0, None, None, (), None, None)

    for length in (1, 5):  # a request alone from an empty batch (a fresh, contiguous cache), as a quiet server sees
        batch = DecodeBatch(model, [request(length, 4)], pad_id)
        while not batch.done:
            batch.step()
    batch = DecodeBatch(model, [request()], pad_id)
    for _ in range(steps):
        if len(batch.rows) < 6 and rng.random() < 0.4:
            batch.add([request() for _ in range(rng.choice((1, 2, 3)))])
        if not batch.done:
            batch.step()
    while not batch.done:
        batch.step()
    return time.perf_counter() - start


def _score_prompts(seqs: list[Sequence], idx: torch.Tensor, pad: torch.Tensor, logits: torch.Tensor) -> None:
    """Each prompt's mean token log-probability under the model, from a left-padded prefill's logits [B, T, V]
    (no extra forward; a judge's feature). Row by row, so the log-softmax never holds more than one prompt's
    [T, V]."""
    width = idx.size(1)
    for row, s in enumerate(seqs):
        p = int(pad[row])
        if width - p < 2:
            continue  # a one-token prompt predicts nothing
        logp = F.log_softmax(logits[row, p:width - 1].float(), dim=-1)  # [n - 1, V]: token t from t - 1
        s.prompt_logprob = float(logp.gather(1, idx[row, p + 1:, None]).mean())


def _choose(seqs: list[Sequence], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next token of each row (greedy or its own sampling settings and generator), its log-probability and the
    distribution's entropy, both under the model itself (temperature 1, no filtering)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [B, V]
    entropy = -(logp.exp() * logp).sum(dim=-1)  # [B]
    tokens = logits.argmax(dim=-1)  # [B]
    for row, s in enumerate(seqs):
        if s.temperature > 0:
            tokens[row] = sample_next_token(logits[row:row + 1], s.temperature, s.top_k, s.top_p, s.generator)[0]
    return tokens, logp.gather(1, tokens[:, None])[:, 0], entropy


# ---- the scheduler: many callers, one batch (asyncio; torch on one worker thread) ---------------------------


class ContinuousBatcher:
    """Feeds one DecodeBatch from concurrent callers on one event loop; the torch work runs on `worker`.

    `join(seqs)` queues a group of sequences (those that arrived together) and yields, at every step, one event
    per sequence of the group (None once that sequence has finished or was cancelled). A group joins the running
    batch whole, as soon as the batch has room for it (at most `max_batch_size` rows decode together; a group
    larger than that joins an empty batch), so the steps of a group stay aligned. With `continuous=False` a
    group joins only an empty batch (static batching: the baseline continuous batching is measured against).
    """

    def __init__(self, model: GPT, pad_id: int, worker: concurrent.futures.Executor, max_batch_size: int = 8,
                 continuous: bool = True) -> None:
        self.model, self.pad_id, self.worker = model, pad_id, worker
        self.max_batch_size, self.continuous = max_batch_size, continuous
        self.batch = DecodeBatch(model, (), pad_id)
        self._waiting: collections.deque[list[Sequence]] = collections.deque()  # groups not yet admitted
        self._queues: dict[int, asyncio.Queue] = {}  # id(sequence) -> its events (or an exception)
        self._task: asyncio.Task | None = None
        # Since start: sequences admitted, prefill and decode forwards, rows summed over decode forwards (mean
        # batch = rows / steps), the most rows decoding at once, sequences their callers abandoned.
        self.stats = {"requests": 0, "prefills": 0, "steps": 0, "rows": 0, "largest": 0, "cancelled": 0}

    async def join(self, seqs: list[Sequence]) -> AsyncIterator[list[dict | None]]:
        queues = [asyncio.Queue() for _ in seqs]
        for s, q in zip(seqs, queues):
            self._queues[id(s)] = q
        self._waiting.append(list(seqs))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        # A sequence has ended once its caller saw its last event (or cancelled it). Its finish_reason is no
        # guide here: the worker thread sets it during a step, before the step's events reach the queues.
        ended = [False] * len(seqs)
        try:
            while not all(ended):
                events: list[dict | None] = []
                for i, (s, q) in enumerate(zip(seqs, queues)):
                    ended[i] = ended[i] or s.cancelled
                    if ended[i]:
                        events.append(None)
                        continue
                    event = await q.get()
                    if isinstance(event, BaseException):
                        raise event
                    ended[i] = event["finish_reason"] is not None
                    events.append(event)
                yield events
        finally:
            for s, done in zip(seqs, ended):
                self._queues.pop(id(s), None)
                if not done:
                    self.cancel(s)

    def cancel(self, seq: Sequence) -> None:
        """The caller no longer wants `seq`: it leaves the batch at the next step (or is never admitted)."""
        if seq.finish_reason is None and not seq.cancelled:
            seq.cancelled = True
            self.stats["cancelled"] += 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        batch = self.batch
        try:
            while self._waiting or not batch.done:
                while self._waiting:  # admit whole groups in arrival order while they fit (any group fits none)
                    size = len(batch.rows) + len(batch.pending)
                    if size and size + len(self._waiting[0]) > self.max_batch_size:
                        break
                    if batch.rows and not self.continuous:
                        break  # static: only an empty batch takes new rows
                    group = [s for s in self._waiting.popleft() if not s.cancelled]
                    batch.add(group)
                    self.stats["requests"] += len(group)
                if batch.done:
                    continue
                live, joining = len(batch.rows), len(batch.pending)
                try:
                    events = await loop.run_in_executor(self.worker, batch.step)
                except Exception as err:  # noqa: BLE001 - the batch's callers get the error; later ones a new batch
                    for s in [*batch.rows, *batch.pending]:
                        self._deliver(s, err)
                    self.batch = batch = DecodeBatch(self.model, (), self.pad_id)
                    continue
                stats = self.stats
                stats["prefills"] += joining > 0
                stats["steps"] += live > 0
                stats["rows"] += live
                stats["largest"] = max(stats["largest"], live + joining)
                for s, event in events:
                    self._deliver(s, event)
        except BaseException as err:  # a bug or the replica stopping: nobody may wait forever
            for q in self._queues.values():
                q.put_nowait(err if isinstance(err, Exception) else RuntimeError("decoding stopped"))
            self._waiting.clear()
            self.batch = DecodeBatch(self.model, (), self.pad_id)
            raise

    def _deliver(self, seq: Sequence, item: dict | BaseException) -> None:
        queue = self._queues.get(id(seq))
        if queue is not None:
            queue.put_nowait(item)
