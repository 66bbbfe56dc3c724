"""Routing policies: which deployed model answers a request, and why — pure classes, no Ray.

A policy is a small tree. Leaves name a model; inner nodes choose a child:

    domain   classify the prompt (code vs docs, extensible) and follow that domain's route
    cascade  the cheap model answers; a judge scores the answer; below a threshold the teacher answers instead
    split    A/B by weights, sticky per user (hash of the user/session id)
    canary   a percentage to a new model, rolled back when its error rate or quality falls below the baseline's
    bandit   Thompson sampling over models with Beta posteriors fed by /v1/feedback rewards in [0, 1]
    shadow   a copy of some requests goes to another model, compared and logged, never returned

`build_policy(spec, models)` turns a typed spec (a dict, e.g. from YAML or `POST /v1/admin/policy`) into the tree:

    {"kind": "domain", "routes": {"code": {"kind": "cascade", "student": "code-int8", "teacher": "teacher"},
                                  "docs": "docs-student"},
     "default": "teacher"}

`decide(request, rng)` walks the tree and returns a `Decision`: the model to call first, the reasons on the way
(the route a response reports), the cascade step to run after the answer, the shadow model, and the arms that
feedback on this response should credit. The router does the calling; everything here is plain Python.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Collection, Iterable, Literal, Sequence, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.errors import ConfigError

# --------------------------------------------------------------------------------------------------------------
# Requests and decisions


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at: the prompt text, the caller's user/session id, and the request id."""

    prompt: str
    user: str | None = None
    request_id: str = ""


@dataclass
class Decision:
    """The outcome of a policy walk; `route` joins the reasons, e.g. "domain:code>cascade"."""

    model: str
    reasons: list[str] = field(default_factory=list)
    cascade: "Cascade | None" = None
    shadow: str | None = None
    credit: list[tuple["Policy", str]] = field(default_factory=list)  # (policy, arm) pairs fed by feedback

    @property
    def route(self) -> str:
        return ">".join(self.reasons)


def unit_hash(*parts: str) -> float:
    """A stable number in [0, 1) from strings (sha256): the same user lands in the same bucket on every replica."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _bucket(salt: str, req: RouteRequest, rng: random.Random) -> float:
    """Sticky per user when the request names one, otherwise a fresh draw."""
    return unit_hash(salt, req.user) if req.user else rng.random()


# --------------------------------------------------------------------------------------------------------------
# Domain classifier: multinomial naive Bayes over word and symbol features


_FEATURE = re.compile(r"[A-Za-z_]+|\d+|\n[ \t]+|\S")
MAX_FEATURES_PER_TEXT = 4000  # long documents would otherwise dominate the class counts


def text_features(text: str) -> list[str]:
    """Lower-cased words, digit runs, single symbols and indentation (a newline followed by spaces) of a text."""
    out = []
    for tok in _FEATURE.findall(text)[:MAX_FEATURES_PER_TEXT]:
        out.append("<indent>" if tok.startswith("\n") else tok.lower())
    return out


@dataclass
class DomainClassifier:
    """Multinomial naive Bayes: P(domain | text) ∝ P(domain) · Π P(feature | domain), Laplace-smoothed.

    Fitted from labelled texts in a second or so; `predict` costs one dictionary lookup per feature, so it is
    cheap enough to run on every request. Extend it to more domains by fitting on more labels.
    """

    log_prior: dict[str, float]
    log_likelihood: dict[str, dict[str, float]]
    log_unseen: dict[str, float]  # log P(feature | domain) of a feature never seen in that domain

    @classmethod
    def fit(cls, texts: Iterable[str], labels: Iterable[str], alpha: float = 1.0) -> DomainClassifier:
        counts: dict[str, dict[str, int]] = {}
        docs: dict[str, int] = {}
        for text, label in zip(texts, labels, strict=True):
            docs[label] = docs.get(label, 0) + 1
            bag = counts.setdefault(label, {})
            for f in text_features(text):
                bag[f] = bag.get(f, 0) + 1
        if len(docs) < 2:
            raise ConfigError(f"domain classifier needs texts of at least two domains (got {sorted(docs)})")
        vocab = {f for bag in counts.values() for f in bag}
        total_docs = sum(docs.values())
        log_prior = {d: math.log(n / total_docs) for d, n in docs.items()}
        log_likelihood, log_unseen = {}, {}
        for d, bag in counts.items():
            denom = math.log(sum(bag.values()) + alpha * (len(vocab) + 1))
            log_likelihood[d] = {f: math.log(c + alpha) - denom for f, c in bag.items()}
            log_unseen[d] = math.log(alpha) - denom
        return cls(log_prior, log_likelihood, log_unseen)

    @property
    def domains(self) -> list[str]:
        return sorted(self.log_prior)

    def probabilities(self, text: str) -> dict[str, float]:
        """P(domain | text) for every domain (softmax of the log joint)."""
        feats = text_features(text)
        joint = {
            d: self.log_prior[d] + sum(self.log_likelihood[d].get(f, self.log_unseen[d]) for f in feats)
            for d in self.log_prior
        }
        top = max(joint.values())
        z = sum(math.exp(v - top) for v in joint.values())
        return {d: math.exp(v - top) / z for d, v in joint.items()}

    def predict(self, text: str) -> str:
        probs = self.probabilities(text)
        return max(sorted(probs), key=probs.__getitem__)


def _snippets(text: str, size: int = 600) -> list[str]:
    """A document cut into prompt-sized pieces, so the classifier learns from text as long as a prompt."""
    return [text[i : i + size] for i in range(0, len(text), size) if text[i : i + size].strip()]


@lru_cache(maxsize=1)
def builtin_classifier(max_docs: int = 150) -> DomainClassifier:
    """code vs docs, fitted at first use from the standard library's source and `pydoc_data.topics`.

    Both corpora exist on every machine with Python, so the default needs no files and no network. Every
    second document is used (the others stay out, so tests can measure held-out accuracy on them).
    """
    from app.data import iter_documents

    texts, labels = [], []
    for source, domain in (("stdlib", "code"), ("pydoc", "docs")):
        for i, doc in enumerate(iter_documents(source, max_documents=2 * max_docs)):
            if i % 2 == 0:
                pieces = _snippets(doc.text)[:8]
                texts += pieces
                labels += [domain] * len(pieces)
    return DomainClassifier.fit(texts, labels)


def classifier_from_prepared(directory: str | Path, max_docs_per_domain: int = 200) -> DomainClassifier:
    """Fit on the documents of a prepared data set (its shards decoded with its tokenizer), labelled by domain."""
    import pyarrow.parquet as pq

    from app.data import read_manifest
    from app.tokenizer import Tokenizer

    manifest = read_manifest(directory)
    tok = Tokenizer.load(manifest.directory)
    texts, labels, seen = [], [], {}
    for shard in manifest.raw["splits"]["train"]["shards"]:
        table = pq.read_table(manifest.directory / shard["file"], columns=["domain", "tokens"]).to_pylist()
        for row in table:
            if seen.get(row["domain"], 0) >= max_docs_per_domain:
                continue
            seen[row["domain"]] = seen.get(row["domain"], 0) + 1
            pieces = _snippets(tok.decode(row["tokens"][:2000]))[:8]
            texts += pieces
            labels += [row["domain"]] * len(pieces)
    return DomainClassifier.fit(texts, labels)


# --------------------------------------------------------------------------------------------------------------
# Policies


class Policy:
    """A node of the routing tree."""

    def decide(self, req: RouteRequest, rng: random.Random) -> Decision:
        raise NotImplementedError

    def reward(self, arm: str, reward: float) -> None:
        """Feedback in [0, 1] on a response this policy chose `arm` for (default: ignored)."""

    def outcome(self, arm: str, ok: bool, quality: float | None) -> None:
        """Whether the call to `arm` succeeded and, if judged, its quality (default: ignored)."""

    def children(self) -> list[Policy]:
        return []

    def state(self) -> dict[str, Any]:
        """What this node has learnt or decided so far (for GET /v1/admin/policy and /v1/stats)."""
        return {}


@dataclass
class Fixed(Policy):
    """A leaf: always this model."""

    model: str

    def decide(self, req: RouteRequest, rng: random.Random) -> Decision:
        return Decision(self.model, [f"model:{self.model}"])


@dataclass
class DomainRoute(Policy):
    """Classify the prompt and follow that domain's route; domains without a route follow `default`."""

    classifier: DomainClassifier
    routes: dict[str, Policy]
    default: Policy
    counts: dict[str, int] = field(default_factory=dict)

    def decide(self, req: RouteRequest, rng: random.Random) -> Decision:
        domain = self.classifier.predict(req.prompt)
        self.counts[domain] = self.counts.get(domain, 0) + 1
        d = self.routes.get(domain, self.default).decide(req, rng)
        d.reasons.insert(0, f"domain:{domain}")
        return d

    def children(self) -> list[Policy]:
        return [*self.routes.values(), self.default]

    def state(self) -> dict[str, Any]:
        return {"domain_counts": dict(self.counts)}


JudgeName = Literal["self_logprob", "self_entropy", "teacher", "learned"]
JUDGES: tuple[str, ...] = get_args(JudgeName)
GainFeature = Literal["mean_logprob", "mean_entropy", "prompt_logprob"]  # of the student's answer (LMServer.generate)
GAIN_FEATURES: tuple[str, ...] = get_args(GainFeature)


@dataclass(frozen=True)
class GainJudge:
    """The `learned` judge: how much better the teacher's answer would be than the student's, predicted from the
    student's answer alone — a linear function of its standardised `features` (keys of the answer dict, all free
    with the student's one generate call), fitted by `fit_gain_judge` on sample traffic where both models' quality
    is known. A missing or non-finite feature counts as its fitted mean."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    n: int = 0  # requests it was fitted on

    def predict(self, answer: dict) -> float:
        """The predicted quality gain of asking the teacher instead (in the fit's quality units)."""
        gain = self.bias
        for name, mean, scale, weight in zip(self.features, self.mean, self.scale, self.weights):
            value = answer.get(name)
            if value is not None and math.isfinite(value):
                gain += weight * (float(value) - mean) / scale
        return gain

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                "weights": list(self.weights), "bias": self.bias, "n": self.n}


def fit_gain_judge(answers: Sequence[dict], q_student: Sequence[float], q_teacher: Sequence[float],
                   features: Sequence[str] = GAIN_FEATURES, ridge: float = 1.0) -> GainJudge:
    """Ridge regression of the teacher's gain q_teacher − q_student on the student answers' standardised features
    (the intercept is not penalised). `answers` are the student's LMServer.generate results for sample requests;
    q_student and q_teacher are the two models' quality on the same requests (any scale, higher is better: e.g.
    exp(−loss) of a reference continuation, or feedback rewards)."""
    import numpy as np

    n = len(answers)
    if not n == len(q_student) == len(q_teacher):
        raise ConfigError(f"fit_gain_judge: {n} answers but {len(q_student)} student and {len(q_teacher)} teacher "
                          "qualities; give one of each per request")
    unknown = [f for f in features if f not in GAIN_FEATURES]
    if unknown or not features:
        raise ConfigError(f"fit_gain_judge: features {unknown or '[]'} unknown; choose from {list(GAIN_FEATURES)}")
    if n < 10:
        raise ConfigError(f"fit_gain_judge: {n} judged requests are too few to fit on; give at least 10")
    x = np.array([[a.get(f) if a.get(f) is not None else np.nan for f in features] for a in answers], dtype=float)
    x[~np.isfinite(x)] = np.nan
    mean = np.nanmean(np.where(np.isnan(x).all(axis=0), 0.0, x), axis=0)  # a feature no answer has: 0
    x = np.where(np.isnan(x), mean, x)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    design = np.column_stack([np.ones(n), (x - mean) / scale])
    penalty = ridge * np.diag([0.0] + [1.0] * len(features))
    gain = np.asarray(q_teacher, dtype=float) - np.asarray(q_student, dtype=float)
    coef = np.linalg.solve(design.T @ design + penalty, design.T @ gain)
    return GainJudge(tuple(features), tuple(mean.tolist()), tuple(scale.tolist()), tuple(coef[1:].tolist()),
                     float(coef[0]), n)


@dataclass
class Cascade(Policy):
    """The student answers first; a judge scores the answer; a score below `threshold` escalates to the teacher.

    Judges (higher = better answer): ``self_logprob`` the student's mean token log-probability of its own answer;
    ``self_entropy`` minus its mean next-token entropy (nats); ``teacher`` the teacher's mean log-probability of the
    student's answer (one `score()` call, cheaper than the teacher generating); ``learned`` minus the teacher's gain
    that `gain_judge` predicts from the answer (fitted on sample traffic by `fit_gain_judge`). Recent scores are
    kept so the threshold can be calibrated to a target escalation rate from live traffic.
    """

    student: str
    teacher: str
    judge: str = "self_logprob"
    threshold: float = -3.0
    gain_judge: GainJudge | None = None
    recent: deque = field(default_factory=lambda: deque(maxlen=2000))
    calls: int = 0
    escalations: int = 0

    def __post_init__(self) -> None:
        if self.judge not in JUDGES:
            raise ConfigError(f"cascade judge '{self.judge}' is unknown; choose one of {', '.join(JUDGES)}")
        if (self.judge == "learned") != (self.gain_judge is not None):
            raise ConfigError("the cascade's 'learned' judge needs a gain_judge (fit_gain_judge), and only it uses one")

    def decide(self, req: RouteRequest, rng: random.Random) -> Decision:
        return Decision(self.student, ["cascade"], cascade=self)

    def score(self, student_answer: dict, teacher_logprob: float | None = None) -> float:
        """The judge's score of a student answer (the dict LMServer.generate returns)."""
        if self.gain_judge is not None:
            return -self.gain_judge.predict(student_answer)
        if self.judge == "teacher":
            assert teacher_logprob is not None, "the teacher judge needs the teacher's score of the answer"
            return teacher_logprob
        if self.judge == "self_entropy":
            return -float(student_answer["mean_entropy"])
        return float(student_answer["mean_logprob"])

    def should_escalate(self, score: float) -> bool:
        """Record the score (for calibration) and say whether the teacher should answer instead."""
        self.recent.append(score)
        self.calls += 1
        escalate = not score >= self.threshold  # NaN (an empty answer) escalates too
        self.escalations += escalate
        return escalate

    def calibrate(self, target_rate: float, scores: Sequence[float] | None = None) -> float:
        """Set the threshold so that `target_rate` of `scores` (default: recent traffic) would escalate."""
        self.threshold = calibrate_threshold(list(self.recent) if scores is None else scores, target_rate)
        return self.threshold

    def state(self) -> dict[str, Any]:
        rate = self.escalations / self.calls if self.calls else 0.0
        return {"student": self.student, "teacher": self.teacher, "judge": self.judge,
                "threshold": self.threshold, "calls": self.calls, "escalation_rate": round(rate, 4)}


def calibrate_threshold(scores: Sequence[float], target_rate: float) -> float:
    """The threshold t with round(target_rate · n) of the n scores strictly below it (escalate iff score < t)."""
    if not 0.0 <= target_rate <= 1.0:
        raise ConfigError(f"target_escalation_rate={target_rate} must be in [0, 1]")
    finite = sorted(s for s in scores if math.isfinite(s))
    if not finite:
        raise ConfigError("no judge scores to calibrate on; send some traffic through the cascade first")
    k = round(target_rate * len(finite))
    if k >= len(finite):
        return math.inf
    if k == 0:
        return finite[0]
    # midway between the k-th and (k+1)-th smallest, so new scores near the boundary split evenly
    return (finite[k - 1] + finite[k]) / 2 if finite[k - 1] < finite[k] else finite[k]


@dataclass
class Split(Policy):
    """A/B split by weights; a user id always lands on the same arm (sha256 of salt + user)."""

    arms: dict[str, Policy]
    weights: dict[str, float]
    salt: str = "split"

    def decide(self, req: RouteRequest, rng: random.Random) -> Decision:
        u = _bucket(self.salt, req, rng) * sum(self.weights.values())
        for name in self.arms:
            u -= self.weights[name]
            if u < 0:
                break
        d = self.arms[name].decide(req, rng)
        d.reasons.insert(0, f"split:{name}")
        return d

    def children(self) -> list[Policy]:
        return list(self.arms.values())


@dataclass
class ArmStats:
    calls: int = 0
    errors: int = 0
    quality_sum: float = 0.0
    quality_n: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    @property
    def quality(self) -> float | None:
        return self.quality_sum / self.quality_n if self.quality_n else None


@dataclass
class Canary(Policy):
    """`percent` % of traffic (sticky per user) goes to `canary`, the rest to `baseline`.

    Once both arms have `min_samples` outcomes, the canary is rolled back (all traffic to the baseline, for good,
    until the policy is replaced) when its error rate exceeds the baseline's by more than `max_error_gap`, or when
    both have quality figures (judge scores or feedback rewards) and the canary's mean is below the baseline's by
    more than `max_quality_gap`. Quality is either feedback rewards (`quality="feedback"`, the default) or the
    geometric-mean token probability exp(mean_logprob) of each answer under its own model (`"self_logprob"`).
    """

    baseline: str
    canary: str
    percent: float
    min_samples: int = 50
    max_error_gap: float = 0.02
    max_quality_gap: float = 0.05
    salt: str = "canary"
    quality: str = "feedback"
    stats: dict[str, ArmStats] = field(default_factory=dict)
    rolled_back: str | None = None  # why, once rolled back

    def __post_init__(self) -> None:
        self.stats = {self.baseline: ArmStats(), self.canary: ArmStats()}

    def decide(self, req: RouteRequest, rng: random.Random) -> Decision:
        if self.rolled_back is None and _bucket(self.salt, req, rng) * 100 < self.percent:
            return Decision(self.canary, ["canary"], credit=[(self, self.canary)])
        reason = "canary:rolled-back" if self.rolled_back else "canary:baseline"
        return Decision(self.baseline, [reason], credit=[(self, self.baseline)])

    def outcome(self, arm: str, ok: bool, quality: float | None) -> None:
        s = self.stats[arm]
        s.calls += 1
        s.errors += not ok
        if self.quality == "self_logprob" and quality is not None and math.isfinite(quality):
            s.quality_sum += quality
            s.quality_n += 1
        self._check()

    def reward(self, arm: str, reward: float) -> None:
        if self.quality != "feedback":
            return
        s = self.stats[arm]
        s.quality_sum += reward
        s.quality_n += 1
        self._check()

    def _check(self) -> None:
        base, can = self.stats[self.baseline], self.stats[self.canary]
        if self.rolled_back or min(base.calls, can.calls) < self.min_samples:
            return
        if can.error_rate > base.error_rate + self.max_error_gap:
            self.rolled_back = f"error rate {can.error_rate:.3f} vs baseline {base.error_rate:.3f}"
        elif (can.quality is not None and base.quality is not None and min(can.quality_n, base.quality_n) >=
              self.min_samples and can.quality < base.quality - self.max_quality_gap):
            self.rolled_back = f"quality {can.quality:.3f} vs baseline {base.quality:.3f}"

    def state(self) -> dict[str, Any]:
        return {"percent": self.percent, "rolled_back": self.rolled_back,
                "arms": {m: {"calls": s.calls, "error_rate": round(s.error_rate, 4),
                             "quality": None if s.quality is None else round(s.quality, 4)}
                         for m, s in self.stats.items()}}


@dataclass
class Bandit(Policy):
    """Thompson sampling: each model's reward rate has a Beta(1 + Σr, 1 + Σ(1 − r)) posterior; pick the best draw.

    Rewards are fractions in [0, 1] (a thumbs-up is 1), added to the posterior as fractional successes.
    """

    models: list[str]
    alpha: dict[str, float] = field(default_factory=dict)
    beta: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for m in self.models:
            self.alpha.setdefault(m, 1.0)
            self.beta.setdefault(m, 1.0)

    def decide(self, req: RouteRequest, rng: random.Random) -> Decision:
        draws = {m: rng.betavariate(self.alpha[m], self.beta[m]) for m in self.models}
        model = max(self.models, key=draws.__getitem__)
        return Decision(model, ["bandit"], credit=[(self, model)])

    def reward(self, arm: str, reward: float) -> None:
        self.alpha[arm] += reward
        self.beta[arm] += 1.0 - reward

    def state(self) -> dict[str, Any]:
        return {"posterior_mean": {m: round(self.alpha[m] / (self.alpha[m] + self.beta[m]), 4) for m in self.models},
                "feedback": {m: round(self.alpha[m] + self.beta[m] - 2, 3) for m in self.models}}


@dataclass
class Shadow(Policy):
    """Route by `route`; a `fraction` of requests is also sent to `shadow`, compared and logged, never returned."""

    route: Policy
    shadow: str
    fraction: float = 1.0

    def decide(self, req: RouteRequest, rng: random.Random) -> Decision:
        d = self.route.decide(req, rng)
        if rng.random() < self.fraction:
            d.shadow = self.shadow
        return d

    def children(self) -> list[Policy]:
        return [self.route]


def walk(policy: Policy) -> Iterable[Policy]:
    """Every node of a tree, depth first."""
    yield policy
    for child in policy.children():
        yield from walk(child)


def describe(policy: Policy) -> dict[str, Any]:
    """Name and learnt state of every node, for the admin and stats endpoints."""
    return {f"{i}:{type(p).__name__.lower()}": p.state() for i, p in enumerate(walk(policy)) if p.state()}


def text_agreement(a: str, b: str) -> float:
    """How alike two answers are: 1 − normalised edit distance over whitespace-separated words (1 = equal)."""
    import difflib

    wa, wb = a.split(), b.split()
    if not wa and not wb:
        return 1.0
    return difflib.SequenceMatcher(a=wa, b=wb, autojunk=False).ratio()


# --------------------------------------------------------------------------------------------------------------
# Specs: the typed, serialisable form of a policy tree


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DomainSpec(_Spec):
    kind: Literal["domain"]
    routes: dict[str, "Node"] = Field(description="Domain label → route for prompts of that domain.")
    default: "Node" = Field(description="Route for a domain with no entry in routes.")
    classifier: str = Field("builtin", description="'builtin' (stdlib vs pydoc) or a prepared data folder to fit on.")


class CascadeSpec(_Spec):
    kind: Literal["cascade"]
    student: str = Field(description="Model that answers first.")
    teacher: str = Field(description="Model that answers when the judge's score is below threshold.")
    judge: JudgeName = "self_logprob"
    threshold: float = Field(-3.0, description="Escalate when the judge's score is below this (log-prob units; "
                             "for 'learned', minus the predicted gain; default: the judge file's "
                             "threshold_for_30pct).")
    judge_model: "GainJudgeSpec | str | None" = Field(
        None, description="The 'learned' judge's fit: the JSON `benchmarks/router_quality.py --write-judge` writes "
        "(inline, or the path of its file).")

    @model_validator(mode="after")
    def _judge_model_goes_with_learned(self) -> "CascadeSpec":
        if self.judge == "learned" and self.judge_model is None:
            raise ValueError("judge 'learned' needs judge_model: the JSON (or its path) that "
                             "`benchmarks/router_quality.py --write-judge PATH` writes")
        if self.judge != "learned" and self.judge_model is not None:
            raise ValueError(f"judge_model is only used by judge 'learned' (judge is '{self.judge}'); drop it")
        return self


class GainJudgeSpec(_Spec):
    features: list[GainFeature] = Field(min_length=1)
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    n: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _aligned(self) -> "GainJudgeSpec":
        k = len(self.features)
        if not len(self.mean) == len(self.scale) == len(self.weights) == k:
            raise ValueError(f"mean, scale and weights need one value per feature ({k}); got "
                             f"{len(self.mean)}, {len(self.scale)}, {len(self.weights)}")
        if not all(s > 0 for s in self.scale):
            raise ValueError(f"scale values must be > 0 (got {self.scale})")
        return self

    def judge(self) -> GainJudge:
        return GainJudge(tuple(self.features), tuple(self.mean), tuple(self.scale), tuple(self.weights),
                         self.bias, self.n)


class SplitSpec(_Spec):
    kind: Literal["split"]
    weights: dict[str, float] = Field(min_length=1, description="Model (or arm) → relative weight, each > 0.")
    routes: dict[str, "Node"] = Field({}, description="Optional arm → route; an arm without one is a model name.")
    salt: str = "split"


class CanarySpec(_Spec):
    kind: Literal["canary"]
    baseline: str
    canary: str
    percent: float = Field(ge=0, le=100, description="Share of traffic (%) sent to the canary.")
    min_samples: int = Field(50, ge=1, description="Outcomes per arm before a rollback can trigger.")
    max_error_gap: float = Field(0.02, ge=0)
    max_quality_gap: float = Field(0.05, ge=0, description="Largest tolerated quality shortfall (quality in [0, 1]).")
    quality: Literal["feedback", "self_logprob"] = Field("feedback", description="Where quality figures come from.")
    salt: str = "canary"


class BanditSpec(_Spec):
    kind: Literal["bandit"]
    models: list[str] = Field(min_length=1)


class ShadowSpec(_Spec):
    kind: Literal["shadow"]
    route: "Node"
    shadow: str = Field(description="Model that receives a copy; its answer is only compared and logged.")
    fraction: float = Field(1.0, ge=0, le=1, description="Share of requests copied to the shadow.")


Node = Union[
    str,
    Annotated[Union[DomainSpec, CascadeSpec, SplitSpec, CanarySpec, BanditSpec, ShadowSpec], Field(discriminator="kind")],
]
for _cls in (DomainSpec, CascadeSpec, SplitSpec, ShadowSpec):
    _cls.model_rebuild()


class PolicySpec(BaseModel):
    """The root of a policy tree (validated wrapper, so errors name the path from `policy`)."""

    policy: Node


_PYDANTIC_BRANCH = re.compile(r"(tagged-union|function-\w+)\[")


def parse_spec(raw: Any) -> Node:
    """Validate a raw policy tree; a mistake raises ConfigError naming its path, e.g. `policy.routes.code.kind`."""
    try:
        return PolicySpec(policy=raw).policy
    except ValidationError as err:
        # A node is a model name or a typed dict: report the dict branch's error, not "not a string"
        errors = err.errors()
        first = next((e for e in errors if "str" not in e["loc"]), errors[0])
        path = ".".join(str(p) for p in first["loc"]
                        if not str(p).endswith("Spec") and str(p) != "str" and not _PYDANTIC_BRANCH.match(str(p)))
        raise ConfigError(f"router {path}: {first['msg'].removeprefix('Value error, ')} (got {first.get('input')!r})"
                          ) from None


def _gain_judge(spec: "GainJudgeSpec | str | None", path: str) -> tuple[GainJudge | None, float | None]:
    """The learned judge of a cascade spec — inline, or read from the JSON file a path names — and the file's
    `threshold_for_30pct`, if it has one."""
    import json

    if spec is None or isinstance(spec, GainJudgeSpec):
        return (spec.judge() if spec else None), None
    try:
        raw = json.loads(Path(spec).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"router {path}: cannot read a gain judge from '{spec}' ({err}); give the JSON file "
                          "`benchmarks/router_quality.py --write-judge` wrote") from None
    try:
        judge = GainJudgeSpec.model_validate(raw.get("judge", raw) if isinstance(raw, dict) else raw).judge()
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"router {path} ({spec}): {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    threshold = raw.get("threshold_for_30pct") if isinstance(raw, dict) and "judge" in raw else None
    return judge, (float(threshold) if isinstance(threshold, (int, float)) and math.isfinite(threshold) else None)


def build_policy(raw: Any, models: Collection[str], classifiers: dict[str, DomainClassifier] | None = None) -> Policy:
    """The policy tree for a raw spec, checking that every model it names is deployed."""
    classifiers = dict(classifiers or {})

    def model(name: str, path: str) -> str:
        if name not in models:
            raise ConfigError(f"router {path}: unknown model '{name}'; deployed models: {', '.join(sorted(models))}")
        return name

    def build(node: Node, path: str) -> Policy:
        if isinstance(node, str):
            return Fixed(model(node, path))
        if isinstance(node, DomainSpec):
            if node.classifier not in classifiers:
                classifiers[node.classifier] = (
                    builtin_classifier() if node.classifier == "builtin" else classifier_from_prepared(node.classifier)
                )
            clf = classifiers[node.classifier]
            unknown = sorted(set(node.routes) - set(clf.domains))
            if unknown:
                raise ConfigError(f"router {path}.routes: domain(s) {unknown} unknown to the classifier; "
                                  f"it knows {clf.domains}")
            routes = {d: build(r, f"{path}.routes.{d}") for d, r in node.routes.items()}
            return DomainRoute(clf, routes, build(node.default, f"{path}.default"))
        if isinstance(node, CascadeSpec):
            gain_judge, file_threshold = _gain_judge(node.judge_model, f"{path}.judge_model")
            # a judge file's own threshold (30 % escalation on the traffic it was fitted on) unless one is given
            explicit = "threshold" in node.model_fields_set or file_threshold is None
            return Cascade(model(node.student, f"{path}.student"), model(node.teacher, f"{path}.teacher"),
                           node.judge, node.threshold if explicit else file_threshold, gain_judge)
        if isinstance(node, SplitSpec):
            bad = {a: w for a, w in node.weights.items() if not w > 0}
            if bad:
                raise ConfigError(f"router {path}.weights: weights must be > 0 (got {bad})")
            arms = {a: build(node.routes.get(a, a), f"{path}.routes.{a}" if a in node.routes else f"{path}.weights")
                    for a in node.weights}
            return Split(arms, dict(node.weights), node.salt)
        if isinstance(node, CanarySpec):
            if node.baseline == node.canary:
                raise ConfigError(f"router {path}: baseline and canary are both '{node.canary}'; name two models")
            return Canary(model(node.baseline, f"{path}.baseline"), model(node.canary, f"{path}.canary"),
                          node.percent, node.min_samples, node.max_error_gap, node.max_quality_gap, node.salt,
                          node.quality)
        if isinstance(node, BanditSpec):
            return Bandit([model(m, f"{path}.models") for m in node.models])
        if isinstance(node, ShadowSpec):
            return Shadow(build(node.route, f"{path}.route"), model(node.shadow, f"{path}.shadow"), node.fraction)
        raise AssertionError(node)

    return build(parse_spec(raw), "policy")
