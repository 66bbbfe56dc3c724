"""Scaling-law extrapolation: fit small runs, plan a run ~10× bigger than any of them, train it, compare.

    python benchmarks/scaling_extrapolation.py                 # scaling_small.yaml: ~1 hour on 2 cores
    python benchmarks/scaling_extrapolation.py --quick         # smoke-sized: proves the pipeline, claims nothing

1. Run the sweep (tune_configs/scaling_small.yaml; resumed if its folder already has results).
2. Fit approach 3 (app/scaling.py, with a bootstrap) on the trials with compute C = 6ND ≤ C_max (default: the
   sweep's largest C, so every trial is used), N counted as --params says (non-embedding by default). Beside it, a
   backtest for each count: fitted on every budget but the sweep's largest, how well it predicts that one.
3. Plan C_target = factor × C_max with the planner (app/costs.py): N_opt and D_opt from the fit, wall time from the
   tokens/s the trained shape should reach (costs.throughput_at: the FLOP/s the sweep's trials achieved,
   interpolated between the sizes around it) and the checkpoint time the sweep measured.
4. Train the model shape nearest N_opt (the sweep's head size and width/depth ratio, D = C_target / 6N) with the
   sweep's own settings: preset, overrides, lr rule, warmup, resources.
5. Report |predicted − achieved| / achieved validation loss (goal ≤ 2%; ~4% is the best published practice) and
   the planner's wall time against the measured one (goal within 15%); beside approach 3, the prediction of
   Kaplan's L(C) fitted through the same trials' compute-efficient envelope. With --rerun-noise SIGMA, how far seed
   noise alone would move the prediction (ScalingFit.rerun_check: the law as exact, the sweep re-drawn 200 times).
   With --seeds-from DIR (the sweep's points at other seeds: `python -m app sweep SWEEP --reseed 1 2`), what
   one-seed sweeps of this design predict for the same run (ScalingFit.seed_spread) and how many land within 2 %
   of what it achieved.

Prints a table and writes benchmarks/results/scaling_extrapolation.json (…_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# Which parameter count N the law is fitted on: the column of the sweep's results, and TrialSpec's attribute.
PARAMS = {"non-embedding": "n_params", "total": "n_params_total"}


def candidate_shapes(sweep, n_target: float, base, params: str = "non-embedding") -> list:
    """Shapes in the sweep's family (its head size, width/depth within 2× of its median ratio), nearest N first
    (N counted as `params`)."""
    from app.sweep_config import Shape

    head = statistics.median(s.d_model // s.n_head for s in sweep.grid.shapes)
    ratio = statistics.median(s.d_model / s.n_layer for s in sweep.grid.shapes)
    shapes = []
    for n_layer in range(1, 33):
        for d_model in range(int(head), 4097, int(head)):
            if ratio / 2 <= d_model / n_layer <= ratio * 2:
                shapes.append(Shape(n_layer=n_layer, d_model=d_model, n_head=d_model // int(head)))

    # closed form first (cheap), exact count on the few nearest (the model builds on the meta device)
    embedding = 0 if params == "non-embedding" else base.model.vocab_size + base.model.seq_len  # wte, wpe rows
    approx = sorted(shapes, key=lambda s: abs(math.log((s.n_layer * 12 * s.d_model + embedding) * s.d_model
                                                       / n_target)))[:12]
    return sorted(approx, key=lambda s: abs(math.log(shape_size(base, s, params) / n_target)))


def shape_size(base, shape, params: str) -> int:
    """N of `base` with `shape`'s model, counted as `params` (built on the meta device)."""
    from app.sweep_config import model_size

    tree = base.model_dump()
    tree["model"].update(n_layer=shape.n_layer, d_model=shape.d_model, n_head=shape.n_head)
    return model_size(type(base).model_validate(tree))[0 if params == "non-embedding" else 1]


def backtest(ok, col: str, grid) -> dict:
    """Fit approach 3 (N from column `col`) on every budget but the sweep's largest and predict that budget's
    points (each shape × budget's best-lr run): mean and max absolute relative error. The target run plays no part
    in it."""
    from app.scaling import fit_chinchilla, group_by_compute

    compute = ok["compute"].to_numpy()
    groups = group_by_compute(compute)  # the grid's budgets, as the sweep planned them
    top = groups == groups[int(compute.argmax())]
    train, test = ok[~top], ok[top]
    law = fit_chinchilla(train[col], train["tokens"], train["val_loss"], grid=grid, n_bootstrap=0, seed=0)
    predicted = law.predict(test[col].to_numpy(dtype=float), test["tokens"].to_numpy(dtype=float))[0]
    err = abs(predicted - test["val_loss"].to_numpy()) / test["val_loss"].to_numpy()
    return {"fitted": int(len(train)), "predicted": int(len(test)), "mean_error": float(err.mean()),
            "max_error": float(err.max()), "params": {k: float(v) for k, v in law.params.items()}}


def seed_runs(points, seeds, col: str, c_max: float):
    """The runs of `seeds` (the sweep's points re-trained at other seeds, e.g. a --reseed folder's results) that
    finished with C = 6ND <= c_max (N from `col`). Raises ValueError for one at no point of `points`: checked
    before the target trains."""
    from app.scaling import FLOPS_PER_PARAM_TOKEN

    seeds = seeds[seeds["status"] == "ok"] if "status" in seeds.columns else seeds
    seeds = seeds[FLOPS_PER_PARAM_TOKEN * seeds[col] * seeds["tokens"] <= c_max * (1 + 1e-9)]
    known = set(zip(points[col], points["tokens"]))
    strays = [(a, b) for a, b in zip(seeds[col], seeds["tokens"]) if (a, b) not in known]
    if strays:
        raise ValueError(f"--seeds-from: {len(strays)} run(s) at no point of the sweep (first: N={strays[0][0]:g}, "
                         f"D={strays[0][1]:g}); pass the sweep's --reseed folder")
    return seeds


def seed_spread_check(points, seeds, col: str, n: float, d: float, achieved: float, grid,
                      resamples: int = 200) -> dict:
    """The sweep's fitted points (each point's best-lr run) and `seeds` (from `seed_runs`) fitted together;
    `resamples` one-seed sweeps drawn from them (`ScalingFit.seed_spread`) predict (n, d): how many land within
    2 % of `achieved`."""
    import numpy as np
    import pandas as pd

    from app.scaling import fit_chinchilla

    both = pd.concat([points[[col, "tokens", "val_loss"]], seeds[[col, "tokens", "val_loss"]]], ignore_index=True)
    law = fit_chinchilla(both[col], both["tokens"], both["val_loss"], grid=grid, n_bootstrap=0, seed=0)
    spread = law.seed_spread(n, d, resamples=resamples, seed=0)
    return {**spread.to_dict(), "runs": int(len(both)), "achieved": achieved,
            "pooled_error": abs(spread.pooled - achieved) / achieved,
            "median_error": float(np.median(np.abs(spread.predictions / achieved - 1))),
            "within_2pct_of_achieved": spread.within(achieved, 0.02)}


def target_lr_factor(points, n_params: float, col: str = "n_params") -> float:
    """The lr factor (lr.factors) to train the target at: the one that won, at the sweep's largest budget it was
    trained on, for the sweep size nearest `n_params` (the longest runs are the most like the target's). 1.0 for a
    sweep without factors."""
    if "lr_factor" not in points.columns:
        return 1.0
    nearest = min(points[col].unique(), key=lambda n: abs(math.log(n / n_params)))
    rows = points[points[col] == nearest]
    return float(rows.loc[rows["compute"].idxmax(), "lr_factor"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default=str(REPO / "tune_configs" / "scaling_small.yaml"))
    parser.add_argument("--out", help="sweep folder (default: runs/sweeps/NAME)")
    parser.add_argument("--c-max", type=float, help="fit on trials with C = 6ND <= this (default: all trials)")
    parser.add_argument("--factor", type=float, default=10.0, help="C_target = factor × C_max (default 10)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--quick", action="store_true",
                        help="smoke sweep, factor 3, small fitting grid: checks the pipeline in ~7 minutes")
    parser.add_argument("--params", choices=[*PARAMS, "auto"], default="non-embedding",
                        help="the parameter count N the law is fitted on and C = 6ND counts: non-embedding "
                             "(default; Kaplan's, the sweep grid's), total (Chinchilla's: embeddings and the tied "
                             "output head counted once), or auto: whichever backtest predicts better")
    parser.add_argument("--lr-factor", type=float,
                        help="train the target at this multiple of the sweep's lr rule instead of the factor the "
                             "sweep chose (lr.factors: the one its nearest size won on its largest budget)")
    parser.add_argument("--rerun-noise", type=float, metavar="SIGMA",
                        help="also report how far the target's prediction would move if the sweep were run again "
                             "with this relative loss spread per run (between seeds; 0.007 measured here): the law "
                             "taken as exact, 200 simulated sweeps refitted (ScalingFit.rerun_check)")
    parser.add_argument("--seeds-from", metavar="DIR",
                        help="the sweep's points re-trained at other seeds (python -m app sweep SWEEP --reseed 1 2): "
                             "also report what one-seed sweeps of this design predict for the target, and how "
                             "many land within 2%% of what it achieved (ScalingFit.seed_spread)")
    parser.add_argument("--num-cpus", type=int)
    args = parser.parse_args()
    if args.lr_factor is not None and not args.lr_factor > 0:
        parser.error(f"--lr-factor {args.lr_factor:g}: must be > 0 (a multiple of the sweep's lr rule, e.g. 1)")
    seeds_table = None
    if args.seeds_from is not None:
        from app.errors import DataError
        from pipelines.fit_scaling import read_table

        try:
            seeds_table = read_table(args.seeds_from)[0]
        except DataError as err:
            parser.error(f"--seeds-from: {err}")
    if args.rerun_noise is not None and not 0 < args.rerun_noise < 1:
        parser.error(f"--rerun-noise {args.rerun_noise:g}: the relative spread of a run's loss between seeds, in "
                     "(0, 1), e.g. 0.007")

    from app import costs
    from app.console import print_table
    from app.jsonsafe import finite
    from app.scaling import BESIROGLU_GRID, FLOPS_PER_PARAM_TOKEN, SMALL_GRID, fit_chinchilla, fit_kaplan_c
    from app.sweep_config import base_config, load_sweep, make_trial
    from pipelines import sweep as sweep_pipeline
    from pipelines.fit_scaling import best_lr
    from pipelines.ray_session import ray_session

    if args.quick:
        args.sweep = str(REPO / "tune_configs" / "smoke.yaml")
        args.factor = 3.0 if args.factor == 10.0 else args.factor
        args.bootstrap = min(args.bootstrap, 200)
    sweep = load_sweep(args.sweep)
    t_begin = time.perf_counter()
    with ray_session(args.num_cpus):
        # 1. the sweep
        result = sweep_pipeline.run(sweep, args.out)
        ok = result.ok
        points, beaten = best_lr(ok)  # lr.factors: each point's best run is the one fitted
        if len(points) < 5:
            print(f"error: only {len(points)} points finished; approach 3 needs 5", file=sys.stderr)
            return 1

        # 2. which N to count (a backtest inside the sweep), then fit on C <= C_max
        grid = SMALL_GRID if args.quick else BESIROGLU_GRID
        try:
            backtests = {name: backtest(points, col, grid) for name, col in PARAMS.items()}
        except ValueError as err:  # too few trials below the largest budget (the smoke sweep)
            print(f"no backtest: {err}", file=sys.stderr)
            backtests = {}
        params = args.params
        if params == "auto":
            params = min(backtests, key=lambda k: backtests[k]["mean_error"]) if backtests else "non-embedding"
        col = PARAMS[params]
        compute = FLOPS_PER_PARAM_TOKEN * points[col] * points["tokens"]  # C = 6ND, N counted as the fit counts it
        c_max = args.c_max or float(compute.max())
        in_fit = compute <= c_max * (1 + 1e-9)
        fitted, held_out = points[in_fit], points[~in_fit]
        if seeds_table is not None:
            try:
                seeds_table = seed_runs(fitted, seeds_table, col, c_max)
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
        t0 = time.perf_counter()
        law = fit_chinchilla(fitted[col], fitted["tokens"], fitted["val_loss"], grid=grid,
                             n_bootstrap=args.bootstrap, seed=0)
        fit_s = time.perf_counter() - t0
        # A second, simpler predictor from the same trials: Kaplan's L(C) through the compute-efficient envelope.
        kaplan = fit_kaplan_c(compute[in_fit], fitted["val_loss"], n_bootstrap=args.bootstrap, seed=0)

        # 3. plan C_target with the throughput the sweep measured
        c_target = args.factor * c_max
        n_opt, d_opt, _ = law.frontier(c_target)
        data_dir = Path(base_config(sweep).data.dir).resolve()  # as the sweep's trials saw it
        base = base_config(sweep, [f"data.dir={json.dumps(str(data_dir))}"])
        shape = candidate_shapes(sweep, n_opt, base, params)[0]
        seed = (sweep.grid.seeds or [base.seed])[0]
        n_shape = shape_size(base, shape, params)
        lr_factor = args.lr_factor or target_lr_factor(fitted, n_shape, col)
        trial = make_trial(sweep, base, shape, seed, tokens=c_target / (FLOPS_PER_PARAM_TOKEN * n_shape),
                           storage=str(result.sweep_dir / "extrapolation"), lr_factor=lr_factor,
                           name=f"target-{shape.label}-C{c_target:.1e}".replace("+", "")
                           + (f"-x{lr_factor:g}" if len(sweep.lr.factors) > 1 or args.lr_factor else ""))
        n_trial = getattr(trial, col)
        # the trained shape's tokens/s from the FLOP/s the sweep's trials achieved at the sizes around it
        tps = costs.throughput_at(trial.flops_per_token,
                                  list(zip(ok["flops_per_token"], ok["tokens_per_s_per_worker"])))
        save_s = statistics.median(_ledger(result.sweep_dir, name).get("checkpoint_s", 1.0) for name in ok["trial"])
        local = {"local": costs.InstanceType("local", on_demand_usd_per_hour=1.0, spot_discount=0.0, gpus=0,
                                              peak_tflops_per_worker=0.1)}
        plan = costs.plan_training(law, instance="local", compute_flops=c_target, workers=sweep.resources.workers,
                                   tokens_per_second_per_worker=tps, throughput_measured_at_params=float(n_trial),
                                   save_seconds=max(save_s, 0.1), prices=local)
        # The planner rescales tps from n_trial to N_opt at constant FLOP/s, so its hours are the trained shape's own:
        # D_opt / (tps × n_trial / N_opt) = C / (6 n_trial tps) = D_trial / tps.
        planned_wall_s = plan.wall_hours * 3600.0
        predicted, lo, hi = law.predict(n_trial, trial.tokens)
        c_trial = FLOPS_PER_PARAM_TOKEN * n_trial * trial.tokens  # C of the shape trained, N counted as the fit's
        k_predicted, k_lo, k_hi = kaplan.predict(c_trial)
        rerun = (law.rerun_check(n_trial, trial.tokens, noise=args.rerun_noise)
                 if args.rerun_noise is not None else None)

        # 4. train it
        from app.data import read_manifest

        epochs = trial.tokens / read_manifest(Path(trial.cfg.data.dir)).tokens("train")
        print(f"target: {shape.label}, N={n_trial:,} ({params}), D={trial.tokens:,} ({trial.steps:,} steps, lr "
              f"{trial.lr:.3g}, {epochs:.1f} epochs of the data), C={c_trial:.3g}; planner says "
              f"{planned_wall_s:,.0f} s", file=sys.stderr)
        summary = sweep_pipeline._train_or_reuse(trial.cfg)

    achieved = float(summary["final_val_loss"])
    loss_err = abs(predicted - achieved) / achieved
    spread = (seed_spread_check(fitted, seeds_table, col, n_trial, trial.tokens, achieved, grid)
              if seeds_table is not None else None)
    k_err = abs(k_predicted - achieved) / achieved
    wall_err = (planned_wall_s - summary["wall_s"]) / summary["wall_s"]
    productive_s = summary["ledger"]["productive_s"]
    held = [(r.trial, r.val_loss, law.predict(getattr(r, col), r.tokens)[0]) for r in held_out.itertuples()]
    rows = [(f"backtest, N {name}", f"fit on {b['fitted']} points below the largest budget, its {b['predicted']}: "
                                    f"mean error {b['mean_error']:.2%} (max {b['max_error']:.2%})")
            for name, b in backtests.items()]
    rows += [
        ("sweep", f"{sweep.name}: {len(ok)} trials ok, fitted on {len(fitted)} points with C ≤ {c_max:.3g} "
                  f"(C = 6ND, N {params})" + (f"; each point's best lr ({beaten} runs beaten)" if beaten else "")),
        ("fit (approach 3)", ", ".join(f"{k}={v:.4g}" for k, v in law.params.items())),
        ("C_target = factor × C_max", f"{c_target:.3g} ({args.factor:g}×)"),
        ("planner N_opt, D_opt", f"{n_opt:,.0f}, {d_opt:,.0f}"),
        ("trained shape, N, D, lr", f"{shape.label}, {n_trial:,}, {trial.tokens:,}, {trial.lr:.3g}" + (
            f" (non-embedding N {trial.n_params:,}: C = {trial.compute:.3g})" if params != "non-embedding" else "")),
        ("predicted val loss", f"{predicted:.4f} [{lo:.4f}, {hi:.4f}]"),
        ("achieved val loss", f"{achieved:.4f}"),
        ("abs relative error (goal ≤ 2%)", f"{loss_err:.2%}"),
        *([("re-run check of the prediction", f"the law as exact, each run's loss ±{rerun.noise:.2%}: refits land "
                                               f"{rerun.median_abs_error:.2%} off (median), {rerun.p90_abs_error:.2%} "
                                               f"(90th pct); within 2% in {rerun.within:.0%} of "
                                               f"{rerun.errors.size} sweeps")] if rerun else []),
        *([("one-seed sweeps (--seeds-from)", f"{spread['resamples']} drawn from {spread['runs']} runs "
                                               f"({spread['replicated_points']} of {spread['points']} points at 2+ "
                                               f"seeds): median {spread['median']:.4f}, 90% in "
                                               f"[{spread['interval_90'][0]:.4f}, {spread['interval_90'][1]:.4f}]"),
           ("one-seed sweeps within 2%", f"{spread['within_2pct_of_achieved']:.1%} (median error "
                                         f"{spread['median_error']:.2%}; all runs fitted as one: "
                                         f"{spread['pooled_error']:.2%})")] if spread else []),
        ("Kaplan L(C) (envelope) predicted", f"{k_predicted:.4f} [{k_lo:.4f}, {k_hi:.4f}]: "
                                             f"alpha_C={kaplan.params['alpha_C']:.4f}"),
        ("Kaplan L(C) abs relative error", f"{k_err:.2%}"),
        ("planner wall s / measured wall s", f"{planned_wall_s:,.0f} / {summary['wall_s']:,.0f} "
                                             f"(productive {productive_s:,.0f})"),
        ("wall-time error (goal within 15%)", f"{wall_err:+.1%}"),
    ]
    rows += [(f"held out: {name}", f"pred {pred:.4f} vs {loss:.4f} ({abs(pred - loss) / loss:.2%})")
             for name, loss, pred in held]
    rows += [("fit / plan warning", w) for w in plan.warnings]  # the diagnostics of `fit` and `plan` (README)
    print_table(f"scaling extrapolation{' (quick: smoke-sized, measures nothing)' if args.quick else ''}",
                ["quantity", "value"], rows)

    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"scaling_extrapolation{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(finite({
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "quick": args.quick, "sweep": str(args.sweep), "sweep_dir": str(result.sweep_dir),
        "params": params, "params_column": col, "backtests": backtests,
        "trials_ok": len(ok), "runs_beaten_by_another_lr": beaten, "points_fitted": len(fitted), "c_max": c_max,
        "factor": args.factor,
        "c_target": c_target, "fit": law.to_json(), "fit_seconds": fit_s,
        "plan": plan.to_dict(), "planned_wall_s": planned_wall_s,
        "target": {**trial.row(), "epochs": epochs, "lr_factor_from": "--lr-factor" if args.lr_factor else "sweep"},
        "predicted_loss": predicted, "predicted_interval": [lo, hi], "achieved_loss": achieved,
        "abs_relative_error": loss_err,
        "rerun_check": rerun.to_dict() if rerun else None,
        "seed_spread": {**spread, "seeds_from": args.seeds_from} if spread else None,
        "kaplan_c": {"fit": kaplan.to_json(), "predicted_loss": k_predicted, "predicted_interval": [k_lo, k_hi],
                     "abs_relative_error": k_err},
        "measured_wall_s": summary["wall_s"], "productive_s": productive_s,
        "wall_time_relative_error": wall_err,
        "held_out": [{"trial": n, "loss": loss, "predicted": p} for n, loss, p in held],
        "benchmark_seconds": time.perf_counter() - t_begin,
    }), indent=2, default=float, allow_nan=False))  # strict JSON: an infinite bootstrap spread becomes null
    print(f"wrote {path}")
    return 0


def _ledger(sweep_dir: Path, name: str) -> dict:
    path = sweep_dir / "trials" / name / "summary.json"
    return json.loads(path.read_text()).get("ledger", {}) if path.is_file() else {}


if __name__ == "__main__":
    raise SystemExit(main())
