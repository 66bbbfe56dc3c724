"""Exact and semantic caches without Ray: keys, determinism, LRU, TTL, similarity thresholds, wrong-hit counts."""

from __future__ import annotations

import numpy as np
import pytest

from serve_deployments.cache import (
    ExactCache,
    HashingEmbedder,
    SemanticCache,
    exact_key,
    is_deterministic,
    normalise_prompt,
    params_key,
)

GREEDY = {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": None, "stop": [], "seed": None}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_keys_normalise_the_prompt_but_keep_what_changes_the_answer():
    assert normalise_prompt("  def f():\r\n    pass \n") == "def f():\n    pass"
    assert normalise_prompt("e\u0301") == "\u00e9"  # NFC
    k = exact_key("def f():\n    pass", "auto#1", GREEDY)
    assert exact_key("  def f():\r\n    pass\n\n", "auto#1", GREEDY) == k
    assert exact_key("def f():\n  pass", "auto#1", GREEDY) != k  # indentation is meaning in code
    assert exact_key("def f():\n    pass", "teacher", GREEDY) != k
    assert exact_key("def f():\n    pass", "auto#1", {**GREEDY, "max_tokens": 17}) != k
    assert exact_key("def f():\n    pass", "auto#1", {**GREEDY, "stop": ["\n"]}) != k
    # greedy decoding ignores top_p and seed, so they do not split the cache
    assert exact_key("def f():\n    pass", "auto#1", {**GREEDY, "top_p": 0.5, "seed": 3}) == k
    assert params_key("r", {**GREEDY, "temperature": 0.7, "seed": 1}) != params_key("r", {**GREEDY, "temperature": 0.7, "seed": 2})


def test_only_deterministic_requests_are_cacheable():
    assert is_deterministic(GREEDY)
    assert is_deterministic({**GREEDY, "temperature": 0.8, "seed": 5})
    assert not is_deterministic({**GREEDY, "temperature": 0.8})


def test_exact_cache_lru_and_ttl():
    clock = Clock()
    c = ExactCache(max_entries=2, ttl_s=10, clock=clock)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now the most recent
    c.put("c", 3)  # evicts b, the least recently used
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3
    clock.now = 10.5
    assert c.get("a") is None  # older than ttl_s
    s = c.stats.as_dict()
    assert (s["hits"], s["misses"], s["evictions"], s["expired"], s["stores"]) == (3, 2, 1, 1, 3)
    assert s["hit_rate"] == 0.6


def _vec(*xs: float) -> list[float]:
    return list(xs)


def test_semantic_cache_threshold_and_parameter_isolation():
    c = SemanticCache(threshold=0.9, max_entries=10, ttl_s=100, clock=Clock())
    c.put(_vec(1, 0, 0), "k", "prompt one", "answer one")
    c.put(_vec(0, 1, 0), "k", "prompt two", "answer two")
    near = _vec(1, 0.3, 0)  # cosine 0.958 to the first entry
    hit = c.get(near, "k")
    assert hit and hit.value == "answer one" and hit.similarity == pytest.approx(1 / np.sqrt(1.09), rel=1e-5)
    assert c.get(_vec(1, 0.6, 0), "k") is None  # cosine 0.857 < 0.9
    assert c.get(near, "other params") is None  # never across parameters or models
    strict = SemanticCache(threshold=0.99)
    strict.put(_vec(1, 0, 0), "k", "p", "v")
    assert strict.get(near, "k") is None
    assert c.stats.hits == 1 and c.stats.misses == 2
    c.record_check(same_answer=True)
    c.record_check(same_answer=False)
    assert c.stats.as_dict()["wrong_hit_rate"] == 0.5


def test_semantic_cache_evicts_oldest_and_expires():
    clock = Clock()
    c = SemanticCache(threshold=0.99, max_entries=2, ttl_s=5, clock=clock)
    c.put(_vec(1, 0), "k", "a", "A")
    clock.now = 1
    c.put(_vec(0, 1), "k", "b", "B")
    c.put(_vec(1, 1), "k", "c", "C")  # evicts a
    assert len(c) == 2 and c.get(_vec(1, 0), "k") is None
    clock.now = 5.5  # b (stored at 1) is still fresh; nothing stored at 0 survives
    assert c.get(_vec(0, 1), "k").value == "B"
    clock.now = 7
    assert c.get(_vec(0, 1), "k") is None and c.stats.expired == 2


def test_hashing_embedder_thresholds_separate_paraphrase_from_other_prompts():
    embed = HashingEmbedder()
    base = embed("Write a Python function that reverses a list.")
    typo = embed("write a python function that reverses a list")
    other = embed("Explain the difference between a tuple and a list in the docs.")
    cos = lambda a, b: float(np.dot(a, b))  # noqa: E731 - unit vectors
    assert cos(base, base) == pytest.approx(1.0, abs=1e-6)
    assert cos(base, typo) > 0.95
    assert cos(base, other) < 0.7
    c = SemanticCache(threshold=0.95)
    c.put(base, "k", "p", "reversed")
    assert c.get(typo, "k").value == "reversed"
    assert c.get(other, "k") is None
