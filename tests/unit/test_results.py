"""Result objects in notebooks: they render as tables and plot themselves (no Ray: built from plain frames)."""

import math
from pathlib import Path

import matplotlib
import pandas as pd

from pipelines.sweep import SweepResult
from pipelines.train import TrainResult

matplotlib.use("Agg")


def test_train_result_plots_loss_val_loss_and_restarts():
    history = pd.DataFrame({"step": [1, 2, 3, 4], "loss": [6.0, 5.5, 5.2, 5.0],
                            "val_loss": [math.nan, 5.6, math.nan, 5.1]})
    result = TrainResult("runs/x", {"run": "x", "steps": 4}, None, history,
                         attempts=[{"start_step": 0}, {"start_step": 2}])
    ax = result.plot()
    train, val = ax.get_lines()[:2]
    assert list(train.get_ydata()) == [6.0, 5.5, 5.2, 5.0]
    assert list(val.get_xdata()) == [2, 4] and list(val.get_ydata()) == [5.6, 5.1]  # only where measured
    restarts = [line for line in ax.get_lines()[2:] if line.get_linestyle() == ":"]
    assert [line.get_xdata()[0] for line in restarts] == [2]
    assert ax.get_title() == "x" and "<td>steps</td><td>4</td>" in result._repr_html_()


def test_sweep_result_plots_one_line_per_size_over_finished_trials():
    df = pd.DataFrame({"trial": ["a", "b", "c", "d"], "n_params": [100, 100, 200, 200],
                       "tokens": [10, 30, 10, 30], "compute": [6e3, 1.8e4, 1.2e4, 3.6e4],
                       "val_loss": [5.0, 4.5, 4.8, math.nan], "wall_s": [1.0, 1.0, 1.0, math.nan],
                       "status": ["ok", "ok", "ok", "error"]})
    result = SweepResult("s", Path("d"), df, Path("r.parquet"), Path("r.csv"), 1.0, False)
    ax = result.plot()
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert lines == {"N = 100": [5.0, 4.5], "N = 200": [4.8]}  # the failed trial is left out
    assert ax.get_xscale() == "log"
    html = result._repr_html_()
    assert html.startswith("<table>") and "<td>d</td>" in html and "<td>error</td>" in html


def test_sweep_result_with_lr_factors_plots_and_keeps_each_points_best_lr():
    df = pd.DataFrame({"trial": ["a-x1", "a-x2", "b-x1", "b-x2"], "n_params": [100] * 4, "tokens": [10, 10, 30, 30],
                       "seed": 0, "lr": [1e-3, 2e-3, 1e-3, 2e-3], "compute": [6e3, 6e3, 1.8e4, 1.8e4],
                       "val_loss": [5.0, 4.9, 4.4, 4.6], "wall_s": 1.0, "status": "ok"})
    result = SweepResult("s", Path("d"), df, Path("r.parquet"), Path("r.csv"), 1.0, False)
    assert list(result.best["trial"]) == ["a-x2", "b-x1"] and len(result.ok) == 4
    assert [list(line.get_ydata()) for line in result.plot().get_lines()] == [[4.9, 4.4]]
