"""The router-quality benchmark's curve math (benchmarks/router_quality.py) on hand-computable cases; no models."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "router_quality.py"
_spec = importlib.util.spec_from_file_location("router_quality", _PATH)
rq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rq)

# four requests: the student scores 0.2 everywhere; the teacher gains 0.4, 0.2, 0, -0.2
Q_S = [0.2, 0.2, 0.2, 0.2]
Q_T = [0.6, 0.4, 0.2, 0.0]  # mean 0.3: the gap to recover is 0.1


def test_oracle_escalates_largest_gain_first_and_never_a_loss():
    curve = rq.oracle_curve(Q_S, Q_T)
    assert curve == pytest.approx([(0, 0.2), (0.25, 0.3), (0.5, 0.35), (1.0, 0.35)])
    # PGR 0, 1, 1.5, then flat at 1.5: area 0.25·0.5 + 0.25·1.25 + 0.5·1.5
    assert rq.apgr(curve, 0.2, 0.3) == pytest.approx(0.125 + 0.3125 + 0.75)


def test_cascade_follows_the_score_order_and_tied_scores_escalate_together():
    # a perfect judge (lowest score = largest gain)
    curve, thresholds = rq.cascade_curve([-3.0, -2.0, -1.0, 0.0], Q_S, Q_T)
    assert curve == pytest.approx([(0, 0.2), (0.25, 0.3), (0.5, 0.35), (0.75, 0.35), (1.0, 0.3)])
    assert thresholds == [-3.0, -2.0, -1.0, 0.0, math.inf]
    # the worst judge escalates the losing request first
    worst, _ = rq.cascade_curve([0.0, -1.0, -2.0, -3.0], Q_S, Q_T)
    assert [q for _, q in worst] == pytest.approx([0.2, 0.15, 0.15, 0.2, 0.3])
    # ties: one threshold moves both tied requests
    tied, thresholds = rq.cascade_curve([-1.0, -1.0, 0.0, 0.0], Q_S, Q_T)
    assert tied == pytest.approx([(0, 0.2), (0.5, 0.35), (1.0, 0.3)])
    assert thresholds == [-1.0, 0.0, math.inf]


def test_nan_score_escalates_at_every_threshold():
    curve, thresholds = rq.cascade_curve([math.nan, -1.0, 0.0, 1.0], Q_S, Q_T)
    assert curve[0] == (0.0, pytest.approx(0.2)) and thresholds[0] == -math.inf
    assert curve[1] == (0.25, pytest.approx(0.3))  # the NaN request goes to the teacher first
    assert len(curve) == 5 and curve[-1] == (1.0, pytest.approx(0.3))


def test_random_router_is_the_straight_line_on_average():
    q_s = [0.0] * 50 + [0.0] * 50
    q_t = [1.0] * 50 + [0.0] * 50
    curve = rq.random_curve(q_s, q_t, seeds=400, seed=1)
    assert curve[0] == (0.0, 0.0) and curve[-1] == (1.0, pytest.approx(0.5))
    assert curve[50][1] == pytest.approx(0.25, abs=0.01)
    assert rq.apgr(curve, 0.0, 0.5) == pytest.approx(0.5, abs=0.01)
    # the same seed gives the same curve
    assert rq.random_curve(q_s, q_t, seeds=3, seed=7) == rq.random_curve(q_s, q_t, seeds=3, seed=7)


def test_apgr_of_straight_and_step_curves():
    assert rq.apgr([(0.0, 1.0), (1.0, 3.0)], 1.0, 3.0) == pytest.approx(0.5)
    assert rq.apgr([(0.0, 1.0), (0.5, 3.0), (1.0, 3.0)], 1.0, 3.0) == pytest.approx(0.75)
    assert math.isnan(rq.pgr(2.0, 3.0, 3.0))  # no gap to recover
    with pytest.raises(AssertionError):
        rq.apgr([(0.0, 1.0), (0.5, 3.0)], 1.0, 3.0)


def test_shares_for_quality_and_pgr():
    curve = [(0.0, 0.2), (0.25, 0.3), (0.5, 0.35), (0.75, 0.35), (1.0, 0.3)]
    assert rq.share_for_quality(curve, 0.95 * 0.3) == 0.25
    assert rq.share_for_pgr(curve, 0.5, 0.2, 0.3) == 0.25
    assert rq.share_for_pgr(curve, 0.95, 0.2, 0.3) == 0.25
    assert rq.share_for_quality(curve, 0.1) == 0.0  # the student alone is already there
    assert rq.share_for_quality(curve, 0.4) is None
    assert rq.quality_within(curve, 0.3) == pytest.approx(0.3)
    assert rq.quality_within(curve, 1.0) == pytest.approx(0.35)


def test_learned_judge_is_cross_fitted_out_of_sample_and_ranks_the_gain():
    rng = np.random.default_rng(0)
    n = 200
    answers = [{"mean_logprob": float(a), "mean_entropy": float(b), "prompt_logprob": float(c)}
               for a, b, c in rng.normal(size=(n, 3))]
    q_s = np.full(n, 0.2)
    q_t = 0.3 + 0.1 * np.array([a["prompt_logprob"] for a in answers]) + rng.normal(0, 0.02, n)
    scores = rq.cross_fitted_gain_scores(answers, q_s, q_t, folds=5, seed=0)
    curve, _ = rq.cascade_curve(scores, q_s, q_t)
    assert rq.apgr(curve, q_s.mean(), q_t.mean()) > 0.9 * rq.apgr(rq.oracle_curve(q_s, q_t), q_s.mean(), q_t.mean())
    # out of sample: a request's own label never reaches the judge that scores it
    fold = np.random.default_rng(0).permutation(n) % 5
    q_t2 = q_t.copy()
    q_t2[0] += 10.0
    moved = rq.cross_fitted_gain_scores(answers, q_s, q_t2, folds=5, seed=0) != scores
    assert not moved[0] and not moved[fold == fold[0]].any() and moved[fold != fold[0]].all()
