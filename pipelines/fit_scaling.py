"""Scaling-law fits from a table of runs: approach 3 with bootstrap intervals, plus Kaplan's L(N), L(C) and
approach 2 where the runs allow them → fit.json and PNG plots.

    python -m app fit runs/sweeps/smoke/results.parquet --bootstrap 1000 --out runs/sweeps/smoke/fit
    python -m app fit ../shared/data/chinchilla_svg_extracted_data.csv --drop-highest-loss 5
    python -m app fit runs/sweeps/a runs/sweeps/a_seeds --seed-spread   # several tables: fitted together

The table is a sweep's results.parquet / results.csv (rows with status other than "ok" are left out) or any CSV /
Parquet with a parameter column (n_params, N, "Model Size"), tokens (tokens, D) or compute (compute, C,
"Training FLOP"; D = C / 6N) and a loss column (val_loss, loss). Several tables are fitted as one (e.g. a sweep and
its re-run at other seeds). All fitting is app/scaling.py; no Ray here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from app.errors import DataError, FitError
from app.jsonsafe import finite
from app.scaling import (
    BESIROGLU_GRID,
    FLOPS_PER_PARAM_TOKEN,
    SMALL_GRID,
    IsoFlopFit,
    PowerLawFit,
    RerunCheck,
    ScalingFit,
    SeedSpread,
    fit_chinchilla,
    fit_isoflop,
    fit_kaplan_c,
    fit_kaplan_n,
)

# Accepted column names, first match wins: ours (sweep results), the usual short names, Epoch AI's Chinchilla CSV.
COLUMNS = {
    "n": ("n_params", "N", "params", "Model Size", "model_size"),
    "d": ("tokens", "D", "n_tokens", "Tokens"),
    "c": ("compute", "C", "Training FLOP", "training_flops", "flops"),
    "loss": ("val_loss", "loss", "final_val_loss", "Loss"),
}
GRIDS = {"full": BESIROGLU_GRID, "small": SMALL_GRID}


@dataclass
class RunTable:
    """The runs to fit: N parameters, D tokens, final loss (nats/token), and what was left out and why."""

    n: np.ndarray
    d: np.ndarray
    loss: np.ndarray
    source: str
    columns: dict[str, str]  # role -> column used ("d" may read "C / 6N from <column>")
    dropped: list[str] = field(default_factory=list)


def _pick(frame, role: str) -> str | None:
    return next((c for c in COLUMNS[role] if c in frame.columns), None)


def read_table(results: Any):
    """(DataFrame, source name) from a results table: a path to CSV/Parquet, a sweep folder, or a DataFrame; or
    from a list of them, concatenated (the source names joined by " + ")."""
    import pandas as pd

    if isinstance(results, (list, tuple)):
        if not results:
            raise DataError("no results table given: pass a sweep's results.parquet/.csv (or its folder)")
        if len(results) > 1:
            tables = [read_table(r) for r in results]
            return (pd.concat([t for t, _ in tables], ignore_index=True, sort=False),
                    " + ".join(source for _, source in tables))
        results = results[0]
    if isinstance(results, pd.DataFrame):
        return results.copy(), "DataFrame"
    path = Path(results)
    if path.is_dir():
        found = [path / name for name in ("results.parquet", "results.csv") if (path / name).is_file()]
        if not found:
            raise DataError(f"folder {path} has no results.parquet or results.csv; pass a sweep's folder or its "
                            "results table")
        path = found[0]
    if not path.is_file():
        raise DataError(f"results file {path} does not exist; pass a sweep's results.parquet/.csv or a CSV of runs")
    if path.suffix.lower() not in (".parquet", ".csv"):
        raise DataError(f"{path}: a results table is a .parquet or .csv file (a sweep's results.parquet, or a CSV "
                        "of runs with parameter, token and loss columns)")
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except Exception as err:  # pyarrow/pandas parse errors: name the file, keep one line
        raise DataError(f"cannot read {path} as {'Parquet' if path.suffix.lower() == '.parquet' else 'CSV'}: "
                        f"{str(err).splitlines()[0]}") from None
    return frame, str(path)


def best_lr(frame, loss: str = "val_loss"):
    """Per-point lr tuning: of the runs that differ only in learning rate (same shape, tokens and seed; a sweep
    with lr.factors), keep the lowest-loss one. Returns (kept rows, how many were dropped). A table without an
    `lr` column, or with one run per point, comes back whole."""
    keys = [c for c in ("n_layer", "d_model", "n_head", "n_params", "tokens", "seed") if c in frame.columns]
    if "lr" not in frame.columns or loss not in frame.columns or not keys or frame[loss].isna().any():
        return frame, 0  # (a missing loss is reported by the caller, row by row)
    groups = frame.groupby(keys, dropna=False, sort=False)
    if (groups["lr"].nunique() < groups.size()).any():
        return frame, 0  # repeats at the same lr are not an lr sweep: fit them all
    best = frame.loc[frame.index.isin(groups[loss].idxmin())]  # in the table's own row order
    return best, len(frame) - len(best)


def read_runs(results: Any, *, drop_highest_loss: int = 0, n_column: str | None = None) -> RunTable:
    """Read a results table (path to CSV/Parquet, or a DataFrame) into N, D, loss arrays. N comes from
    `n_column` when given (a sweep's n_params_total: every parameter, embeddings included), else from the first
    parameter column found (a sweep's n_params: non-embedding). Runs differing only in learning rate keep their
    best (`best_lr`)."""
    frame, source = read_table(results)
    dropped = []
    if "status" in frame.columns:
        bad = frame["status"] != "ok"
        if bad.any():
            dropped.append(f"{int(bad.sum())} run(s) with status other than ok "
                           f"({', '.join(sorted(frame.loc[bad, 'status'].astype(str).unique()))})")
        frame = frame[~bad]
    frame, beaten = best_lr(frame, _pick(frame, "loss") or "val_loss")
    if beaten:
        dropped.append(f"{beaten} run(s) beaten at the same shape, tokens and seed by another learning rate "
                       "(per-point lr tuning: the best of each point is fitted)")
    n_col, d_col, c_col, loss_col = (_pick(frame, r) for r in ("n", "d", "c", "loss"))
    if n_column is not None:
        if n_column not in frame.columns:
            raise FitError(f"{source}: --n-column {n_column!r} is not a column; columns are "
                           f"{', '.join(map(str, frame.columns))}")
        n_col = n_column
    missing = [f"{what} ({' / '.join(COLUMNS[role])})" for what, role, col in
               (("parameters", "n", n_col), ("loss", "loss", loss_col)) if col is None]
    if d_col is None and c_col is None:
        missing.append("tokens (tokens / D) or compute (compute / C / Training FLOP)")
    if missing:
        raise FitError(f"{source}: no column for {'; '.join(missing)}; "
                       f"columns are {', '.join(map(str, frame.columns))}")
    n = frame[n_col].to_numpy(dtype=float)
    loss = frame[loss_col].to_numpy(dtype=float)
    if d_col is not None:
        d, d_used = frame[d_col].to_numpy(dtype=float), d_col
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            d = frame[c_col].to_numpy(dtype=float) / (FLOPS_PER_PARAM_TOKEN * n)
        d_used = f"{c_col} / 6N"
    if drop_highest_loss:
        if drop_highest_loss < 0 or drop_highest_loss >= len(loss):
            raise FitError(f"--drop-highest-loss {drop_highest_loss}: must be between 0 and {len(loss) - 1} "
                           f"(the table has {len(loss)} runs)")
        keep = np.sort(np.argsort(loss, kind="stable")[:-drop_highest_loss])
        n, d, loss = n[keep], d[keep], loss[keep]
        dropped.append(f"the {drop_highest_loss} highest-loss run(s) (--drop-highest-loss)")
    return RunTable(n, d, loss, source, {"n": n_col, "d": d_used, "loss": loss_col}, dropped)


def read_throughputs(results: Any, n_column: str | None = None) -> list[tuple[float, float]]:
    """(N, tokens/s per worker) of every finished trial in a sweep's results table, N from `n_column` (default:
    the first parameter column, a sweep's non-embedding n_params): what `plan --throughput-from` interpolates."""
    frame, source = read_table(results)
    if "status" in frame.columns:
        frame = frame[frame["status"] == "ok"]
    n_col = n_column or _pick(frame, "n")
    if n_col not in frame.columns:
        raise DataError(f"{source}: no parameter column {n_col or ' / '.join(COLUMNS['n'])!r} to place the "
                        f"throughputs at; columns are {', '.join(map(str, frame.columns))}")
    if "tokens_per_s_per_worker" not in frame.columns:
        raise DataError(f"{source} has no tokens_per_s_per_worker column; --throughput-from reads the "
                        "results.parquet of `python -m app sweep`")
    pairs = [(float(n), float(t)) for n, t in zip(frame[n_col], frame["tokens_per_s_per_worker"])
             if math.isfinite(n) and math.isfinite(t) and n > 0 and t > 0]
    if not pairs:
        raise DataError(f"{source}: no finished trial reports tokens/s; wait for the sweep or resume it")
    return pairs


@dataclass
class FitReport:
    """Approach 3 (the law used for predictions and planning) and the other forms the runs allowed."""

    law: ScalingFit
    kaplan_n: PowerLawFit | None
    kaplan_c: PowerLawFit | None
    isoflop: IsoFlopFit | None
    notes: dict[str, str]  # form -> why it was not fitted
    runs: RunTable
    predictions: list[tuple[float, float]]
    files: list[Path] = field(default_factory=list)
    rerun_checks: list[RerunCheck] = field(default_factory=list)  # --rerun-noise: at each prediction point
    seed_spreads: list[SeedSpread] = field(default_factory=list)  # --seed-spread: at each prediction point

    def to_json(self) -> dict[str, Any]:
        """fit.json: approach 3's keys at the top level (form, params, ci, n_points, predictions, ...), then
        the other forms, the source table and what was left out of it."""
        out = self.law.to_json(predictions=self.predictions)
        out.update({
            "source": self.runs.source,
            "columns": self.runs.columns,
            "dropped": self.runs.dropped,
            "kaplan_n": self.kaplan_n.to_json() if self.kaplan_n else None,
            "kaplan_c": self.kaplan_c.to_json() if self.kaplan_c else None,
            "isoflop": self.isoflop.to_json() if self.isoflop else None,
            "not_fitted": self.notes,
            "rerun_check": [c.to_dict() for c in self.rerun_checks] or None,
            "seed_spread": [s.to_dict() for s in self.seed_spreads] or None,
        })
        return out

    def param_rows(self) -> list[tuple]:
        """(parameter, estimate, ci low, ci high, bootstrap se) for approach 3."""
        se = self.law.se
        return [(k, v, *self.law.ci.get(k, (math.nan, math.nan)), se.get(k, math.nan))
                for k, v in self.law.params.items()]


def _fit_or_note(notes: dict[str, str], form: str, fit_fn):
    try:
        return fit_fn()
    except ValueError as err:
        notes[form] = str(err)
        return None


def run(
    results: Any,
    *,
    out: str | Path | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    predict: Sequence[tuple[float, float]] = (),
    grid: Literal["full", "small"] = "full",
    drop_highest_loss: int = 0,
    rel_tol: float = 0.2,
    plots: bool = True,
    n_column: str | None = None,
    rerun_noise: float | None = None,
    reruns: int = 200,
    seed_spread: bool = False,
) -> FitReport:
    """Fit the runs in `results`; with `out`, write fit.json and the PNGs there (see module docstring).

    With `rerun_noise` (the relative spread of a run's loss between seeds, e.g. 0.007), also check how far the
    prediction would move if the sweep were run again (`ScalingFit.rerun_check`, `reruns` simulated sweeps) at each
    `predict` point, or without any at the compute-optimal size for 10× the largest run's compute. With
    `seed_spread` (runs at several seeds per point), how far apart one-seed sweeps predict the same points
    (`ScalingFit.seed_spread`, `reruns` resamples)."""
    if grid not in GRIDS:
        raise FitError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    if bootstrap < 0:
        raise FitError(f"--bootstrap must be >= 0, got {bootstrap}")
    if rerun_noise is not None and not (math.isfinite(rerun_noise) and 0 < rerun_noise < 1):
        raise FitError(f"--rerun-noise {rerun_noise:g}: the relative spread of a run's final loss between seeds, "
                       "in (0, 1), e.g. 0.007 (re-train a few points at other seeds to measure it)")
    if reruns < 2:
        raise FitError(f"--reruns must be >= 2 simulated sweeps, got {reruns}")
    runs = read_runs(results, drop_highest_loss=drop_highest_loss, n_column=n_column)
    if seed_spread and len(np.unique(np.column_stack([runs.n, runs.d]), axis=0)) == runs.n.size:
        raise FitError(f"--seed-spread: {runs.source}: every point (N, D) has one run; it needs points trained at "
                       "several seeds (a sweep's grid seeds: [0, 1, 2], or the sweep and its re-run at other seeds "
                       "given together)")
    for n_val, d_val in predict:
        if not (n_val > 0 and d_val > 0):
            raise FitError(f"--predict-n/--predict-d must be > 0, got N={n_val:g}, D={d_val:g}")
    try:
        law = fit_chinchilla(runs.n, runs.d, runs.loss, grid=GRIDS[grid], n_bootstrap=bootstrap, seed=seed)
    except ValueError as err:
        raise FitError(f"{runs.source}: {err}") from None
    law.n_column = runs.columns["n"]
    notes: dict[str, str] = {}
    kaplan_boot = min(bootstrap, 200)  # one-variable fits: 200 resamples give stable 95% intervals
    kaplan_n = _fit_or_note(notes, "kaplan_n", lambda: fit_kaplan_n(runs.n, runs.loss, n_bootstrap=kaplan_boot,
                                                                      seed=seed))
    kaplan_c = _fit_or_note(notes, "kaplan_c", lambda: fit_kaplan_c(FLOPS_PER_PARAM_TOKEN * runs.n * runs.d,
                                                                      runs.loss, n_bootstrap=kaplan_boot, seed=seed))
    isoflop = _fit_or_note(notes, "isoflop", lambda: fit_isoflop(runs.n, runs.d, runs.loss, rel_tol=rel_tol))
    report = FitReport(law, kaplan_n, kaplan_c, isoflop, notes, runs, [tuple(map(float, p)) for p in predict])
    points = report.predictions or [ten_x_point(law)]
    if rerun_noise is not None:
        report.rerun_checks = [law.rerun_check(n_val, d_val, noise=rerun_noise, simulations=reruns, seed=seed)
                               for n_val, d_val in points]
    if seed_spread:
        report.seed_spreads = [law.seed_spread(n_val, d_val, resamples=reruns, seed=seed) for n_val, d_val in points]
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fit.json").write_text(json.dumps(finite(report.to_json()), indent=2, allow_nan=False))
        report.files.append(out / "fit.json")
        if plots:
            report.files.extend(law.plot(out, rel_tol=rel_tol))
    return report


def ten_x_point(law: ScalingFit) -> tuple[float, float]:
    """(N_opt, D_opt) for 10× the largest fitted run's compute 6ND: where the extrapolation benchmark trains."""
    n_opt, d_opt, _ = law.frontier(10.0 * float((FLOPS_PER_PARAM_TOKEN * law.n * law.d).max()))
    return float(n_opt), float(d_opt)


def _table_name(results: str | Path) -> str:
    """A sweep folder's name for the folder or its results.parquet/.csv, else the file's stem."""
    path = Path(results)
    if path.is_file() and path.stem == "results" and (path.parent / "sweep.json").is_file():
        return path.parent.name
    return path.name if path.is_dir() else path.stem


def default_out(results: Any) -> Path | None:
    """Where `python -m app fit RESULTS` writes by default: `fit/` inside a sweep folder, else runs/fits/<name>
    (several tables: runs/fits/<name>+<name>..., a sweep folder named by the folder)."""
    if isinstance(results, (list, tuple)) and len(results) == 1:
        results = results[0]
    if isinstance(results, (list, tuple)) and all(isinstance(r, (str, Path)) for r in results):
        return Path("runs/fits") / "+".join(map(_table_name, results))
    if not isinstance(results, (str, Path)):
        return None
    path = Path(results)
    folder = path if path.is_dir() else path.parent
    return folder / "fit" if (folder / "sweep.json").is_file() else Path("runs/fits") / path.stem


def main(argv=None) -> int:
    import sys

    from app.__main__ import main as app_main

    return app_main(["fit", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
