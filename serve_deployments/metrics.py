"""What the router measures: request counts per route and model, latency, tokens, cache, escalations, shadow
disagreement, and the drift of incoming prompts against the training data.

Every figure goes to `ray.util.metrics` (Prometheus, via the Ray dashboard's metrics port) when running inside
Ray, and is also kept in-process so `GET /v1/stats` can return it as JSON (per router replica).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
LENGTH_BINS = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, math.inf]  # prompt characters


def js_distance(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen–Shannon distance (square root of the divergence, base 2) between two histograms: 0 same, 1 disjoint."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def length_histogram(lengths: Sequence[int]) -> list[int]:
    counts = np.histogram(np.asarray(lengths, dtype=np.float64), bins=np.array(LENGTH_BINS[:-1] + [1e18]))[0]
    return counts.tolist()


def manifest_domain_mix(directory: str | Path, split: str = "train") -> dict[str, float]:
    """Share of documents per domain in a prepared data set: the mix the models were trained on."""
    from app.data import read_manifest

    m = read_manifest(directory)
    docs = {d: m.documents(split, d) for d in m.domains}
    total = sum(docs.values()) or 1
    return {d: n / total for d, n in docs.items()}


@dataclass
class DriftMonitor:
    """Drift of recent prompts (a sliding window) from a reference: JS distance of the domain mix and of the
    prompt-length histogram; `score` is the larger of the two.

    The domain reference is the training manifest's document mix (or None: the first `baseline_window` prompts).
    Prompt lengths have no counterpart in the manifest (training windows have a fixed length), so their reference
    is `reference_lengths` when given, else the first `baseline_window` prompts seen.
    """

    reference_mix: dict[str, float] | None = None
    reference_lengths: list[int] | None = None
    window: int = 1000
    baseline_window: int = 200
    _domains: deque = field(default_factory=deque)
    _lengths: deque = field(default_factory=deque)
    _baseline_domains: list[str] = field(default_factory=list)
    _baseline_lengths: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._domains, self._lengths = deque(maxlen=self.window), deque(maxlen=self.window)

    def observe(self, domain: str, prompt_chars: int) -> None:
        if len(self._baseline_lengths) < self.baseline_window:
            self._baseline_domains.append(domain)
            self._baseline_lengths.append(prompt_chars)
        self._domains.append(domain)
        self._lengths.append(prompt_chars)

    def report(self) -> dict[str, Any]:
        if not self._domains:
            return {"score": 0.0, "domain_js": 0.0, "length_js": 0.0, "window": 0, "domain_mix": {}}
        recent = Counter(self._domains)
        ref_mix = self.reference_mix or {d: c / len(self._baseline_domains)
                                         for d, c in Counter(self._baseline_domains).items()}
        names = sorted(set(recent) | set(ref_mix))
        domain_js = js_distance([recent.get(d, 0) for d in names], [ref_mix.get(d, 0.0) for d in names])
        ref_len = self.reference_lengths or self._baseline_lengths
        length_js = js_distance(length_histogram(list(self._lengths)), length_histogram(ref_len))
        return {"score": round(max(domain_js, length_js), 4), "domain_js": round(domain_js, 4),
                "length_js": round(length_js, 4), "window": len(self._domains),
                "domain_mix": {d: round(recent.get(d, 0) / len(self._domains), 4) for d in names},
                "reference_mix": {d: round(ref_mix.get(d, 0.0), 4) for d in names},
                "domain_reference": "manifest" if self.reference_mix else f"first {len(self._baseline_domains)} prompts",
                "length_reference": "given" if self.reference_lengths else f"first {len(self._baseline_lengths)} prompts"}


def route_label(route: str) -> str:
    """A route without its per-request values (the cascade judge's score, `judge=-2.177`): a response reports the
    whole route, metrics count by this, so a metric's tag values stay few."""
    return ">".join(part for part in route.split(">") if not part.startswith("judge="))


@dataclass
class RouterMetrics:
    """Counters and latency windows of one router replica, mirrored to ray.util.metrics when `export` is set."""

    export: bool = False
    requests: Counter = field(default_factory=Counter)  # (route, model, cache) -> n
    errors: Counter = field(default_factory=Counter)  # HTTP status -> n
    tokens: Counter = field(default_factory=Counter)  # model -> completion tokens
    escalations: int = 0
    shadow_calls: int = 0
    shadow_agreement_sum: float = 0.0
    shadow_exact: int = 0
    latencies: dict[str, deque] = field(default_factory=dict)  # model -> recent seconds
    _ray: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.export:
            from ray.util import metrics as m

            self._ray = {
                "requests": m.Counter("scalestack_router_requests", "Requests answered, by route, model and cache.",
                                      tag_keys=("route", "model", "cache")),
                "errors": m.Counter("scalestack_router_errors", "Requests refused or failed, by HTTP status.",
                                    tag_keys=("status",)),
                "latency": m.Histogram("scalestack_router_latency_s", "End-to-end latency in the router (s).",
                                       boundaries=LATENCY_BUCKETS_S, tag_keys=("model",)),
                "tokens": m.Counter("scalestack_router_tokens", "Completion tokens generated.", tag_keys=("model",)),
                "escalations": m.Counter("scalestack_router_escalations", "Cascade escalations to the teacher."),
                "shadow_disagreement": m.Histogram("scalestack_router_shadow_disagreement",
                                                   "1 - word agreement of shadow and primary answers.",
                                                   boundaries=[0.01, 0.1, 0.25, 0.5, 0.75, 0.99]),
                "drift": m.Gauge("scalestack_router_prompt_drift", "Drift score of recent prompts (JS distance)."),
            }

    def record(self, route: str, model: str, cache: str, escalated: bool, latency_s: float, tokens: int) -> None:
        route = route_label(route)
        self.requests[(route, model, cache)] += 1
        self.tokens[model] += tokens
        self.escalations += escalated
        self.latencies.setdefault(model, deque(maxlen=5000)).append(latency_s)
        if self._ray:
            self._ray["requests"].inc(tags={"route": route, "model": model, "cache": cache})
            self._ray["latency"].observe(latency_s, tags={"model": model})
            if tokens:
                self._ray["tokens"].inc(tokens, tags={"model": model})
            if escalated:
                self._ray["escalations"].inc()

    def error(self, status: int) -> None:
        self.errors[status] += 1
        if self._ray:
            self._ray["errors"].inc(tags={"status": str(status)})

    def shadow(self, agreement: float, exact: bool) -> None:
        self.shadow_calls += 1
        self.shadow_agreement_sum += agreement
        self.shadow_exact += exact
        if self._ray:
            self._ray["shadow_disagreement"].observe(1.0 - agreement)

    def drift(self, score: float) -> None:
        if self._ray:
            self._ray["drift"].set(score)

    def report(self) -> dict[str, Any]:
        by_model: Counter = Counter()
        by_route: Counter = Counter()
        cache: Counter = Counter()
        for (route, model, c), n in self.requests.items():
            by_model[model] += n
            by_route[route] += n
            cache[c] += n
        latency = {m: {"p50_ms": round(float(np.percentile(v, 50)) * 1e3, 2),
                       "p99_ms": round(float(np.percentile(v, 99)) * 1e3, 2), "n": len(v)}
                   for m, v in self.latencies.items() if v}
        total = sum(by_model.values())
        return {"requests": total, "by_model": dict(by_model), "by_route": dict(by_route), "cache": dict(cache),
                "errors": {str(k): v for k, v in self.errors.items()}, "tokens": dict(self.tokens),
                "escalations": self.escalations, "latency": latency,
                "shadow": {"calls": self.shadow_calls, "exact_agreement": self.shadow_exact,
                           "mean_agreement": round(self.shadow_agreement_sum / self.shadow_calls, 4)
                           if self.shadow_calls else None}}
