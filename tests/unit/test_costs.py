"""Unit tests for app/costs.py: Young–Daly, the goodput model, the price file and the planner. No Ray."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from app import costs
from app.scaling import ScalingFit

BESIROGLU = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}


def make_fit(bootstrap: bool = True) -> ScalingFit:
    """A ScalingFit with the published Chinchilla refit and a synthetic bootstrap cloud (no fitting needed)."""
    boot = None
    if bootstrap:
        rng = np.random.default_rng(0)
        centre = np.array([BESIROGLU[k] for k in ("E", "A", "B", "alpha", "beta")])
        boot = centre * (1 + rng.normal(0.0, 0.01, size=(200, 5)))
    return ScalingFit(form="chinchilla", params=dict(BESIROGLU), ci={}, n_points=240, bootstrap_params=boot)


# ---- Young–Daly and goodput -----------------------------------------------------------------------------------


def test_young_daly_interval_known_value():
    # a 60 s save and a failure every 2 h: sqrt(2 × 60 × 7200) = sqrt(864000) ≈ 929.5 s
    assert costs.young_daly_interval(60.0, 7200.0) == pytest.approx(929.516, rel=1e-5)
    assert costs.young_daly_interval(60.0, math.inf) == math.inf
    with pytest.raises(ValueError, match="save_seconds > 0"):
        costs.young_daly_interval(0.0, 3600.0)


def test_goodput_known_value():
    # tau=1000 s, S=50 s, R=100 s, 0.36 failures/h = 1e-4/s: 1000/1050 × (1 − 1e-4 × (100 + 500))
    assert costs.expected_goodput(1000.0, 50.0, 100.0, 0.36) == pytest.approx(1000 / 1050 * 0.94, rel=1e-12)
    assert costs.expected_goodput(math.inf, 50.0, 100.0, 0.0) == 1.0
    assert costs.expected_goodput(1000.0, 0.0, 100.0, 0.0) == 1.0


def test_goodput_is_a_fraction_that_falls_with_the_preemption_rate():
    save, restart = 60.0, 300.0
    previous = 1.0
    for rate in (0.01, 0.05, 0.1, 0.2, 0.5, 1.0):
        interval = costs.young_daly_interval(save, 3600.0 / rate)
        goodput = costs.expected_goodput(interval, save, restart, rate)
        assert 0.0 < goodput <= 1.0
        assert goodput < previous
        previous = goodput
    assert costs.expected_goodput(1800.0, save, restart, 100.0) == 0.0  # failures eat all time: clamped


def test_young_daly_interval_nearly_maximises_modelled_goodput():
    save, restart, rate = 30.0, 120.0, 0.1  # MTBF 10 h
    taus = np.geomspace(60, 36000, 4000)
    goodputs = [costs.expected_goodput(t, save, restart, rate) for t in taus]
    best = taus[int(np.argmax(goodputs))]
    assert best == pytest.approx(costs.young_daly_interval(save, 36000.0), rel=0.05)


# ---- prices ---------------------------------------------------------------------------------------------------


def test_default_price_file_has_the_documented_instances():
    prices = costs.load_prices()
    assert {"m7i.2xlarge", "c7i.4xlarge", "g5.xlarge", "g6e.xlarge", "p4d.24xlarge", "p5.48xlarge"} <= set(prices)
    for inst in prices.values():
        assert 0 < inst.spot_usd_per_hour < inst.on_demand_usd_per_hour
    assert prices["p5.48xlarge"].gpus == 8 and prices["p5.48xlarge"].workers_per_instance == 8
    assert prices["m7i.2xlarge"].gpus == 0 and prices["m7i.2xlarge"].workers_per_instance == 1


def test_user_price_file_and_its_errors(tmp_path):
    good = tmp_path / "prices.yaml"
    good.write_text(
        "instances:\n  box:\n    on_demand_usd_per_hour: 2.0\n    spot_discount: 0.25\n    gpus: 2\n"
        "    peak_tflops_per_worker: 100\n"
    )
    box = costs.load_prices(good)["box"]
    assert box.spot_usd_per_hour == pytest.approx(1.5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("instances:\n  box:\n    on_demand_usd_per_hour: 2.0\n    gpus: 1\n")
    with pytest.raises(ValueError, match="'box' lacks spot_discount, peak_tflops_per_worker"):
        costs.load_prices(bad)
    with pytest.raises(ValueError, match="not found"):
        costs.load_prices(tmp_path / "missing.yaml")


# ---- planner --------------------------------------------------------------------------------------------------

PLAN = dict(
    instance="g6e.xlarge", workers=4, tokens_per_second_per_worker=5e4, save_seconds=60.0, restart_seconds=300.0
)


def test_plan_for_compute_uses_the_frontier_and_its_interval():
    fit = make_fit()
    plan = costs.plan_training(fit, compute_flops=1e21, spot=True, preemptions_per_hour=0.05, **PLAN)
    n_opt, d_opt, _ = fit.frontier(1e21)
    assert plan.n_params == pytest.approx(n_opt) and plan.n_tokens == pytest.approx(d_opt)
    assert plan.loss_lo < plan.loss < plan.loss_hi
    assert plan.instances == 4 and plan.purchase == "spot"
    spot = plan.spot
    assert spot.failures_per_hour == pytest.approx(0.2)  # 4 instances × 0.05/h
    assert spot.checkpoint_interval_s == pytest.approx(costs.young_daly_interval(60.0, 3600.0 / 0.2))
    expected_hours = d_opt / (5e4 * 4) / spot.goodput / 3600.0
    assert plan.wall_hours == pytest.approx(expected_hours)
    assert plan.cost_usd == pytest.approx(expected_hours * 4 * costs.load_prices()["g6e.xlarge"].spot_usd_per_hour)


def test_plan_carries_the_fits_warnings_and_flags_a_long_extrapolation():
    n = np.geomspace(1e7, 1e9, 12)
    d = 20 * n
    fit = ScalingFit(form="chinchilla", params=dict(BESIROGLU), ci={}, n_points=12, n=n, d=d,
                     loss=np.full(12, 2.0))
    largest = 6 * n[-1] * d[-1]
    near = costs.plan_training(fit, compute_flops=5 * largest, **PLAN)
    assert near.warnings == () and near.to_dict()["warnings"] == []
    far = costs.plan_training(fit, compute_flops=1000 * largest, **PLAN)
    assert len(far.warnings) == 1 and "1,000x the largest fitted run's compute" in far.warnings[0]
    narrow = ScalingFit(form="chinchilla", params={**BESIROGLU, "beta": 3.0}, ci={}, n_points=12, n=n, d=d,
                        loss=np.full(12, 2.0))
    assert costs.plan_training(narrow, compute_flops=5 * largest, **PLAN).warnings == tuple(narrow.warnings)
    assert narrow.warnings and narrow.warnings[0].startswith("beta = 3 is outside")


def test_plan_renders_as_a_flat_table_in_notebooks():
    plan = costs.plan_training(make_fit(), compute_flops=1e21, spot=True, preemptions_per_hour=0.05, **PLAN)
    html = plan._repr_html_()
    assert html.startswith("<table>") and "<td>instance</td><td>g6e.xlarge</td>" in html
    assert "<td>spot.checkpoint_interval_s</td>" in html and "<td>on_demand.cost_usd</td>" in html
    assert f"<td>spot.cost_usd</td><td>{plan.spot.cost_usd:.4g}</td>" in html
    assert f"<td>cost_usd</td><td>{plan.cost_usd:.4g}</td>" in html  # the spot price: purchase="spot"


@pytest.mark.parametrize("spot", [False, True])
def test_usd_to_compute_to_usd_round_trip(spot):
    fit = make_fit()
    by_usd = costs.plan_training(fit, budget_usd=2500.0, spot=spot, preemptions_per_hour=0.1, **PLAN)
    assert by_usd.cost_usd == pytest.approx(2500.0, rel=1e-9)
    by_flops = costs.plan_training(fit, compute_flops=by_usd.compute_flops, spot=spot, preemptions_per_hour=0.1, **PLAN)
    assert by_flops.cost_usd == pytest.approx(2500.0, rel=1e-9)
    assert by_flops.n_params == pytest.approx(by_usd.n_params, rel=1e-9)


def test_usd_budget_inverts_with_estimated_throughput_too():
    fit = make_fit()
    plan = costs.plan_training(fit, budget_usd=1e5, instance="p5.48xlarge", workers=16, mfu=0.4)
    # estimated tokens/s = peak × MFU / 6N, so wall time = C / (peak × MFU × workers × goodput)
    peak = costs.load_prices()["p5.48xlarge"].peak_tflops_per_worker * 1e12
    hours = plan.compute_flops / (peak * 0.4 * 16 * plan.on_demand.goodput) / 3600
    assert plan.wall_hours == pytest.approx(hours, rel=1e-9)
    assert plan.instances == 2 and plan.cost_usd == pytest.approx(1e5, rel=1e-9)


def test_spot_is_cheaper_than_on_demand_at_the_same_goodput():
    plan = costs.plan_training(make_fit(), compute_flops=1e21, preemptions_per_hour=0.0, **PLAN)
    assert plan.spot.goodput == plan.on_demand.goodput
    assert plan.spot.wall_hours == plan.on_demand.wall_hours
    assert plan.spot.cost_usd < plan.on_demand.cost_usd
    discount = costs.load_prices()["g6e.xlarge"].spot_discount
    assert plan.spot.cost_usd / plan.on_demand.cost_usd == pytest.approx(1 - discount)
    assert plan.purchase == "on_demand" and plan.cost_usd == plan.on_demand.cost_usd


def test_preemptions_cost_spot_goodput_and_time():
    calm = costs.plan_training(make_fit(), compute_flops=1e21, spot=True, preemptions_per_hour=0.01, **PLAN)
    stormy = costs.plan_training(make_fit(), compute_flops=1e21, spot=True, preemptions_per_hour=0.5, **PLAN)
    assert stormy.spot.goodput < calm.spot.goodput < 1.0
    assert stormy.wall_hours > calm.wall_hours
    assert stormy.on_demand == calm.on_demand  # on-demand machines are not preempted


def test_measured_throughput_is_rescaled_to_the_planned_size():
    fit = make_fit()
    n_opt = fit.frontier(1e21)[0]
    plan = costs.plan_training(
        fit, compute_flops=1e21, throughput_measured_at_params=n_opt / 2, **PLAN
    )
    assert plan.tokens_per_second_per_worker == pytest.approx(5e4 / 2)
    assert "rescaled" in plan.throughput_source


def test_plan_to_dict_is_strict_json_and_drops_nan():
    plan = costs.plan_training(make_fit(bootstrap=False), compute_flops=1e20, **PLAN)
    d = json.loads(json.dumps(plan.to_dict(), allow_nan=False))
    assert d["loss_lo"] is None and d["loss_hi"] is None
    assert d["cost_usd"] == pytest.approx(plan.cost_usd) and d["spot"]["purchase"] == "spot"


def test_planner_errors_are_one_line_and_name_the_fix():
    fit = make_fit()
    with pytest.raises(ValueError, match="exactly one of compute_flops"):
        costs.plan_training(fit, compute_flops=1e20, budget_usd=10.0, **PLAN)
    with pytest.raises(ValueError, match="exactly one of compute_flops"):
        costs.plan_training(fit, **PLAN)
    with pytest.raises(ValueError, match=r"unknown instance type 'x9\.huge'; known: .*g5\.xlarge"):
        costs.plan_training(fit, compute_flops=1e20, **{**PLAN, "instance": "x9.huge"})
    with pytest.raises(ValueError, match="goodput 0"):
        costs.plan_training(fit, compute_flops=1e20, spot=True, preemptions_per_hour=50.0, **PLAN)
    with pytest.raises(ValueError, match="budget_usd must be > 0"):
        costs.plan_training(fit, budget_usd=-1.0, **PLAN)


def test_auto_checkpoint_interval_is_young_daly_of_the_measured_save():
    from app.costs import auto_checkpoint_interval

    assert auto_checkpoint_interval(2.0, 0.5, 3600.0) == pytest.approx(math.sqrt(2 * 2.0 * 3600))
    # no save measured yet: ten step times stand in for the save time
    assert auto_checkpoint_interval(None, 0.5, 3600.0) == pytest.approx(math.sqrt(2 * 5.0 * 3600))
    assert auto_checkpoint_interval(0.0, 0.5, 3600.0) == pytest.approx(math.sqrt(2 * 5.0 * 3600))


def test_trainer_picks_auto_interval_from_configured_or_observed_failure_rate():
    import time

    from app.config import load_config
    from pipelines.train import _checkpoint_interval_s, _mtbf_seconds

    cfg = load_config("tiny", ["checkpoint.every_minutes=auto", "checkpoint.mtbf_minutes=60"])
    now = time.time()
    assert _mtbf_seconds(cfg, [(now, 2)]) == 3600  # the first group: nothing observed yet
    # two failures (a worker lost at size 2, then a node) in 10 minutes
    assert _mtbf_seconds(cfg, [(now - 600, 2), (now - 300, 2), (now, 1)]) == pytest.approx(300, abs=2)
    # growing back onto a returning node is no failure: one failure in 10 minutes, not three restarts
    assert _mtbf_seconds(cfg, [(now - 600, 2), (now - 400, 1), (now, 2)]) == pytest.approx(600, abs=2)
    assert _mtbf_seconds(cfg, [(now - 7200 * 3, 2), (now, 2)]) == 3600  # rarer than configured: keep the configured
    assert _checkpoint_interval_s(cfg, 1.5, 0.1, 3600) == pytest.approx(math.sqrt(2 * 1.5 * 3600))
    fixed = load_config("tiny", ["checkpoint.every_minutes=2"])
    assert _checkpoint_interval_s(fixed, 1.5, 0.1, 3600) == 120
    assert _checkpoint_interval_s(load_config("tiny"), 1.5, 0.1, 3600) is None


def test_throughput_at_interpolates_the_achieved_flops_between_measured_sizes():
    # two sizes measured twice each: 4e10 and 5e10 FLOP/s achieved (medians), at 1e6 and 4e6 FLOPs per token
    measured = [(1e6, 3.8e4), (1e6, 4.2e4), (4e6, 1.2e4), (4e6, 1.3e4)]
    assert costs.throughput_at(1e6, measured) == pytest.approx(4.0e4)
    assert costs.throughput_at(4e6, measured) == pytest.approx(1.25e4)
    # halfway in log size: 4.5e10 FLOP/s; constant FLOP/s from either end would say 4e4 / 2 or 1.25e4 × 2
    assert costs.throughput_at(2e6, measured) == pytest.approx(4.5e10 / 2e6)
    # beyond the measured sizes: the nearest one's FLOP/s
    assert costs.throughput_at(1.6e7, measured) == pytest.approx(5e10 / 1.6e7)
    assert costs.throughput_at(5e5, measured) == pytest.approx(4e10 / 5e5)
    with pytest.raises(ValueError, match="at least one"):
        costs.throughput_at(1e6, [])
    with pytest.raises(ValueError, match="must be > 0"):
        costs.throughput_at(1e6, [(1e6, 0.0)])


def test_plan_interpolates_the_flops_of_several_measured_runs():
    fit = make_fit()
    base = {k: v for k, v in PLAN.items() if k != "tokens_per_second_per_worker"}
    n_opt = fit.frontier(1e21)[0]
    # FLOP/s in 6N terms: 1e12 at N_opt / 10, 2e12 at N_opt × 10 → 1.5e12 at N_opt (halfway in log N)
    runs = [(n_opt / 10, 1e12 / (6 * n_opt / 10)), (n_opt * 10, 2e12 / (6 * n_opt * 10))]
    plan = costs.plan_training(fit, compute_flops=1e21, throughput_by_params=runs, **base)
    assert plan.tokens_per_second_per_worker == pytest.approx(1.5e12 / (6 * n_opt))
    assert "interpolated at N_opt from the FLOP/s of 2 measured runs" in plan.throughput_source
    assert not any("outside the measured" in w for w in plan.warnings)
    small = [(n_opt / 100, 1e12 / (6 * n_opt / 100)), (n_opt / 10, 1e12 / (6 * n_opt / 10))]
    beyond = costs.plan_training(fit, compute_flops=1e21, throughput_by_params=small, **base)
    assert beyond.tokens_per_second_per_worker == pytest.approx(1e12 / (6 * n_opt))  # the largest's FLOP/s held
    assert any("outside the measured runs' sizes" in w for w in beyond.warnings)
    with pytest.raises(ValueError, match="not both"):
        costs.plan_training(fit, compute_flops=1e21, throughput_by_params=runs, **PLAN)
    with pytest.raises(ValueError, match="must be > 0"):
        costs.plan_training(fit, compute_flops=1e21, throughput_by_params=[(1e6, 0.0)], **base)
