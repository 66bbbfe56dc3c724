"""Scaling sweeps: a Ray Tune Tuner whose trials each train one model, start to finish, with the project's trainer.

    python -m app sweep tune_configs/smoke.yaml [--out DIR]
    python -m app sweep tune_configs/smoke.yaml --reseed 1 2   # its points at seeds 1, 2 → runs/sweeps/smoke-seeds

Each Tune trial is a function trainable that calls `pipelines.train.run(cfg)`: a Ray Train TorchTrainer started
inside the trial, which is how Ray's Train/Tune guide runs distributed training under Tune (the trial only drives;
its Train workers hold the CPUs/GPUs). A one-worker trial — the usual small-model sweep — trains in the trial's own
process instead (Ray Train's local mode; the trial holds the worker's CPUs/GPU): no controller or worker actor to
start, which on 2 cores takes a small trial from ~1 minute to ~13 s. A trial trains its whole cosine schedule (steps
from its token budget, no early stopping) and reports the final validation loss, N (non-embedding parameters), D
(tokens), C = 6ND and the model's own FLOPs. The sweep folder holds:

    sweep.json              the validated sweep and its trial list (a resumed sweep must match it)
    results.parquet / .csv  one row per trial (status, N, D, C, losses, wall time)
    tune/                   Ray Tune's experiment (Tuner.restore resumes it)
    trials/<trial>/         each trial's training run: checkpoint, summary.json, history.csv, artifact

Running the same command again resumes an interrupted sweep: finished trials are kept, unfinished and errored ones
run again (and a trial whose training had finished but was not yet recorded reuses its summary.json).

`--reseed SEED ...` trains a finished sweep's points again at other seeds, each at the lr factor the sweep chose for
it (`app.sweep_config.plan_reseed`), into its own folder (default runs/sweeps/NAME-seeds; `--from DIR` names the
finished sweep when it is not at runs/sweeps/NAME). `python -m app fit A A-seeds --seed-spread` then shows how far
apart one-seed sweeps of the design predict.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import TrainConfig, parse_workers
from app.errors import ConfigError
from app.sweep_config import (
    SweepConfig,
    TrialSpec,
    base_config,
    load_sweep,
    plan_reseed,
    plan_trials,
    total_model_flops,
)

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
# A multi-worker trial's driver only waits on its TorchTrainer; it reserves a little memory instead of a CPU (Tune
# needs a non-empty resource request), so a trial's CPUs all go to its Train workers.
TRIAL_DRIVER_MEMORY = 256 * 2**20
COLUMNS = ["trial", "status", "n_layer", "d_model", "n_head", "seed", "lr", "lr_factor", "steps", "tokens",
           "n_params", "n_params_total", "flops_per_token", "compute", "model_flops", "val_loss", "train_loss",
           "tokens_per_s_per_worker", "wall_s", "budget", "error"]


@dataclass
class SweepResult:
    """A finished (or interrupted) sweep: one DataFrame row per trial and where everything is on disk."""

    name: str
    sweep_dir: Path
    df: Any  # pandas.DataFrame with COLUMNS; status is ok, error or pending
    results_parquet: Path
    results_csv: Path
    wall_s: float
    resumed: bool

    @property
    def ok(self):
        return self.df[self.df["status"] == "ok"]

    @property
    def best(self):
        """Finished trials, one per point: with lr.factors, each shape × budget × seed's lowest-loss run (what a fit
        uses); otherwise the same rows as `ok`."""
        from pipelines.fit_scaling import best_lr

        return best_lr(self.ok)[0]

    @property
    def failed(self):
        return self.df[self.df["status"] != "ok"]

    def rows(self) -> list[tuple]:
        """(trial, N, D, C, val loss, wall seconds, status) per trial, for a summary table."""
        cols = ["trial", "n_params", "tokens", "compute", "val_loss", "wall_s", "status"]
        return [tuple("" if _isnan(v) else v for v in r) for r in self.df[cols].itertuples(index=False)]

    def _repr_html_(self) -> str:
        from app.console import html_table

        return html_table(["trial", "N", "D", "C", "val_loss", "wall_s", "status"], self.rows())

    def plot(self, ax=None):
        """Validation loss against training compute C = 6ND, one line per model size, finished trials only (each
        point's best lr, `best`); on `ax`, or on a new figure's. Returns the Axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        for n_params, trials in self.best.sort_values("compute").groupby("n_params"):
            ax.plot(trials["compute"], trials["val_loss"], "o-", label=f"N = {n_params:,.0f}")
        ax.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="validation loss", title=self.name)
        ax.legend()
        return ax


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


# --------------------------------------------------------------------------------------------------------------
# Trial side (runs in a Tune trial actor)


def _trial_name(trial) -> str:
    """Tune trial and folder name: the sweep's own trial name (module-level: Tune pickles it for restore)."""
    return trial.config["trial"]


def _train_or_reuse(cfg: TrainConfig) -> dict[str, Any]:
    """Train cfg to the end, or return the summary of a run that already finished (an interrupted sweep)."""
    from app.checkpoint import latest_complete, storage_fs
    from pipelines import train

    summary_path = Path(cfg.storage) / cfg.name / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    fs, root = storage_fs(cfg.storage)
    found = latest_complete(fs, f"{root}/{cfg.name}")
    if found and found.step >= cfg.steps:  # trained to the end, stopped before its summary: redo (short) from 0
        shutil.rmtree(Path(cfg.storage) / cfg.name)
    return train.run(cfg, progress=False, in_process=parse_workers(cfg.parallel.workers) == (1, 1)).summary


def _trial(config: dict, specs: dict[str, dict]) -> None:
    """Tune function trainable: one whole training run, reported once at the end."""
    from ray import tune

    spec = specs[config["trial"]]
    cfg = TrainConfig.model_validate(spec["cfg"])
    summary = _train_or_reuse(cfg)
    world = (summary.get("world_sizes") or [cfg.parallel.workers])[-1]
    tune.report({
        **spec["row"],
        "val_loss": summary["final_val_loss"],
        "train_loss": summary["final_loss"],
        "tokens": summary["tokens"],  # what was trained; equals the planned D
        "steps": summary["steps"],
        "tokens_per_s_per_worker": summary["tokens_per_s"] / max(1, int(world)),
        "wall_s": summary["wall_s"],
    })


# --------------------------------------------------------------------------------------------------------------
# Driver side


def _trial_resources(sweep: SweepConfig, use_gpu: bool) -> dict[str, float]:
    r = sweep.resources
    if r.workers == 1:  # trains in the trial's own process: the trial holds what its one worker would
        return {"CPU": r.cpus_per_worker + r.trial_cpus, **({"GPU": 1} if use_gpu else {})}
    return {"CPU": r.trial_cpus} if r.trial_cpus > 0 else {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}


def _check_same_sweep(sweep_dir: Path, record: dict) -> None:
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    key = lambda rec: [(t["name"], t["config_hash"]) for t in rec["trials"]]  # noqa: E731
    if key(old) != key(record):
        raise ConfigError(f"{sweep_dir} holds a different sweep ({old['sweep']['name']}, {len(old['trials'])} trials, "
                          "other settings); pass another --out or delete that folder to start over")


def _count_done(sweep_dir: Path, names: list[str], since: float) -> tuple[int, int]:
    """(finished, errored) trials, read from disk so that trials finished before a resume count too; an error
    counts only if written after `since` (an errored trial being retried is not done)."""
    ok = errored = 0
    for name in names:
        if (sweep_dir / TRIALS_DIR / name / "summary.json").is_file():
            ok += 1
        else:
            error = sweep_dir / TUNE_DIR / name / "error.txt"
            errored += error.is_file() and error.stat().st_mtime >= since
    return ok, errored


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _results_frame(trials: list[TrialSpec], grid) -> Any:
    import pandas as pd

    by_name: dict[str, Any] = {}
    for result in grid:
        name = (result.config or {}).get("trial")
        if name is not None:
            by_name[name] = result
    rows = []
    for t in trials:
        row = {**t.row(), "status": "pending", "val_loss": math.nan, "train_loss": math.nan,
               "tokens_per_s_per_worker": math.nan, "wall_s": math.nan, "error": ""}
        result = by_name.get(t.name)
        metrics = result.metrics if result is not None else None
        if metrics and metrics.get("val_loss") is not None:
            row.update({k: metrics[k] for k in ("val_loss", "train_loss", "tokens", "steps",
                                                "tokens_per_s_per_worker", "wall_s")})
            row["status"] = "ok"
        elif result is not None and result.error is not None:
            row["status"] = "error"
            row["error"] = str(result.error).strip().splitlines()[-1][:300] if str(result.error).strip() else \
                type(result.error).__name__
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["compute"] = 6.0 * df["n_params"] * df["tokens"]  # C = 6ND on the tokens actually trained
    df["model_flops"] = df["flops_per_token"] * df["tokens"]
    return df


def run(sweep: SweepConfig | str | Path, out: str | Path | None = None, *, overrides: list[str] | tuple = (),
        num_cpus: int | None = None, reseed: list[int] | tuple = (), reseed_from: str | Path | None = None
        ) -> SweepResult:
    """Run (or resume) a sweep on Ray (embedded, or the cluster at RAY_ADDRESS); returns a SweepResult. With
    `reseed`, train the points of the finished sweep at `reseed_from` (default runs/sweeps/NAME) again at those
    seeds instead (`plan_reseed`), into `out` (default runs/sweeps/NAME-seeds)."""
    import ray
    from ray import tune

    from app.console import err_console, progress_bar, short_path
    from pipelines.ray_session import ray_session
    from pipelines.train import _ensure_data, _use_gpu

    if not isinstance(sweep, SweepConfig):
        sweep = load_sweep(sweep)
    name = f"{sweep.name}-seeds" if reseed else sweep.name
    sweep_dir = Path(out or f"runs/sweeps/{name}").resolve()
    base = base_config(sweep, list(overrides))
    data_dir = Path(base.data.dir).resolve()
    trial_overrides = [*overrides, f"data.dir={json.dumps(str(data_dir))}"]
    record: dict[str, Any] = {"sweep": sweep.model_dump(mode="json"), "overrides": list(overrides)}
    if reseed:
        source = Path(reseed_from or f"runs/sweeps/{sweep.name}").resolve()
        if source == sweep_dir:
            raise ConfigError(f"--reseed writes a new sweep folder, not into the finished sweep {short_path(source)}; "
                              "pass another --out")
        trials = plan_reseed(sweep, _finished_results(source, sweep.name), list(reseed), trial_overrides,
                             storage=str(sweep_dir / TRIALS_DIR))
        record["reseed"] = {"of": str(source), "seeds": list(reseed)}
    else:
        trials = plan_trials(sweep, trial_overrides, storage=str(sweep_dir / TRIALS_DIR))
    names = [t.name for t in trials]
    specs = {t.name: {"cfg": t.cfg.model_dump(), "row": t.row()} for t in trials}
    record["trials"] = [{"name": t.name, "config_hash": t.cfg.config_hash(), **t.row()} for t in trials]
    _check_same_sweep(sweep_dir, record)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps(record, indent=2))

    grid = sweep.grid
    if reseed:
        err_console.print(f"sweep {name}: the {len(trials) // len(reseed)} points of {short_path(source)} at seeds "
                          f"{', '.join(map(str, reseed))}, each at the lr factor it chose")
    elif left_out := (len(grid.shapes) * len(grid.budgets) * len(grid.seeds or [0]) * len(sweep.lr.factors)
                      - len(trials)):
        err_console.print(f"sweep {sweep.name}: {left_out} trials left out (fewer than "
                          f"grid.min_steps={grid.min_steps} steps)")
    err_console.print(f"sweep {name}: {len(trials)} trials, N {min(t.n_params for t in trials):,}–"
                      f"{max(t.n_params for t in trials):,}, D {min(t.tokens for t in trials):,}–"
                      f"{max(t.tokens for t in trials):,} tokens, {total_model_flops(trials):.3g} model FLOPs → "
                      f"{short_path(sweep_dir)}")
    t_start = time.perf_counter()
    with ray_session(num_cpus):
        _ensure_data(base.model_copy(update={"data": base.data.model_copy(update={"dir": str(data_dir)})}),
                     data_dir, num_cpus)
        concurrency = sweep.trials_per_round(ray.cluster_resources().get("CPU", 1))
        trainable = tune.with_resources(tune.with_parameters(_trial, specs=specs),
                                        _trial_resources(sweep, _use_gpu(base)))
        tune_path = sweep_dir / TUNE_DIR
        resumed = tune.Tuner.can_restore(str(tune_path))
        if resumed:
            # Finished trials stay finished; errored ones start again (their training resumes from its own
            # checkpoints, as train.run does for any run name that has them).
            tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True,
                                       restart_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(names)},
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, trial_name_creator=_trial_name,
                                            trial_dirname_creator=_trial_name),
                run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(sweep_dir), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        # Our progress bar replaces Tune's status tables; its experiment state still goes to tune/.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        outcome: dict[str, Any] = {}

        def fit() -> None:
            try:
                outcome["grid"] = tuner.fit()
            except BaseException as err:  # surfaced on the driver thread below
                outcome["error"] = err

        since = time.time()
        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        done_before = sum(_count_done(sweep_dir, names, since))
        title = f"sweep {name}" + (" (resumed)" if resumed else "")
        with progress_bar(title, total=len(trials), eta=False) as bar:
            bar.update(completed=done_before)
            t_poll = time.perf_counter()
            while thread.is_alive():
                thread.join(timeout=1.0)
                ok, errored = _count_done(sweep_dir, names, since)
                done = ok + errored
                status = f"{errored} failed · " if errored else ""
                if done > done_before and done < len(trials):
                    rate = (time.perf_counter() - t_poll) / (done - done_before)
                    status += f"ETA {_format_eta(rate * (len(trials) - done))}"
                bar.update(completed=done, status=status)
        if "error" in outcome:
            raise outcome["error"]
        grid = outcome["grid"]

    df = _results_frame(trials, grid)
    results_parquet, results_csv = sweep_dir / "results.parquet", sweep_dir / "results.csv"
    df.to_parquet(results_parquet, index=False)
    df.to_csv(results_csv, index=False)
    return SweepResult(name, sweep_dir, df, results_parquet, results_csv, time.perf_counter() - t_start, resumed)


def _finished_results(source: Path, name: str) -> Any:
    """The results table of the finished sweep `--reseed` starts from."""
    import pandas as pd

    path = source / "results.parquet"
    if not path.is_file():
        raise ConfigError(f"--reseed: no finished sweep at {source} (no results.parquet); run `python -m app sweep` "
                          f"for {name} first, or pass --from DIR")
    return pd.read_parquet(path)


def main(argv=None) -> int:
    import sys

    from app.__main__ import main as app_main

    return app_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
