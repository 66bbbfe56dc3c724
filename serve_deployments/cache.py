"""Response caches: exact (normalised prompt + generation parameters, LRU + TTL) and semantic (embedding cosine).

Only deterministic requests are cached — temperature 0 (greedy) or a fixed seed — because only then is a stored
answer the answer the model would give again. Both caches key on the model route as well, so a cached docs
answer never answers an explicit request for the teacher.

Hits, misses and wrong hits are counted. A semantic hit is *wrong* when the model, asked the new prompt, would
answer differently: the router re-asks the model for a sampled share of semantic hits (`verify_fraction`) in the
background and calls `record_check`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import unicodedata
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

Clock = Callable[[], float]

# Generation parameters that change the answer; anything else in a request (stream, user) does not.
ANSWER_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed")


def normalise_prompt(prompt: str) -> str:
    """Unicode NFC, \\r\\n → \\n, and no leading/trailing whitespace. Inner whitespace is kept: in code it matters."""
    return unicodedata.normalize("NFC", prompt.replace("\r\n", "\n")).strip()


def is_deterministic(params: dict[str, Any]) -> bool:
    """Greedy decoding or a fixed seed: the same request gets the same answer."""
    return params.get("temperature", 1.0) == 0 or params.get("seed") is not None


def params_key(route: str, params: dict[str, Any]) -> str:
    """The part of a key that is not the prompt: the model route and the answer-changing parameters."""
    picked = {k: params.get(k) for k in ANSWER_PARAMS}
    if picked["temperature"] == 0:  # greedy ignores top_p, top_k and seed
        picked.update(top_p=None, top_k=None, seed=None)
    return json.dumps([route, picked], sort_keys=True, default=str)


def exact_key(prompt: str, route: str, params: dict[str, Any]) -> str:
    body = normalise_prompt(prompt) + "\x00" + params_key(route, params)
    return hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    expired: int = 0
    checks: int = 0  # semantic hits re-asked to the model
    wrong_hits: int = 0  # ... whose fresh answer differed

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("hits", "misses", "stores", "evictions", "expired", "checks",
                                             "wrong_hits")}
        out["hit_rate"] = round(self.hit_rate, 4)
        out["wrong_hit_rate"] = round(self.wrong_hits / self.checks, 4) if self.checks else None
        return out


@dataclass
class ExactCache:
    """LRU of at most `max_entries` answers, each valid for `ttl_s` seconds after it was stored."""

    max_entries: int = 10_000
    ttl_s: float = 3600.0
    clock: Clock = time.monotonic
    stats: CacheStats = field(default_factory=CacheStats)
    _entries: OrderedDict = field(default_factory=OrderedDict)

    def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is not None and self.clock() - entry[0] > self.ttl_s:
            del self._entries[key]
            self.stats.expired += 1
            entry = None
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[1]

    def put(self, key: str, value: Any) -> None:
        self._entries[key] = (self.clock(), value)
        self._entries.move_to_end(key)
        self.stats.stores += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class SemanticHit:
    value: Any
    similarity: float
    prompt: str  # the cached prompt that matched


@dataclass
class SemanticCache:
    """Nearest stored prompt by cosine similarity of embeddings; a hit needs similarity ≥ `threshold`.

    Entries with other parameters (model route, max_tokens, …) never match. Lookup is one matrix-vector product
    over at most `max_entries` unit vectors, oldest evicted first.
    """

    threshold: float = 0.95
    max_entries: int = 2_000
    ttl_s: float = 3600.0
    clock: Clock = time.monotonic
    stats: CacheStats = field(default_factory=CacheStats)
    _keys: list[str] = field(default_factory=list)
    _prompts: list[str] = field(default_factory=list)
    _values: list[Any] = field(default_factory=list)
    _times: list[float] = field(default_factory=list)
    _vectors: list[np.ndarray] = field(default_factory=list)

    def get(self, vector: Sequence[float], key: str) -> SemanticHit | None:
        self._expire()
        q = _unit(vector)
        best, best_sim = None, -math.inf
        if self._vectors:
            sims = np.stack(self._vectors) @ q  # [entries]
            for i in np.argsort(-sims):
                if self._keys[i] == key:
                    best, best_sim = int(i), float(sims[i])
                    break
        if best is None or not best_sim >= self.threshold:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return SemanticHit(self._values[best], best_sim, self._prompts[best])

    def put(self, vector: Sequence[float], key: str, prompt: str, value: Any) -> None:
        self._keys.append(key)
        self._prompts.append(prompt)
        self._values.append(value)
        self._times.append(self.clock())
        self._vectors.append(_unit(vector))
        self.stats.stores += 1
        while len(self._keys) > self.max_entries:
            self._drop(0)
            self.stats.evictions += 1

    def record_check(self, same_answer: bool) -> None:
        """The outcome of re-asking the model for a semantic hit: a different answer is a wrong hit."""
        self.stats.checks += 1
        self.stats.wrong_hits += not same_answer

    def _expire(self) -> None:
        now = self.clock()
        while self._times and now - self._times[0] > self.ttl_s:
            self._drop(0)
            self.stats.expired += 1

    def _drop(self, i: int) -> None:
        for column in (self._keys, self._prompts, self._values, self._times, self._vectors):
            del column[i]

    def clear(self) -> None:
        while self._keys:
            self._drop(0)

    def __len__(self) -> int:
        return len(self._keys)


def _unit(vector: Sequence[float]) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 and math.isfinite(n) else np.zeros_like(v)


class HashingEmbedder:
    """Character n-gram counts hashed into `dim` buckets (crc32), L2-normalised: a model-free embedder.

    Captures surface similarity only (typos, reordered whitespace), never meaning; useful when no model's `embed`
    should be spent on the cache, and in tests.
    """

    def __init__(self, dim: int = 512, n: int = 3) -> None:
        self.dim, self.n = dim, n

    def __call__(self, text: str) -> list[float]:
        v = np.zeros(self.dim, dtype=np.float32)
        t = normalise_prompt(text).lower()
        for i in range(max(1, len(t) - self.n + 1)):
            v[zlib.crc32(t[i : i + self.n].encode("utf-8", "surrogatepass")) % self.dim] += 1.0
        return _unit(v).tolist()
