"""The smoke sweep end to end on embedded Ray (one-worker Tune trials, each training in its own process through Ray
Train's local mode), a resume that redoes nothing, a fit of its results, and the same trial trained on a Ray Train
worker matching it exactly."""

import json
import math

import numpy as np
import pytest

import app
from app.errors import ConfigError
from app.sweep_config import load_sweep, plan_trials
from tests.conftest import REPO

SMOKE = REPO / "tune_configs" / "smoke.yaml"  # the `smoke` fixture (tests/conftest.py) runs it


@pytest.mark.slow
def test_smoke_sweep_trains_every_trial_to_the_end(smoke, tiny_data):
    df = smoke.df
    planned = plan_trials(load_sweep(SMOKE), [f"data.dir={tiny_data}"])
    assert list(df["trial"]) == [t.name for t in planned]
    assert (df["status"] == "ok").all(), df[["trial", "status", "error"]]
    for t, row in zip(planned, df.itertuples()):
        assert (row.n_params, row.tokens, row.steps) == (t.n_params, t.tokens, t.steps)  # whole schedule trained
        assert row.compute == 6 * row.n_params * row.tokens
        assert row.model_flops == row.flops_per_token * row.tokens
        assert 3.0 < row.val_loss < math.log(512)  # learned something, below a uniform guess over the vocab
        summary = json.loads((smoke.sweep_dir / "trials" / t.name / "summary.json").read_text())
        assert summary["final_val_loss"] == pytest.approx(row.val_loss)
        assert summary["world_sizes"] == [1] and summary["zero_stage"] == 0
    # more tokens help every size: each shape's 192-step run ends below its 64-step run
    for _, group in df.groupby("d_model"):
        by_tokens = group.sort_values("tokens")["val_loss"].to_numpy()
        assert by_tokens[-1] < by_tokens[0]
    on_disk = __import__("pandas").read_parquet(smoke.results_parquet)
    assert on_disk["val_loss"].tolist() == pytest.approx(df["val_loss"].tolist())
    assert smoke.results_csv.is_file() and not smoke.resumed
    html = smoke._repr_html_()  # what a notebook shows
    assert html.startswith("<table>") and all(f"<td>{t.name}</td>" in html for t in planned)


@pytest.mark.slow
def test_running_again_resumes_without_retraining(smoke, tiny_data):
    summaries = sorted((smoke.sweep_dir / "trials").glob("*/summary.json"))
    before = {p: p.stat().st_mtime_ns for p in summaries}
    again = app.sweep(SMOKE, smoke.sweep_dir, overrides=[f"data.dir={tiny_data}"])
    assert again.resumed and (again.df["status"] == "ok").all()
    assert again.df["val_loss"].tolist() == pytest.approx(smoke.df["val_loss"].tolist())
    assert {p: p.stat().st_mtime_ns for p in summaries} == before  # no trial trained again
    assert again.wall_s < 60


@pytest.mark.slow
def test_smoke_results_fit_to_finite_laws_and_plots(smoke, tmp_path):
    report = app.fit_report(smoke.results_parquet, out=tmp_path / "fit", bootstrap=100, grid="small")
    law = report.law
    assert law.n_points == 6
    assert all(np.isfinite(v) for v in law.params.values())
    # Six tiny runs hardly identify five parameters (the smoke fit lands on exponents far from any published
    # law): what holds is a finite law that reproduces its points, with finite bootstrap intervals.
    assert set(law.ci) == set(law.params) and all(np.isfinite(ci).all() and ci[0] <= ci[1] for ci in law.ci.values())
    assert law.residuals().rmse < 0.05
    kaplan = report.kaplan_n
    assert kaplan is not None and np.isfinite(kaplan.params["alpha_N"]) and kaplan.n_points == 3
    loss, lo, hi = law.predict(1e6, 1e7)
    assert np.isfinite([loss, lo, hi]).all() and lo <= hi
    fit_json = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert fit_json["n_points"] == 6 and set(fit_json["params"]) == {"E", "A", "B", "alpha", "beta"}
    for name in ("loss_vs_compute.png", "isoflop.png", "residuals.png"):
        assert (tmp_path / "fit" / name).stat().st_size > 5000


@pytest.mark.slow
def test_reseed_trains_the_points_at_another_seed_and_fits_with_the_sweep(smoke, tiny_data, tmp_path):
    """`sweep --reseed 1`: the smoke sweep's 6 points again at seed 1 (same steps and lr, another init and data
    order), in their own folder; fitted together with the sweep, the seed spread resamples the two."""
    seeds = app.sweep(SMOKE, tmp_path / "seeds", overrides=[f"data.dir={tiny_data}"], reseed=[1],
                      reseed_from=smoke.sweep_dir)
    df, first = seeds.df, smoke.df
    assert seeds.name == "smoke-seeds" and (df["status"] == "ok").all() and (df["seed"] == 1).all()
    assert json.loads((seeds.sweep_dir / "sweep.json").read_text())["reseed"] == {
        "of": str(smoke.sweep_dir), "seeds": [1]}
    key = ["n_params", "tokens"]
    both = first.merge(df, on=key, suffixes=("_0", "_1"))
    assert len(both) == 6 and (both["steps_0"] == both["steps_1"]).all() and (both["lr_0"] == both["lr_1"]).all()
    assert (both["val_loss_0"] != both["val_loss_1"]).all()  # another seed: other runs ...
    assert np.allclose(both["val_loss_0"], both["val_loss_1"], rtol=0.1)  # ... of the same points
    report = app.fit_report([smoke.results_parquet, seeds.sweep_dir], bootstrap=0, grid="small", plots=False,
                            seed_spread=True, reruns=20, predict=[(1e6, 1e7)])
    (spread,) = report.seed_spreads
    assert report.law.n_points == 12 and list(spread.seeds) == [2] * 6
    assert np.isfinite(spread.predictions).all() and spread.interval()[0] < spread.interval()[1]


@pytest.mark.slow
def test_in_process_trial_trains_exactly_what_a_train_worker_does(smoke, tiny_data, tmp_path):
    """A sweep trial trains in its Tune trial's process; the same config on a Ray Train worker (a TorchTrainer
    with its controller and worker actor) computes the same steps, bit for bit."""
    import pandas as pd

    from pipelines import train

    trial = plan_trials(load_sweep(SMOKE), [f"data.dir={tiny_data}"])[0]
    cfg = trial.cfg.model_copy(update={"storage": str(tmp_path)})
    on_worker = train.run(cfg, progress=False)
    worker_history = pd.read_csv(tmp_path / trial.name / "history.csv")
    trial_history = pd.read_csv(smoke.sweep_dir / "trials" / trial.name / "history.csv")
    assert len(worker_history) == len(trial_history) == trial.steps
    assert worker_history["loss"].tolist() == trial_history["loss"].tolist()
    assert worker_history["sample_ids"].tolist() == trial_history["sample_ids"].tolist()
    assert on_worker.summary["final_val_loss"] == smoke.df.iloc[0]["val_loss"]


def test_in_process_run_refuses_more_than_one_worker(tiny_data, tmp_path):
    from pipelines import train

    cfg = plan_trials(load_sweep(SMOKE), [f"data.dir={tiny_data}"])[0].cfg
    cfg = cfg.model_copy(update={"storage": str(tmp_path),
                                 "parallel": cfg.parallel.model_copy(update={"workers": "1:2"})})
    with pytest.raises(ConfigError, match="parallel.workers=1:2: an in-process run has exactly one worker"):
        train.run(cfg, in_process=True)
