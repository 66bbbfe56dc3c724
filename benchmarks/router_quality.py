"""Router quality (the RouteLLM protocol): how much of the teacher's quality the cascade buys per teacher call.

    python benchmarks/router_quality.py                                # teacher vs student-KD, 200 pairs per domain
    python benchmarks/router_quality.py --student student-kd-int8      # any cheap model of the registry
    python benchmarks/router_quality.py --domain-route                 # cheap model = the classifier's specialist
    python benchmarks/router_quality.py --quick                        # a smoke run: 24 pairs per domain
    python benchmarks/router_quality.py --write-judge runs/judge.json  # also write the fitted learned judge

Requests are held-out pairs from every domain of the models' data (the card's 'data'): a validation window of
P + C tokens cut into a prompt (the first P) and its true continuation (the next C). Windows do not overlap and
are drawn with a seed; a domain with fewer windows than --pairs gives all it has.

A model's quality on a request is exp(-loss) of the true continuation under it (loss = mean NLL, nats per token;
`score_batch`, the LMServer's /score). The cheap model answers each prompt greedily (C tokens, stopping at eos;
`DecodeBatch`, the LMServer's decoding) and every judge scores that answer as the serving `Cascade.score` does:
self_logprob (the default), self_entropy, teacher (the teacher's log-prob of the answer) and learned (a gain judge,
`policies.fit_gain_judge`, cross-fitted: each of --folds seeded folds is scored by a judge fitted on the others).
A score below the threshold escalates to the teacher. Sweeping the threshold over every distinct score gives each
judge's curve of (teacher-call share, mean quality), compared with a seeded random router (mean over
--random-seeds orders) and the oracle (escalates the requests the teacher gains most on first, never one where the
cheap model is better; its quality stays flat from there on). --write-judge PATH also fits the learned judge on all
requests and writes it for a cascade's judge_model.

PGR(p) = (Q(p) - Q_student) / (Q_teacher - Q_student); APGR is the area under PGR over teacher-call share [0, 1]
(trapezoids over the curve's points, (0, student) and (1, teacher) included): ~0.5 for random, 1 for a router that
matches the teacher at no cost. Goals (issue): cascade APGR >= 0.8, and >= 95% of the teacher's quality
(Q >= 0.95 Q_teacher) at <= 30% teacher calls. Prints the tables and writes benchmarks/results/router_quality.json
(suffixed _domain_route, _STUDENT for another --student, _quick), per-request numbers and curves included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

GOAL_APGR = 0.8
GOAL_QUALITY = 0.95  # of the teacher's mean quality ...
GOAL_SHARE = 0.30  # ... at no more than this share of teacher calls
DEFAULT_STUDENT = "student-KD"

Curve = list[tuple[float, float]]  # (teacher-call share in [0, 1], mean quality), share ascending

# --------------------------------------------------------------------------------------------------------------
# Curves and their summaries (pure numpy; unit-tested in tests/unit/test_router_quality.py)


def cascade_curve(scores: Sequence[float], q_student: Sequence[float], q_teacher: Sequence[float]
                  ) -> tuple[Curve, list[float]]:
    """(share, quality) at every distinct threshold t (escalate iff score < t), and the thresholds.

    The first point (t = the lowest score) escalates nothing, the last (t = inf) everything; tied scores escalate
    together. A NaN score (an empty answer) escalates at every threshold, as `Cascade.should_escalate` does.
    """
    s = np.asarray(scores, dtype=float)
    gain = np.asarray(q_teacher, dtype=float) - np.asarray(q_student, dtype=float)
    n = len(s)
    assert n and len(gain) == n
    s = np.where(np.isnan(s), -np.inf, s)
    order = np.argsort(s, kind="stable")
    s, cum = s[order], np.concatenate([[0.0], np.cumsum(gain[order])])
    base = float(np.mean(q_student))
    distinct = np.unique(s)  # ascending
    k = np.searchsorted(s, distinct, side="left")  # requests strictly below each threshold
    ks, thresholds = [*k.tolist(), n], [*distinct.tolist(), math.inf]
    if ks[0] > 0:  # every score is NaN-escalated or -inf: there is no "escalate nothing" threshold
        ks, thresholds = [0, *ks], [-math.inf, *thresholds]
    return [(kk / n, base + float(cum[kk]) / n) for kk in ks], thresholds


def random_curve(q_student: Sequence[float], q_teacher: Sequence[float], seeds: int = 10, seed: int = 0) -> Curve:
    """A random router escalating the first k requests of a seeded random order, for k = 0..n, averaged over
    `seeds` orders (its expectation is the straight line from the student to the teacher)."""
    gain = np.asarray(q_teacher, dtype=float) - np.asarray(q_student, dtype=float)
    n = len(gain)
    rng = np.random.default_rng(seed)
    cum = np.mean([np.concatenate([[0.0], np.cumsum(gain[rng.permutation(n)])]) for _ in range(seeds)], axis=0)
    base = float(np.mean(q_student))
    return [(k / n, base + float(cum[k]) / n) for k in range(n + 1)]


def oracle_curve(q_student: Sequence[float], q_teacher: Sequence[float]) -> Curve:
    """The oracle escalates requests in order of gain q_teacher - q_student, largest first, and never one with
    no gain; with a budget beyond those it gains nothing more, so the curve ends flat at share 1."""
    gain = np.sort(np.asarray(q_teacher, dtype=float) - np.asarray(q_student, dtype=float))[::-1]
    n = len(gain)
    positive = int(np.sum(gain > 0))
    cum = np.concatenate([[0.0], np.cumsum(gain[:positive])])
    base = float(np.mean(q_student))
    points = [(k / n, base + float(cum[k]) / n) for k in range(positive + 1)]
    if positive < n:
        points.append((1.0, points[-1][1]))
    return points


def pgr(quality: float, q_student: float, q_teacher: float) -> float:
    """Performance gap recovered: 0 at the student's quality, 1 at the teacher's."""
    if not q_teacher > q_student:
        return math.nan  # no gap to recover
    return (quality - q_student) / (q_teacher - q_student)


def apgr(curve: Curve, q_student: float, q_teacher: float) -> float:
    """Area under PGR over teacher-call share [0, 1] (trapezoids between the curve's points)."""
    shares = np.array([p for p, _ in curve])
    assert shares[0] == 0.0 and shares[-1] == 1.0 and np.all(np.diff(shares) >= 0), "curve must span [0, 1]"
    gaps = np.array([pgr(q, q_student, q_teacher) for _, q in curve])
    return float(np.sum(np.diff(shares) * (gaps[1:] + gaps[:-1]) / 2))


def share_for_quality(curve: Curve, target: float) -> float | None:
    """The smallest teacher-call share at which the curve reaches mean quality `target` (None: never)."""
    return next((p for p, q in curve if q >= target - 1e-12), None)


def share_for_pgr(curve: Curve, fraction: float, q_student: float, q_teacher: float) -> float | None:
    """The smallest share recovering `fraction` of the student-to-teacher quality gap."""
    return share_for_quality(curve, q_student + fraction * (q_teacher - q_student))


def quality_within(curve: Curve, share: float) -> float:
    """The best mean quality the curve offers with at most `share` teacher calls."""
    return max(q for p, q in curve if p <= share + 1e-12)


# --------------------------------------------------------------------------------------------------------------
# Requests and measurements (torch, in this process)


def held_out_pairs(data_dir: Path, domain: str, prompt_tokens: int, continuation_tokens: int, pairs: int,
                   seed: int) -> np.ndarray:
    """[n, P + C] token windows of `domain`'s validation split: non-overlapping, a seeded choice of n ≤ pairs."""
    from app.data import load_tokens

    stream = load_tokens(data_dir, "val", domains=[domain])
    width = prompt_tokens + continuation_tokens
    available = len(stream) // width
    rng = np.random.default_rng([seed, sum(domain.encode())])
    ids = np.sort(rng.choice(available, size=min(pairs, available), replace=False))
    return stream[ids[:, None] * width + np.arange(width)].astype(np.int64)


def continuation_quality(model, windows: np.ndarray, prompt_tokens: int, pad_id: int, batch: int, bar) -> np.ndarray:
    """exp(mean log-prob) of each window's tokens after the first P, given those P (the LMServer's score)."""
    from serve_deployments.lm_server import score_batch

    out = []
    for start in range(0, len(windows), batch):
        rows = [(w.tolist(), prompt_tokens) for w in windows[start:start + batch]]
        out += [math.exp(r["mean_logprob"]) for r in score_batch(model, rows, pad_id)]
        bar.advance(len(rows))
    return np.array(out)


def student_answers(model, tokenizer, prompts: np.ndarray, max_tokens: int, batch: int, bar) -> list[dict]:
    """The cheap model's greedy answer to each prompt (at most max_tokens, stopping at eos, exactly as
    LMServer.generate decodes): the dicts every judge reads (mean_logprob, mean_entropy, prompt_logprob, token_ids)."""
    from serve_deployments.decoding import DecodeBatch, Sequence as Decoding

    out = []
    for start in range(0, len(prompts), batch):
        seqs = [Decoding(p.tolist(), max_tokens, 0.0, None, None, (), None, tokenizer)
                for p in prompts[start:start + batch]]
        decoding = DecodeBatch(model, seqs, tokenizer.pad_id)
        while not decoding.done:
            decoding.step()
        out += [s.result("student") for s in seqs]
        bar.advance(len(seqs))
    return out


def teacher_judge_logprobs(model, prompts: np.ndarray, answers: list[dict], pad_id: int, batch: int, bar
                           ) -> np.ndarray:
    """The `teacher` judge's input: the teacher's mean log-probability of each student answer given its prompt
    (the LMServer's score; NaN for an empty answer, which escalates)."""
    from serve_deployments.lm_server import score_batch

    out = np.full(len(answers), np.nan)
    rows = [i for i, a in enumerate(answers) if a["token_ids"]]
    bar.advance(len(answers) - len(rows))  # empty answers: nothing to score
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        items = [(prompts[i].tolist() + answers[i]["token_ids"], len(prompts[i])) for i in chunk]
        out[chunk] = [r["mean_logprob"] for r in score_batch(model, items, pad_id)]
        bar.advance(len(chunk))
    return out


def cross_fitted_gain_scores(answers: Sequence[dict], q_student: Sequence[float], q_teacher: Sequence[float],
                             folds: int = 5, seed: int = 0) -> np.ndarray:
    """The `learned` judge's score of every request, out of sample: requests are split into `folds` seeded folds,
    and each fold is scored by a gain judge (`policies.fit_gain_judge`) fitted on the other folds only."""
    from serve_deployments.policies import Cascade, fit_gain_judge

    n = len(answers)
    assert n >= 2 * folds, "need at least two requests per fold"
    fold = np.random.default_rng(seed).permutation(n) % folds
    qs, qt = np.asarray(q_student, dtype=float), np.asarray(q_teacher, dtype=float)
    scores = np.zeros(n)
    for k in range(folds):
        train = np.flatnonzero(fold != k)
        judge = fit_gain_judge([answers[i] for i in train], qs[train], qt[train])
        cascade = Cascade("student", "teacher", "learned", gain_judge=judge)
        for i in np.flatnonzero(fold == k):
            scores[i] = cascade.score(answers[i])
    return scores


def _load(name: str, registry: str):
    from app.registry import load_artifact

    artifact = load_artifact(name, registry)
    artifact.model.eval()
    return artifact


def result_name(args: argparse.Namespace) -> str:
    """router_quality[_domain_route | _STUDENT][_quick]: one results file per configuration."""
    import re

    name = "router_quality"
    if args.domain_route:
        name += "_domain_route"
    elif args.student != DEFAULT_STUDENT:
        name += "_" + re.sub(r"[^A-Za-z0-9.-]+", "_", args.student.strip("/")).strip("_")
    return name + ("_quick" if args.quick else "")


def _fmt_share(p: float | None) -> str:
    return "never" if p is None else f"{p:.1%}"


def _r(x: float) -> float:
    return float(f"{x:.6g}")


# --------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import torch

    from app.console import print_table, progress_bar
    from app.data import read_manifest
    from app.errors import DataError, UserError
    from app.registry import machine
    from serve_deployments.policies import Cascade, builtin_classifier, calibrate_threshold

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    teacher = _load(args.teacher, args.registry)
    if not (args.data or teacher.card.get("data")):
        raise DataError(f"{args.teacher}'s card names no data folder; pass --data DIR (the prepared data it was "
                        "trained on)")
    data_dir = Path(args.data or teacher.card["data"])
    manifest = read_manifest(data_dir)
    domains = manifest.domains

    # the cheap model of each request: one student, or the specialist of the domain the classifier predicts
    if args.domain_route:
        cheap_names = {d: f"{args.specialist_prefix}{d}" for d in domains}
        cheap_label = f"domain specialists ({', '.join(cheap_names.values())})"
    else:
        cheap_names = {"*": args.student}
        cheap_label = args.student
    cheap = {name: _load(name, args.registry) for name in dict.fromkeys(cheap_names.values())}
    width = args.prompt_tokens + args.continuation_tokens
    for name, art in [(args.teacher, teacher), *cheap.items()]:
        if art.tokenizer.sha256 != manifest.tokenizer_sha256:
            raise DataError(f"model {name} was trained with another tokenizer than {data_dir}'s; pass --data DIR, "
                            "the folder it was trained on")
        if width > art.model.cfg.seq_len:
            raise UserError(f"--prompt-tokens + --continuation-tokens = {width} exceeds {name}'s context of "
                            f"{art.model.cfg.seq_len} tokens; lower them")

    windows = {d: held_out_pairs(data_dir, d, args.prompt_tokens, args.continuation_tokens, args.pairs, args.seed)
               for d in domains}
    for d, w in windows.items():
        if len(w) < args.pairs:
            print(f"note: {d} has only {len(w)} non-overlapping validation windows of {width} tokens; using all")
    domain_of = np.array([d for d in domains for _ in range(len(windows[d]))])
    all_windows = np.concatenate([windows[d] for d in domains])
    n = len(all_windows)
    tok = teacher.tokenizer

    if args.domain_route:
        clf = builtin_classifier()
        predicted = np.array([clf.predict(tok.decode(w[:args.prompt_tokens].tolist())) for w in all_windows])
        route = np.array([cheap_names.get(p, cheap_names[domains[0]]) for p in predicted])  # unknown: the first
        print(f"builtin classifier: {np.mean(predicted == domain_of):.1%} of prompts labelled with their domain")
    else:
        route = np.full(n, args.student)

    if n < max(2 * args.folds, 13):
        raise UserError(f"{n} requests are too few to cross-fit the learned judge in {args.folds} folds; raise --pairs "
                        "or lower --folds")

    # ---- measure ------------------------------------------------------------------------------------------------
    q_teacher, q_student = np.zeros(n), np.zeros(n)
    answers: list[dict] = [{} for _ in range(n)]
    prompts = all_windows[:, :args.prompt_tokens]
    with progress_bar("teacher: continuation loss", n) as bar:
        q_teacher[:] = continuation_quality(teacher.model, all_windows, args.prompt_tokens, tok.pad_id, args.batch,
                                            bar)
    for name, art in cheap.items():
        rows = np.flatnonzero(route == name)
        if not len(rows):
            continue
        with progress_bar(f"{name}: continuation loss", len(rows)) as bar:
            q_student[rows] = continuation_quality(art.model, all_windows[rows], args.prompt_tokens, tok.pad_id,
                                                   args.batch, bar)
        with progress_bar(f"{name}: greedy answers", len(rows)) as bar:
            for i, a in zip(rows, student_answers(art.model, art.tokenizer, prompts[rows], args.continuation_tokens,
                                                  args.batch, bar)):
                answers[i] = a
    with progress_bar("teacher: judging the answers", n) as bar:
        teacher_lp = teacher_judge_logprobs(teacher.model, prompts, answers, tok.pad_id, args.batch, bar)
    measure_s = time.perf_counter() - t_start

    # ---- judges: each one's score per request (higher = keep the cheap answer), as the serving Cascade computes
    scores: dict[str, np.ndarray] = {
        judge: np.array([Cascade("s", "t", judge).score(a, lp) for a, lp in zip(answers, teacher_lp)])
        for judge in ("self_logprob", "self_entropy", "teacher")}
    learned_label = f"learned ({args.folds}-fold cross-fitted)"
    scores[learned_label] = cross_fitted_gain_scores(answers, q_student, q_teacher, args.folds, args.seed)
    serving = "self_logprob"  # the Cascade's default judge

    # ---- curves -------------------------------------------------------------------------------------------------
    def routers(sel: np.ndarray) -> dict[str, Curve]:
        out = {f"cascade, {judge}": cascade_curve(s[sel], q_student[sel], q_teacher[sel])[0]
               for judge, s in scores.items()}
        out[f"random ({args.random_seeds} seeds)"] = random_curve(q_student[sel], q_teacher[sel], args.random_seeds,
                                                                   args.seed)
        out["oracle"] = oracle_curve(q_student[sel], q_teacher[sel])
        return out

    everything = np.ones(n, dtype=bool)
    curves = routers(everything)
    _, thresholds = cascade_curve(scores[serving], q_student, q_teacher)
    Qs, Qt = float(q_student.mean()), float(q_teacher.mean())
    summary = {}
    for label, curve in curves.items():
        summary[label] = {
            "apgr": apgr(curve, Qs, Qt),
            "share_pgr50": share_for_pgr(curve, 0.5, Qs, Qt), "share_pgr95": share_for_pgr(curve, 0.95, Qs, Qt),
            "share_q95_teacher": share_for_quality(curve, GOAL_QUALITY * Qt),
            "quality_at_30pct": quality_within(curve, GOAL_SHARE),
        }
    header = ["router", "APGR", "share → PGR 50%", "share → PGR 95%", "share → 95% Q_t", "Q at ≤30% / Q_t"]
    print_table(f"router quality: {cheap_label} → {args.teacher}, {n} requests "
                f"({', '.join(f'{len(windows[d])} {d}' for d in domains)}), prompt {args.prompt_tokens} + "
                f"continuation {args.continuation_tokens} tokens", header,
                [[label, f"{s['apgr']:.3f}", _fmt_share(s["share_pgr50"]), _fmt_share(s["share_pgr95"]),
                  _fmt_share(s["share_q95_teacher"]), f"{s['quality_at_30pct'] / Qt:.1%}"]
                 for label, s in summary.items()])

    per_domain = {}
    threshold_30 = calibrate_threshold(scores[serving].tolist(), GOAL_SHARE)
    for d in domains:
        sel = domain_of == d
        qs, qt = float(q_student[sel].mean()), float(q_teacher[sel].mean())
        dc = routers(sel)
        per_domain[d] = {
            "pairs": int(sel.sum()), "q_student": qs, "q_teacher": qt,
            "teacher_better": float(np.mean(q_teacher[sel] > q_student[sel])),
            "mean_score": float(np.mean(scores[serving][sel])),
            "escalated_at_30pct_threshold": float(np.mean(scores[serving][sel] < threshold_30)),
            "apgr": {label: apgr(c, qs, qt) for label, c in dc.items()},
            "share_q95_teacher": {label: share_for_quality(c, GOAL_QUALITY * qt) for label, c in dc.items()},
            "quality_at_30pct": {label: quality_within(c, GOAL_SHARE) for label, c in dc.items()},
        }
    judged = [f"cascade, {j}" for j in scores]
    print_table("per domain (quality = exp(-loss) of the true continuation, mean over requests; APGR per router)",
                ["domain", "pairs", "Q_student", "Q_teacher", "Q_s/Q_t", "teacher better",
                 *[j.removeprefix("cascade, ").split(" (")[0] for j in judged], "oracle"],
                [[d, r["pairs"], f"{r['q_student']:.5f}", f"{r['q_teacher']:.5f}",
                  f"{r['q_student'] / r['q_teacher']:.1%}", f"{r['teacher_better']:.1%}",
                  *[f"{r['apgr'][j]:.3f}" for j in judged], f"{r['apgr']['oracle']:.3f}"]
                 for d, r in per_domain.items()] +
                [["all", n, f"{Qs:.5f}", f"{Qt:.5f}", f"{Qs / Qt:.1%}", f"{np.mean(q_teacher > q_student):.1%}",
                  *[f"{summary[j]['apgr']:.3f}" for j in judged], f"{summary['oracle']['apgr']:.3f}"]])

    labels = list(curves)
    short = [lb.removeprefix("cascade, ").split(" (")[0] for lb in labels]
    print_table(f"per domain: teacher-call share for {GOAL_QUALITY:.0%} of the teacher's quality on that domain "
                f"(quality at <= {GOAL_SHARE:.0%} calls / Q_t)", ["domain", *short],
                [[d, *[f"{_fmt_share(r['share_q95_teacher'][lb])} ({r['quality_at_30pct'][lb] / r['q_teacher']:.1%})"
                       for lb in labels]] for d, r in per_domain.items()])
    if Qs >= GOAL_QUALITY * Qt:
        print(f"note: the cheap model(s) already have {Qs / Qt:.1%} of the teacher's quality with no teacher call; "
              "PGR divides by Q_t - Q_s, so APGR is not meaningful here (it can leave [0, 1])")

    from scipy.stats import spearmanr

    # Spearman rank correlations that explain the curves: a useful judge ranks the gain negatively
    gain = q_teacher - q_student
    rho = {j: float(spearmanr(s, gain, nan_policy="omit").statistic) for j, s in scores.items()}
    rho_q = float(spearmanr(scores[serving], q_student).statistic)
    rho_log = float(spearmanr(scores[serving], np.log(q_teacher) - np.log(q_student)).statistic)
    rho_gain_q = float(spearmanr(q_student, gain).statistic)
    top = np.sort(gain)[::-1]
    print("Spearman, judge score vs gain q_t - q_s (useful judge: negative): "
          + ", ".join(f"{j.split(' (')[0]} {r:+.3f}" for j, r in rho.items()))
    print(f"{serving}: vs loss gap L_s - L_t {rho_log:+.3f}, vs the cheap model's quality {rho_q:+.3f}; the cheap "
          f"model's quality vs gain {rho_gain_q:+.3f}; the largest 5% of gains are "
          f"{top[:max(1, n // 20)].sum() / top[top > 0].sum():.0%} of all positive gain")
    print(f"{serving} threshold for 30% teacher calls on these requests: {threshold_30:.4f} "
          "(policies.calibrate_threshold)")
    goals = {}
    degenerate = Qs >= GOAL_QUALITY * Qt  # APGR then measures noise in a tiny Q_t - Q_s: no verdict on it
    for j in judged:
        casc = summary[j]
        share = casc["share_q95_teacher"]
        goals[j] = {f"APGR >= {GOAL_APGR}": None if degenerate else casc["apgr"] >= GOAL_APGR,
                    f">= {GOAL_QUALITY:.0%} of the teacher's quality at <= {GOAL_SHARE:.0%} teacher calls":
                        share is not None and share <= GOAL_SHARE}
        for goal, ok in goals[j].items():
            print(f"  {'n/a ' if ok is None else 'met ' if ok else 'MISS'}  {j}: {goal}")

    written = None
    if args.write_judge:
        from serve_deployments.policies import fit_gain_judge

        judge = fit_gain_judge(answers, q_student, q_teacher)
        learned_all = np.array([Cascade("s", "t", "learned", gain_judge=judge).score(a) for a in answers])
        written = Path(args.write_judge)
        written.parent.mkdir(parents=True, exist_ok=True)
        written.write_text(json.dumps({
            "judge": judge.to_dict(), "student": cheap_label, "teacher": args.teacher, "data": str(data_dir),
            "threshold_for_30pct": calibrate_threshold(learned_all.tolist(), GOAL_SHARE),
            "cross_fitted_apgr": summary[f"cascade, {learned_label}"]["apgr"], "date": time.strftime("%Y-%m-%d"),
        }, indent=1))
        weights = ", ".join(f"{f} {w:+.3g}" for f, w in zip(judge.features, judge.weights))
        print(f"learned judge fitted on all {n} requests (gain per standard deviation: {weights}) "
              f"written to {written}; use it as a cascade's judge_model")

    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{result_name(args)}.json"
    body = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "args": vars(args), "data": str(data_dir),
        "teacher": {"name": args.teacher, "parameters": teacher.card.get("parameters")},
        "cheap": {name: {"parameters": a.card.get("parameters"), "quantization": a.card.get("quantization")}
                  for name, a in cheap.items()},
        "pairs": {d: len(w) for d, w in windows.items()}, "q_student": Qs, "q_teacher": Qt,
        "routers": summary, "per_domain": per_domain, "goals": goals,
        "spearman": {"score_vs_gain": rho, "serving_score_vs_loss_gap": rho_log,
                     "serving_score_vs_student_quality": rho_q, "student_quality_vs_gain": rho_gain_q},
        "threshold_for_30pct": threshold_30, "measure_s": round(measure_s, 1),
        "written_judge": str(written) if written else None,
        "curves": {label: [[_r(p), _r(q)] for p, q in c] for label, c in curves.items()},
        "cascade_thresholds": [_r(t) if math.isfinite(t) else str(t) for t in thresholds],
        "requests": {"domain": domain_of.tolist(), "cheap_model": route.tolist(),
                     "q_student": [_r(x) for x in q_student], "q_teacher": [_r(x) for x in q_teacher],
                     "judge_scores": {j: [_r(x) for x in s] for j, s in scores.items()},
                     "prompt_logprob": [a.get("prompt_logprob") for a in answers]},
    }
    path.write_text(json.dumps(body, indent=1))
    print(f"measured in {measure_s:.0f} s; wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", default="runs/bench-compress/registry", help="where the model names live")
    ap.add_argument("--teacher", default="teacher", help="registry name or artifact folder")
    ap.add_argument("--student", default=DEFAULT_STUDENT, help="the cheap model: registry name or artifact folder")
    ap.add_argument("--domain-route", action="store_true",
                    help="cheap model = PREFIX<domain> for the domain the builtin classifier predicts")
    ap.add_argument("--specialist-prefix", default="specialist-", help="with --domain-route")
    ap.add_argument("--data", help="prepared data folder (default: the teacher card's 'data')")
    ap.add_argument("--pairs", type=int, default=200, help="requests per domain (fewer if the split is short)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--continuation-tokens", type=int, default=32)
    ap.add_argument("--random-seeds", type=int, default=10, help="random-router orders averaged")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32, help="requests per forward")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--folds", type=int, default=5, help="cross-fitting folds of the learned judge")
    ap.add_argument("--write-judge", metavar="PATH", help="also fit the learned judge on all requests and write it "
                    "(JSON) for a cascade's judge_model")
    ap.add_argument("--quick", action="store_true", help="smoke run: 24 pairs per domain")
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs = min(args.pairs, 24)
    for field in ("pairs", "prompt_tokens", "continuation_tokens", "random_seeds", "batch", "threads"):
        if getattr(args, field) < 1:
            ap.error(f"--{field.replace('_', '-')} must be >= 1")
    if args.folds < 2:
        ap.error("--folds must be >= 2 (each fold is judged by a fit on the others)")

    from app.errors import UserError

    try:
        return run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
