"""`python -m app fit` and `python -m app plan` on synthetic runs, and the SDK functions behind them. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import app
from app.costs import TrainingPlan
from app.errors import DataError, FitError, PlanError
from app.scaling import ScalingFit
from tests.conftest import run_cli

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022


def synthetic_results(noise: float = 0.003, size: int = 5) -> pd.DataFrame:
    """A sweep-shaped results table drawn from a known law, plus one failed trial that must be left out."""
    n, d = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e10, size), np.geomspace(1e9, 1e11, size)))
    loss = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
    loss = loss * np.exp(np.random.default_rng(0).normal(0.0, noise, n.size))
    df = pd.DataFrame({"trial": [f"t{i:03d}" for i in range(n.size)], "status": "ok", "n_params": n, "tokens": d,
                       "compute": 6 * n * d, "val_loss": loss})
    failed = {"trial": "t999", "status": "error", "n_params": 1e8, "tokens": 1e10, "compute": 6e18,
              "val_loss": np.nan}
    return pd.concat([df, pd.DataFrame([failed])], ignore_index=True)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """`python -m app fit` on a synthetic results.csv: the CLI's own output folder."""
    folder = tmp_path_factory.mktemp("fit")
    csv = folder / "results.csv"
    synthetic_results().to_csv(csv, index=False)
    out = folder / "out"
    result = run_cli("fit", str(csv), "--bootstrap", "60", "--grid", "small", "--predict-n", "7e10",
                     "--predict-d", "1.4e12", "--out", str(out))
    return result, out


def test_fit_cli_writes_fit_json_and_plots(fitted):
    result, out = fitted
    assert result.returncode == 0, result.stderr
    fit = json.loads((out / "fit.json").read_text())
    assert {"form", "params", "ci", "n_points", "predictions"} <= set(fit)
    assert fit["form"] == "chinchilla" and fit["n_points"] == 25  # the failed trial is left out
    assert fit["dropped"] == ["1 run(s) with status other than ok (error)"]
    p = fit["params"]
    assert (p["E"], p["alpha"], p["beta"]) == pytest.approx((TRUE["E"], TRUE["alpha"], TRUE["beta"]), abs=0.05)
    assert (p["A"], p["B"]) == pytest.approx((TRUE["A"], TRUE["B"]), rel=0.5)  # 25 noisy runs pin A, B loosely
    for name, (lo, hi) in fit["ci"].items():
        assert lo <= p[name] <= hi
    (pred,) = fit["predictions"]
    assert (pred["n"], pred["d"]) == (7e10, 1.4e12) and pred["lo"] < pred["loss"] < pred["hi"]
    truth = TRUE["E"] + TRUE["A"] / 7e10 ** TRUE["alpha"] + TRUE["B"] / 1.4e12 ** TRUE["beta"]
    assert pred["loss"] == pytest.approx(truth, rel=0.02)
    assert fit["kaplan_n"]["params"]["alpha_N"] > 0
    for name in ("loss_vs_compute.png", "isoflop.png", "residuals.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "alpha" in result.stdout and "predictions" in result.stdout and "left out: 1 run(s)" in result.stdout
    assert fit["warnings"] == [] and "warning:" not in result.stdout  # 25 runs over 3 decades of N: well posed


def test_plan_cli_with_a_fit(fitted):
    _, out = fitted
    result = run_cli("plan", "--flops", "1e21", "--fit", str(out / "fit.json"), "--instance", "g6e.xlarge",
                     "--spot", "--preemptions-per-hour", "0.05", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert 6 * plan["n_params"] * plan["n_tokens"] == pytest.approx(1e21, rel=1e-9)
    assert plan["loss_lo"] < plan["loss"] < plan["loss_hi"]
    assert plan["purchase"] == "spot" and plan["spot"]["failures_per_hour"] == pytest.approx(0.05)
    assert plan["spot"]["cost_usd"] < plan["on_demand"]["cost_usd"] and plan["spot"]["goodput"] < 1

    table = run_cli("plan", "--flops", "1e21", "--fit", str(out / "fit.json"), "--instance", "g6e.xlarge")
    assert table.returncode == 0, table.stderr
    for text in ("N_opt (parameters)", "D_opt (tokens)", "predicted loss", "on-demand *", "spot", "g6e.xlarge"):
        assert text in table.stdout
    assert "warning:" not in table.stdout  # 1e21 is within the runs' compute (up to 6e21)
    far = run_cli("plan", "--flops", "6e24", "--fit", str(out / "fit.json"), "--instance", "g6e.xlarge")
    assert far.returncode == 0 and "warning: C = 6e+24 FLOPs is 1,000x the largest fitted run's compute" in far.stdout


def test_plan_cli_default_law_and_measured_throughput(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"tokens_per_s": 20000.0, "flops_per_token": 6e6, "world_sizes": [2]}))
    result = run_cli("plan", "--usd", "500", "--instance", "m7i.2xlarge", "--summary", str(summary), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["on_demand"]["cost_usd"] == pytest.approx(500, rel=1e-6)
    # 10,000 tokens/s per worker measured at N = 6e6/6, rescaled at constant FLOP/s to N_opt
    assert plan["tokens_per_second_per_worker"] == pytest.approx(1e4 * 1e6 / plan["n_params"], rel=1e-9)
    assert plan["loss_lo"] is None  # the default law (published point estimates) has no interval
    cheapest = run_cli("plan", "--flops", "1e20")
    assert cheapest.returncode == 0, cheapest.stderr
    assert "the cheapest in the price file" in cheapest.stdout and "Besiroglu" in cheapest.stdout


def test_plan_places_a_summarys_throughput_at_the_fits_parameter_count(fitted, tmp_path):
    """A law fitted on a sweep's n_params rescales a run's tokens/s from that run's n_params, not from
    flops_per_token / 6 (which counts the output head and attention: N_opt does not)."""
    _, out = fitted
    summary = tmp_path / "summary.json"
    body = {"tokens_per_s": 20000.0, "flops_per_token": 6e6, "world_sizes": [1], "n_params": 4e5,
            "n_params_total": 6e5}
    summary.write_text(json.dumps(body))
    result = run_cli("plan", "--flops", "1e21", "--fit", str(out / "fit.json"), "--instance", "g6e.xlarge",
                     "--summary", str(summary), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["tokens_per_second_per_worker"] == pytest.approx(2e4 * 4e5 / plan["n_params"], rel=1e-9)
    total = app.plan(flops=1e21, fit=out / "fit.json", instance="g6e.xlarge", summary=summary,
                     n_column="n_params_total")
    assert total.tokens_per_second_per_worker == pytest.approx(2e4 * 6e5 / total.n_params, rel=1e-9)
    del body["n_params"]  # a summary written before the key existed: flops_per_token / 6, unless asked for
    summary.write_text(json.dumps(body))
    old = app.plan(flops=1e21, fit=out / "fit.json", instance="g6e.xlarge", summary=summary)
    assert old.tokens_per_second_per_worker == pytest.approx(2e4 * 1e6 / old.n_params, rel=1e-9)
    with pytest.raises(DataError, match="has no 'n_params' .* leave n_column out"):
        app.plan(flops=1e21, fit=out / "fit.json", instance="g6e.xlarge", summary=summary, n_column="n_params")


def test_plan_cli_wall_time_from_a_sweeps_measured_throughput(fitted, tmp_path):
    """--throughput-from: each trial's FLOP/s (6N × tokens/s) interpolated in log N to N_opt, with N read from the
    column the fit.json was fitted on."""
    _, out = fitted
    df = synthetic_results()
    df["tokens_per_s_per_worker"] = 2e12 * (df["n_params"] / 1e7) ** 0.1 / (6 * df["n_params"])  # FLOP/s grows
    df.loc[df["status"] != "ok", "tokens_per_s_per_worker"] = 1.0  # a failed trial's figure must be left out
    results = tmp_path / "results.csv"
    df.to_csv(results, index=False)
    result = run_cli("plan", "--flops", "1e21", "--fit", str(out / "fit.json"), "--instance", "g6e.xlarge",
                     "--throughput-from", str(results), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    n_opt = plan["n_params"]
    assert 1e7 < n_opt < 1e10  # inside the measured sizes: interpolated, not held
    flops_per_s = 2e12 * (n_opt / 1e7) ** 0.1  # linear in log N between the grid's sizes: close to this power law
    assert plan["tokens_per_second_per_worker"] == pytest.approx(flops_per_s / (6 * n_opt), rel=0.03)
    assert plan["throughput_source"].startswith("interpolated at N_opt from the FLOP/s of 25 measured runs")

    # a law fitted on n_params_total places the trials at that column
    df["n_params_total"] = df["n_params"] * 2
    df.to_csv(results, index=False)
    total_fit = json.loads((out / "fit.json").read_text())
    total_fit["columns"]["n"] = "n_params_total"
    (tmp_path / "fit.json").write_text(json.dumps(total_fit))
    total = run_cli("plan", "--flops", "1e21", "--fit", str(tmp_path / "fit.json"), "--instance", "g6e.xlarge",
                    "--throughput-from", str(results), "--json")
    assert total.returncode == 0, total.stderr
    half = n_opt / 2  # the trial of total N = N_opt is the one of non-embedding N = N_opt / 2: its tokens/s
    assert json.loads(total.stdout)["tokens_per_second_per_worker"] == pytest.approx(
        2e12 * (half / 1e7) ** 0.1 / (6 * half), rel=0.03)
    in_memory = app.plan(flops=1e21, fit=ScalingFit.from_json(total_fit), instance="g6e.xlarge",
                         throughput_from=results)  # a ScalingFit object carries its column too
    assert in_memory.tokens_per_second_per_worker == pytest.approx(
        json.loads(total.stdout)["tokens_per_second_per_worker"], rel=1e-9)

    with pytest.raises(DataError, match="no parameter column 'nope' to place the throughputs at; columns are trial"):
        app.plan(flops=1e21, instance="g6e.xlarge", throughput_from=results, n_column="nope")

    df.drop(columns=["tokens_per_s_per_worker"]).to_csv(results, index=False)
    missing = run_cli("plan", "--flops", "1e21", "--instance", "g6e.xlarge", "--throughput-from", str(results))
    assert missing.returncode == 1 and "has no tokens_per_s_per_worker column" in missing.stderr
    assert missing.stderr.count("\n") == 1, missing.stderr


@pytest.mark.parametrize(
    "rows,args,message",
    [
        (4, [], "approach 3 (L = E + A/N^α + B/D^β) needs at least 5 points (one per fitted parameter), got 4"),
        ("zero-loss", [], "loss must be > 0 but row 3 is 0"),
        ("no-tokens", [], "no column for tokens (tokens / D) or compute"),
        ("no-params", [], "no column for parameters (n_params / N /"),  # this message used to be a KeyError
        (25, ["--predict-n", "1e9"], "got 1 --predict-n and 0 --predict-d; give them in pairs"),
        (25, ["--drop-highest-loss", "30"], "--drop-highest-loss 30: must be between 0 and 24"),
        (25, ["--n-column", "n_params_total"], "--n-column 'n_params_total' is not a column; columns are trial,"),
        (25, ["--rerun-noise", "0"], "--rerun-noise 0: the relative spread of a run's final loss between seeds"),
        (25, ["--reruns", "5"], "--reruns sets how many sweeps --rerun-noise simulates or --seed-spread resamples; "
                                "add --rerun-noise SIGMA (e.g. 0.007) or --seed-spread"),
        (25, ["--seed-spread"], "--seed-spread: {csv}: every point (N, D) has one run; it needs points trained at "
                                "several seeds"),
        (25, ["--rerun-noise", "0.01", "--reruns", "1"], "--reruns must be >= 2 simulated sweeps, got 1"),
    ],
)
def test_fit_cli_mistakes_are_one_line(tmp_path, rows, args, message):
    df = synthetic_results().iloc[:25]
    if rows == "zero-loss":
        df.loc[3, "val_loss"] = 0.0
    elif rows == "no-tokens":
        df = df.drop(columns=["tokens", "compute"])
    elif rows == "no-params":
        df = df.drop(columns=["n_params"])
    else:
        df = df.iloc[:rows]
    csv = tmp_path / "results.csv"
    df.to_csv(csv, index=False)
    result = run_cli("fit", str(csv), "--bootstrap", "0", "--grid", "small", "--out", str(tmp_path / "o"), *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(csv=csv) in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_fit_cli_rerun_check_at_the_ten_x_point_and_at_each_prediction(tmp_path):
    csv = tmp_path / "results.csv"
    synthetic_results().to_csv(csv, index=False)
    common = ("fit", str(csv), "--bootstrap", "0", "--grid", "small", "--no-plots", "--rerun-noise", "0.005",
              "--reruns", "30")
    result = run_cli(*common, "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    fit = json.loads((tmp_path / "a" / "fit.json").read_text())
    (check,) = fit["rerun_check"]
    law = ScalingFit.from_json(fit)
    n_opt, d_opt, _ = law.frontier(10 * max(6 * n * d for n, d in zip(law.n, law.d)))
    assert (check["n"], check["d"]) == pytest.approx((n_opt, d_opt), rel=1e-9)
    assert check["simulations"] == 30 and check["noise"] == 0.005
    assert 0 < check["median_abs_error"] <= check["p90_abs_error"] and 0 <= check["within"] <= 1
    assert "re-run check: loss ±0.50% per run, 30 sweeps" in result.stdout
    assert "at N_opt, D_opt for 10× the largest run's compute" in result.stdout

    points = run_cli(*common, "--predict-n", "1e9", "--predict-d", "1e10", "--predict-n", "1e11",
                     "--predict-d", "2e12", "--out", str(tmp_path / "b"))
    assert points.returncode == 0, points.stderr
    near, far = json.loads((tmp_path / "b" / "fit.json").read_text())["rerun_check"]
    assert (near["n"], near["d"], far["n"], far["d"]) == (1e9, 1e10, 1e11, 2e12)
    assert near["median_abs_error"] < far["median_abs_error"]  # inside the runs vs 10× beyond them
    assert "10× the largest" not in points.stdout

    assert run_cli("fit", str(csv), "--bootstrap", "0", "--grid", "small", "--no-plots", "--out",
                   str(tmp_path / "c")).returncode == 0
    assert json.loads((tmp_path / "c" / "fit.json").read_text())["rerun_check"] is None  # not asked for


def test_fit_cli_fits_several_tables_together_and_shows_the_seed_spread(tmp_path):
    """A sweep at seed 0 and its re-run at seeds 1 and 2, given together: one fit of every run, and how far apart
    the one-seed sweeps among them predict."""
    tables = []
    for seed in (0, 1, 2):
        df = synthetic_results(noise=0.01).iloc[:25]
        df["val_loss"] *= np.exp(np.random.default_rng(10 + seed).normal(0.0, 0.01, 25))  # seeds differ
        df["seed"] = seed
        tables.append(df)
        if seed == 0:
            (tmp_path / "s0").mkdir()
            df.to_csv(tmp_path / "s0" / "results.csv", index=False)
    (tmp_path / "seeds").mkdir()
    pd.concat(tables[1:]).to_csv(tmp_path / "seeds" / "results.csv", index=False)
    (tmp_path / "seeds" / "sweep.json").write_text("{}")  # a sweep folder: named by the folder in runs/fits

    result = run_cli("fit", str(tmp_path / "s0" / "results.csv"), str(tmp_path / "seeds"), "--bootstrap", "0",
                     "--grid", "small", "--no-plots", "--seed-spread", "--reruns", "12", "--predict-n", "7e10",
                     "--predict-d", "1.4e12", "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    fit = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert fit["n_points"] == 75 and " + " in fit["source"] and fit["rerun_check"] is None
    (spread,) = fit["seed_spread"]
    assert (spread["n"], spread["d"], spread["resamples"]) == (7e10, 1.4e12, 12)
    assert (spread["points"], spread["replicated_points"]) == (25, 25)
    assert spread["pooled"] == pytest.approx(fit["predictions"][0]["loss"], rel=1e-9)
    assert min(spread["predictions"]) < spread["median"] < max(spread["predictions"]) and spread["spread"] > 0
    assert "seed spread: 12 one-seed sweeps, 25 of 25 points at 3 seeds" in result.stdout

    sdk = app.fit_report([tmp_path / "s0" / "results.csv", tmp_path / "seeds"], bootstrap=0, grid="small",
                         plots=False, predict=[(7e10, 1.4e12)], seed_spread=True, reruns=12)
    np.testing.assert_allclose(sdk.seed_spreads[0].predictions, spread["predictions"], rtol=1e-9)

    from pipelines.fit_scaling import default_out
    assert default_out([tmp_path / "s0" / "results.csv", tmp_path / "seeds"]) == Path("runs/fits/results+seeds")

    (tmp_path / "empty").mkdir()
    empty = run_cli("fit", str(tmp_path / "s0" / "results.csv"), str(tmp_path / "empty"), "--out", str(tmp_path / "e"))
    assert empty.returncode == 1 and empty.stderr.strip().splitlines() == [
        f"error: folder {tmp_path / 'empty'} has no results.parquet or results.csv; pass a sweep's folder or its "
        "results table"]


def test_fit_counts_the_parameters_of_the_column_asked_for():
    """A law in total parameters: fitted on them it recovers the law; on the non-embedding count it cannot."""
    df = synthetic_results().iloc[:25].rename(columns={"n_params": "n_params_total"})
    df["n_params"] = df["n_params_total"] - 5e6 * (df["n_params_total"] / 1e7) ** 0.5  # embeddings grow like √N
    total = app.fit_report(df, bootstrap=0, grid="small", n_column="n_params_total", plots=False)
    assert total.runs.columns["n"] == "n_params_total"
    assert total.law.n_column == "n_params_total"  # the law carries it: plan(throughput_from=) places trials there
    assert ScalingFit.from_json(total.law.to_json()).n_column == "n_params_total"
    assert ScalingFit.from_json(total.to_json()).n_column == "n_params_total"
    p = total.law.params
    assert (p["E"], p["alpha"]) == pytest.approx((TRUE["E"], TRUE["alpha"]), abs=0.05)
    default = app.fit_report(df, bootstrap=0, grid="small", plots=False)
    assert default.runs.columns["n"] == "n_params"
    assert abs(default.law.params["E"] - TRUE["E"]) > 0.05  # the wrong count bends the law
    assert default.law.residuals().rmse > 1.5 * total.law.residuals().rmse


def test_fit_keeps_each_points_best_learning_rate():
    """A sweep with lr.factors: each point trained at three lrs, the rule's 1× best but some points beaten by 0.5×
    or 2×. The fit sees each point once, at its lowest loss, and says how many runs it left out."""
    base = synthetic_results().iloc[:25]
    base = base.assign(seed=0, lr=1e-3, lr_factor=1.0)
    rng = np.random.default_rng(1)
    worse = [base.assign(lr=1e-3 * f, lr_factor=f, val_loss=base["val_loss"] * (1 + rng.uniform(0.01, 0.2, 25)))
             for f in (0.5, 2.0)]
    table = pd.concat([*worse, base], ignore_index=True)
    table.loc[3, "val_loss"] = base.loc[3, "val_loss"] * 0.9  # point 3: 0.5× beats 1×
    report = app.fit_report(table, bootstrap=0, grid="small", plots=False)
    assert len(report.runs.loss) == 25
    expected = np.minimum(base["val_loss"].to_numpy(), table["val_loss"].to_numpy()[:25])
    assert np.allclose(np.sort(report.runs.loss), np.sort(expected))
    assert any("50 run(s) beaten at the same shape, tokens and seed by another learning rate" in d
               for d in report.runs.dropped)
    p = report.law.params
    assert (p["E"], p["alpha"]) == pytest.approx((TRUE["E"], TRUE["alpha"]), abs=0.05)  # the worse lrs are gone

    from pipelines.fit_scaling import best_lr

    repeats = pd.concat([base, base.assign(val_loss=base["val_loss"] * 1.01)], ignore_index=True)
    kept, beaten = best_lr(repeats)  # the same lr twice is a repeat, not an lr sweep: all of it is fitted
    assert (len(kept), beaten) == (50, 0)
    assert best_lr(synthetic_results().iloc[:25])[1] == 0  # no lr column: nothing to choose between


def test_fit_refuses_a_file_that_is_not_a_results_table(tmp_path):
    (tmp_path / "fit.yaml").write_text("model: [\n")
    result = run_cli("fit", str(tmp_path / "fit.yaml"))
    assert result.returncode == 1 and "a results table is a .parquet or .csv file" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--usd", "100"], "--usd needs --instance TYPE"),
        (["--flops", "1e21", "--instance", "p9.huge"], "unknown instance type 'p9.huge'"),
        (["--flops", "1e21", "--fit", "/no/such/fit.json"], "fit file /no/such/fit.json does not exist"),
        (["--flops", "1e21", "--summary", "/no/summary.json"], "--summary gives the throughput of one machine type"),
        (["--flops", "1e21", "--throughput-from", "/no/results.parquet"],
         "--throughput-from gives the throughput of one machine type"),
        (["--flops", "1e21", "--instance", "g6e.xlarge", "--throughput-from", "/no/results.parquet"],
         "results file /no/results.parquet does not exist"),
        (["--flops", "1e21", "--instance", "g6e.xlarge", "--summary", "s.json", "--throughput-from", "r.parquet"],
         "give --summary (one run's tokens/s) or --throughput-from (a sweep's), not both"),
        (["--flops", "0"], "compute_flops must be > 0"),
    ],
)
def test_plan_cli_mistakes_are_one_line(args, message):
    result = run_cli("plan", *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_sdk_fit_and_plan():
    law = app.fit(synthetic_results(), bootstrap=20, grid="small")
    assert isinstance(law, ScalingFit) and law.n_points == 25
    n_opt, d_opt, loss = law.frontier(1e21)
    assert 6 * n_opt * d_opt == pytest.approx(1e21)
    plan = app.plan(flops=1e21, fit=law, instance="p4d.24xlarge", workers=8)
    assert isinstance(plan, TrainingPlan) and plan.instances == 1 and plan.n_params == pytest.approx(n_opt)
    with pytest.raises(FitError, match="at least 5 points"):
        app.fit(synthetic_results().iloc[:3], bootstrap=0, grid="small")
    with pytest.raises(PlanError, match="exactly one budget"):
        app.plan(flops=1e21, usd=10.0, instance="g5.xlarge")
