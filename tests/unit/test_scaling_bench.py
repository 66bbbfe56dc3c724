"""The scaling-extrapolation benchmark's choices made before its target run: which parameter count to fit on
(a backtest inside the sweep) and which model shape to train."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app.scaling import SMALL_GRID
from app.sweep_config import base_config, load_sweep

_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("scaling_bench", _ROOT / "benchmarks" / "scaling_extrapolation.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _sweep_like(law_on: str, embedding: float = 20_000.0) -> pd.DataFrame:
    """An IsoFLOP grid like scaling_small's (C = 6 N_non-embedding D), losses drawn from a Chinchilla law in N
    counted as `law_on` (every model also holds `embedding` embedding parameters), plus 0.3 % noise."""
    rng = np.random.default_rng(0)
    rows = []
    for c in (3e11, 1e12, 3e12, 6e12):
        for n in (25e3, 57e3, 100e3, 200e3, 400e3, 800e3):
            d = c / (6 * n)
            if d < 4e5:  # the grid's min_steps
                continue
            n_law = n + embedding if law_on == "total" else n
            loss = 1.8 + 400.0 / n_law**0.45 + 900.0 / d**0.4
            rows.append({"n_params": n, "n_params_total": n + embedding, "tokens": d, "compute": 6 * n * d,
                         "val_loss": loss * (1 + 0.003 * rng.standard_normal())})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("law_on", ["total", "non-embedding"])
def test_the_backtest_prefers_the_parameter_count_the_losses_follow(law_on):
    ok = _sweep_like(law_on)
    tests = {name: bench.backtest(ok, col, SMALL_GRID) for name, col in bench.PARAMS.items()}
    other = "non-embedding" if law_on == "total" else "total"
    assert tests[law_on]["predicted"] == int((ok["compute"] > 5e12).sum()) > 0
    assert tests[law_on]["fitted"] + tests[law_on]["predicted"] == len(ok)
    assert tests[law_on]["mean_error"] < 0.01  # the right count extrapolates within the noise
    assert tests[law_on]["mean_error"] < tests[other]["mean_error"]


def test_candidate_shapes_count_the_parameters_they_are_asked_for():
    sweep = load_sweep(_ROOT / "tune_configs" / "scaling_small.yaml")
    base = base_config(sweep)
    for params in bench.PARAMS:
        shape = bench.candidate_shapes(sweep, 150_000, base, params)[0]
        n = bench.shape_size(base, shape, params)
        assert 100_000 < n < 225_000, (params, shape, n)
        assert shape.d_model // shape.n_head == 16  # the sweep's head size
    ne = bench.candidate_shapes(sweep, 150_000, base, "non-embedding")[0]
    total = bench.candidate_shapes(sweep, 150_000, base, "total")[0]
    # counting the embeddings, the same N is a smaller model
    assert bench.shape_size(base, total, "non-embedding") < bench.shape_size(base, ne, "non-embedding")


def test_the_target_trains_at_the_lr_its_nearest_size_won_with_on_its_longest_runs():
    points = pd.DataFrame([
        {"n_params": 100e3, "compute": 3e12, "lr_factor": 2.0},
        {"n_params": 100e3, "compute": 1e12, "lr_factor": 0.5},
        {"n_params": 340e3, "compute": 3e12, "lr_factor": 0.5},
        {"n_params": 340e3, "compute": 6e11, "lr_factor": 1.0},
    ])
    assert bench.target_lr_factor(points, 150e3) == 2.0  # 100 K is nearer 150 K (in log) than 340 K
    assert bench.target_lr_factor(points, 300e3) == 0.5
    assert bench.target_lr_factor(points.drop(columns="lr_factor"), 150e3) == 1.0  # a sweep without factors


def test_the_seed_spread_check_resamples_the_sweep_and_its_reseeded_points():
    points = _sweep_like("non-embedding")
    rng = np.random.default_rng(1)
    seeds = pd.concat([points.assign(val_loss=points["val_loss"] * np.exp(0.01 * rng.standard_normal(len(points))),
                                     status="ok", seed=s) for s in (1, 2)], ignore_index=True)
    n, d = 60e3, 6e7
    truth = 1.8 + 400.0 / n**0.45 + 900.0 / d**0.4
    runs = bench.seed_runs(points, seeds, "n_params", points["compute"].max())
    check = bench.seed_spread_check(points, runs, "n_params", n, d, truth, SMALL_GRID, resamples=30)
    assert check["runs"] == 3 * len(points) and check["points"] == check["replicated_points"] == len(points)
    assert check["resamples"] == 30 and 0 <= check["within_2pct_of_achieved"] <= 1
    lo, hi = check["interval_90"]
    assert lo < check["median"] < hi and check["median_error"] < 0.2  # 1 % seed noise: near the truth, not on it
    preds = np.array(check["predictions"])
    assert check["within_2pct_of_achieved"] == pytest.approx(np.mean(np.abs(preds / truth - 1) <= 0.02))

    fitted = points[points["compute"] <= 1.5e12]  # what the benchmark fits with --c-max 1.5e12
    assert len(bench.seed_runs(fitted, seeds, "n_params", 1.5e12)) == 2 * len(fitted)  # C_max applies to seeds too
    failed = seeds.assign(status=["ok"] * (len(seeds) - 1) + ["error"])
    assert len(bench.seed_runs(points, failed, "n_params", points["compute"].max())) == len(seeds) - 1

    stray = seeds.assign(tokens=seeds["tokens"] * 1.5)
    with pytest.raises(ValueError, match=r"--seeds-from: \d+ run\(s\) at no point of the sweep"):
        bench.seed_runs(points, stray, "n_params", points["compute"].max())
