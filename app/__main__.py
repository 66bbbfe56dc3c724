"""`python -m app <command>`: a table of subcommands; each parses → validates → calls one SDK function → prints.

A user mistake ends with one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from app.errors import UserError


def _add_preset(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--preset", default=default, help=f"preset name or YAML path (default: {default})")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)",
    )


# ---- prepare-data --------------------------------------------------------------------------------------------


def _prepare_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source", dest="sources", action="append", metavar="SOURCE",
        help="stdlib, site-packages, pydoc, a file/folder (.txt/.jsonl/.parquet), or a URI; prefix DOMAIN= to label "
        "it (repeatable; default: the preset's data.sources)",
    )
    p.add_argument("--out", help="output folder (default: the preset's data.dir)")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default: the preset's model.vocab_size)")
    p.add_argument("--max-documents", type=int, help="keep at most N documents per source")
    p.add_argument("--force", action="store_true", help="replace whatever is in --out")
    p.add_argument("--num-cpus", type=int, help="CPUs for embedded Ray (default: all)")
    _add_preset(p, "base")


def _prepare_data(args: argparse.Namespace) -> int:
    from app import sdk
    from app.console import print_table

    result = sdk.prepare_data(
        args.sources, args.out, preset=args.preset, overrides=args.overrides, vocab_size=args.vocab_size,
        max_documents=args.max_documents, force=args.force, num_cpus=args.num_cpus,
    )
    m = result.manifest
    verb = "reused (identical settings)" if result.reused else f"prepared in {result.seconds:.1f} s"
    print_table(f"{m.directory}: {verb}", ["split", "domain", "documents", "tokens"], result.rows())
    print(f"{m.tokens('train') + m.tokens('val'):,} tokens (train {m.tokens('train'):,}, val {m.tokens('val'):,}); "
          f"vocab {m.vocab_size}; manifest {m.path}")
    args.result = {"directory": m.directory, "manifest": m.path, "reused": result.reused, "seconds": result.seconds,
                   "vocab_size": m.vocab_size, "tokens_train": m.tokens("train"), "tokens_val": m.tokens("val"),
                   "splits": [dict(zip(("split", "domain", "documents", "tokens"), r)) for r in result.rows()]}
    return 0


# ---- info ----------------------------------------------------------------------------------------------------


def _info_args(p: argparse.ArgumentParser) -> None:
    _add_preset(p, "base")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _info(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from app import sdk
    from app.console import print_table

    result = sdk.info(args.preset, args.overrides)
    args.result = asdict(result)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        rows = result.rows()
        rows = [(k, f"{v / 2**20:,.1f} MiB" if k.endswith("_bytes") else v) for k, v in rows]
        print_table(f"model info: preset {args.preset}", ["field", "value"], rows)
    return 0


# ---- train ---------------------------------------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
    _add_preset(p, "tiny")
    p.add_argument("--workers", help="N, or MIN:MAX for an elastic group (parallel.workers)")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (parallel.zero_stage)")
    p.add_argument("--pipeline-stages", type=int, help="pipeline-parallel stages (parallel.pipeline_stages)")
    p.add_argument("--offload", action="store_true", help="offload optimizer state to CPU (parallel.offload_optimizer)")
    p.add_argument("--steps", type=int, help="optimizer steps (steps)")
    p.add_argument("--run-name", help="run name; re-running a name resumes it (name)")
    p.add_argument("--storage", help="folder or pyarrow URI for runs (storage)")
    p.add_argument("--init-from", metavar="MODEL",
                   help="start from this model's weights, a registry name or artifact folder (init_from)")
    p.add_argument("--num-cpus", type=int, help="CPUs for embedded Ray (default: what the workers need)")


def _train_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"parallel.workers": args.workers, "parallel.zero_stage": args.zero,
             "parallel.pipeline_stages": args.pipeline_stages, "steps": args.steps, "name": args.run_name,
             "storage": args.storage, "parallel.offload_optimizer": True if args.offload else None,
             "init_from": args.init_from}
    return [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides


def _train(args: argparse.Namespace) -> int:
    from app import sdk
    from app.console import print_table

    result = sdk.train(args.preset, _train_overrides(args), num_cpus=args.num_cpus)
    s = result.summary
    rows = [(k, s[k]) for k in ("final_loss", "final_val_loss", "steps", "tokens", "tokens_per_s", "mfu",
                                 "straggler_ratio_p50", "goodput", "wall_s", "world_sizes", "restarts")]
    print_table(f"run {s['run']}", ["metric", "value"], rows)
    print(f"run folder {result.run_dir} (summary.json, history.csv); artifact {result.artifact}")
    args.result = {**s, "run_dir": result.run_dir, "artifact": result.artifact}
    return 0


# ---- distill -------------------------------------------------------------------------------------------------


def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher model: a registry name or artifact folder (distill.teacher)")
    p.add_argument("--alpha", type=float, help="weight of the KL term, 0..1 (distill.alpha)")
    p.add_argument("--temperature", type=float, help="softmax temperature (distill.temperature)")
    p.add_argument("--domain", dest="domains", action="append", metavar="DOMAIN",
                   help="distil on this domain only, e.g. code or docs: a specialist (data.domains; repeatable)")
    _train_args(p)


def _distill_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"distill.teacher": args.teacher, "distill.alpha": args.alpha, "distill.temperature": args.temperature,
             "data.domains": "[" + ",".join(args.domains) + "]" if args.domains else None}
    return [f"{k}={v}" for k, v in flags.items() if v is not None] + _train_overrides(args)


def _distill(args: argparse.Namespace) -> int:
    from app import sdk
    from app.console import print_table

    result = sdk.distill(args.teacher, args.preset, _distill_overrides(args), domains=args.domains,
                         run_name=args.run_name, num_cpus=args.num_cpus)
    s = result.summary
    rows = [(k, s.get(k)) for k in ("teacher", "init_from", "domains", "alpha", "temperature", "final_loss",
                                    "final_val_loss", "first_val_kl", "final_val_kl", "steps", "tokens",
                                    "tokens_per_s", "goodput", "wall_s", "world_sizes", "restarts")]
    print_table(f"distillation {s['run']}", ["metric", "value"], rows)
    print(f"run folder {result.run_dir}; artifact {result.artifact}")
    args.result = {**s, "run_dir": result.run_dir, "artifact": result.artifact}
    return 0


# ---- sweep ---------------------------------------------------------------------------------------------------


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="sweep YAML, e.g. tune_configs/smoke.yaml")
    p.add_argument("--out", help="sweep folder (default: runs/sweeps/NAME); an existing one is resumed")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field for every trial, e.g. --set data.dir=runs/data/tiny (repeatable)",
    )
    p.add_argument("--num-cpus", type=int, help="CPUs for embedded Ray (default: all)")
    p.add_argument("--reseed", type=int, nargs="+", default=[], metavar="SEED",
                   help="train the finished sweep's points again at these seeds, each at the lr factor the sweep "
                        "chose for it, into runs/sweeps/NAME-seeds (then: fit both with --seed-spread)")
    p.add_argument("--from", dest="reseed_from", metavar="DIR",
                   help="--reseed: the finished sweep's folder (default runs/sweeps/NAME)")


def _sweep(args: argparse.Namespace) -> int:
    from app import sdk
    from app.console import print_table, short_path
    from app.errors import ConfigError

    if args.reseed_from and not args.reseed:
        raise ConfigError("--from names the finished sweep --reseed starts from; add --reseed SEED ...")
    try:
        result = sdk.sweep(args.config, args.out, overrides=args.overrides, num_cpus=args.num_cpus,
                           reseed=args.reseed, reseed_from=args.reseed_from)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume (finished trials are kept)", file=sys.stderr)
        raise
    verb = "resumed and finished" if result.resumed else "finished"
    failed = result.failed
    columns = ["trial", "N", "D", "C = 6ND", "val loss", "wall s", "status"]
    rows = [(t, n, d, c, f"{loss:.4f}" if loss != "" else "", f"{wall:.0f}" if wall != "" else "", status)
            for t, n, d, c, loss, wall, status in result.rows()]
    if not len(failed):  # all ok: leave the column out so the table fits 80 columns
        columns, rows = columns[:-1], [r[:-1] for r in rows]
    print_table(f"sweep {result.name}: {verb} in {result.wall_s:.0f} s", columns, rows)
    print(f"results {short_path(result.results_parquet)} (+ .csv); "
          f"trial runs in {short_path(result.sweep_dir / 'trials')}")
    if len(failed):
        first = failed.iloc[0]
        print(f"error: {len(failed)} of {len(result.df)} trials did not finish (first: {first['trial']}: "
              f"{first['error'] or first['status']}); run the same command again to retry them", file=sys.stderr)
        return 1
    if args.reseed:
        source = json.loads((result.sweep_dir / "sweep.json").read_text())["reseed"]["of"]
        print(f"next: python -m app fit {short_path(source)} {short_path(result.sweep_dir)} --seed-spread")
    else:
        print(f"next: python -m app fit {short_path(result.results_parquet)}")
    args.result = {"name": result.name, "sweep_dir": result.sweep_dir, "results_parquet": result.results_parquet,
                   "wall_s": result.wall_s, "resumed": result.resumed,
                   "trials": [dict(zip(("trial", "N", "D", "C", "val_loss", "wall_s", "status"), r))
                              for r in result.rows()]}
    return 0


# ---- fit -----------------------------------------------------------------------------------------------------


def _fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+",
                   help="a sweep's results.parquet/.csv (or its folder), or a CSV of runs with N/n_params, "
                        "D/tokens or C/compute, and loss/val_loss columns; several are fitted together")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    p.add_argument("--predict-n", type=float, action="append", default=[], metavar="N",
                   help="predict the loss at N parameters (repeatable; pair each with --predict-d)")
    p.add_argument("--predict-d", type=float, action="append", default=[], metavar="D",
                   help="... and D training tokens")
    p.add_argument("--grid", choices=["full", "small"], default="full",
                   help="L-BFGS starting grid: full = Besiroglu et al.'s 5,400 points, small = 72 (default full)")
    p.add_argument("--drop-highest-loss", type=int, default=0, metavar="K",
                   help="leave out the K highest-loss runs (Besiroglu et al. drop 5 of Chinchilla's)")
    p.add_argument("--n-column", metavar="COLUMN",
                   help="the parameter-count column N (default: the first of n_params, N, params, Model Size; "
                        "a sweep's n_params_total counts the embeddings too)")
    p.add_argument("--out", help="folder for fit.json and PNGs (default: fit/ in a sweep folder, else "
                                 "runs/fits/NAME)")
    p.add_argument("--no-plots", action="store_true", help="write fit.json only")
    p.add_argument("--rerun-noise", type=float, metavar="SIGMA",
                   help="also check how far each prediction would move if the sweep were run again with this "
                        "relative loss spread per run (between seeds, e.g. 0.007): the law taken as exact, "
                        "--reruns simulated sweeps refitted; without --predict-n/-d, at the compute-optimal size "
                        "for 10x the largest run's compute")
    p.add_argument("--seed-spread", action="store_true",
                   help="runs at several seeds per point (same N and D): also refit --reruns one-seed sweeps, each "
                        "keeping one seed per point at random, and show how far apart they predict (at each "
                        "--predict point, else at the compute-optimal size for 10x the largest run's compute)")
    p.add_argument("--reruns", type=int, metavar="K",
                   help="sweeps simulated by --rerun-noise or resampled by --seed-spread (default 200)")


def _seed_counts(seeds) -> str:
    """"3" or "2–3": the seeds per replicated point."""
    lo, hi = int(seeds[seeds > 1].min()), int(seeds.max())
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _interval(lo: float, hi: float) -> str:
    return "" if lo != lo else f"[{lo:,.4g}, {hi:,.4g}]"  # lo != lo: NaN, no bootstrap


def _fit(args: argparse.Namespace) -> int:
    import math

    from app import sdk
    from app.console import print_table, short_path
    from app.errors import FitError
    from pipelines.fit_scaling import default_out

    if len(args.predict_n) != len(args.predict_d):
        raise FitError(f"got {len(args.predict_n)} --predict-n and {len(args.predict_d)} --predict-d; "
                       "give them in pairs")
    if args.reruns is not None and args.rerun_noise is None and not args.seed_spread:
        raise FitError("--reruns sets how many sweeps --rerun-noise simulates or --seed-spread resamples; add "
                       "--rerun-noise SIGMA (e.g. 0.007) or --seed-spread")
    out = args.out or default_out(args.results)
    report = sdk.fit_report(args.results, out=out, bootstrap=args.bootstrap, seed=args.seed,
                            predict=list(zip(args.predict_n, args.predict_d)), grid=args.grid,
                            drop_highest_loss=args.drop_highest_loss, plots=not args.no_plots,
                            n_column=args.n_column, rerun_noise=args.rerun_noise, seed_spread=args.seed_spread,
                            **({} if args.reruns is None else {"reruns": args.reruns}))
    law = report.law
    level = f"{law.ci_level:.0%}"
    rows = [(k, v, _interval(lo, hi), "" if math.isnan(se) else se)
            for k, v, lo, hi, se in report.param_rows()]
    exps = law.frontier_exponents()
    for name, label in (("a", "a (N_opt ∝ C^a)"), ("b", "b (D_opt ∝ C^b)")):
        rows.append((label, exps[name], _interval(*exps.get(f"{name}_ci", (math.nan, math.nan))), ""))
    source = report.runs.source
    print(f"fitted {law.n_points} runs of {short_path(source) if source != 'DataFrame' else 'a DataFrame'}")
    print_table("L(N, D) = E + A/N^alpha + B/D^beta", ["parameter", "estimate", f"{level} interval", "bootstrap se"],
                rows)
    other = []
    for name, f in (("Kaplan L(N)", report.kaplan_n), ("Kaplan L(C)", report.kaplan_c)):
        if f is not None:
            (xc, xc_v), (alpha, alpha_v) = list(f.params.items())[:2]
            other.append((name, f"{alpha} = {alpha_v:.4g}, {xc} = {xc_v:.3g}", f.n_points))
    if report.isoflop is not None:
        iso = report.isoflop
        other.append(("approach 2 (IsoFLOP)", f"N_opt ∝ C^{iso.a:.3f}, D_opt ∝ C^{iso.b:.3f}",
                      sum(b.n_points for b in iso.budgets)))
    labels = {"kaplan_n": "Kaplan L(N)", "kaplan_c": "Kaplan L(C)", "isoflop": "approach 2 (IsoFLOP)"}
    for form, why in report.notes.items():  # the reason without its preamble and per-budget details
        short = why.split(";")[0].split(" (C=")[0].replace("approach 2 (IsoFLOP parabolas) ", "")
        other.append((labels.get(form, form), f"not fitted: {short}", ""))
    print_table("other forms", ["form", "fit", "runs"], other)
    if report.predictions:
        preds = []
        for n_val, d_val in report.predictions:
            loss, lo, hi = law.predict(n_val, d_val)
            preds.append((f"{n_val:.3g}", f"{d_val:.3g}", loss, _interval(lo, hi)))
        print_table("predictions", ["N", "D", "loss", f"{level} interval"], preds)
    if report.rerun_checks:
        first = report.rerun_checks[0]
        print_table(f"re-run check: loss ±{first.noise:.2%} per run, {first.errors.size} sweeps",
                    ["N", "D", "median |error|", "90th pct", f"within {first.tolerance:.0%}"],
                    [(f"{c.n:.3g}", f"{c.d:.3g}", f"{c.median_abs_error:.2%}", f"{c.p90_abs_error:.2%}",
                      f"{c.within:.0%}") for c in report.rerun_checks])
        print("re-run check: the law taken as exact, how far a refit of the same runs with fresh noise predicts "
              "from it" + ("" if report.predictions else ", at N_opt, D_opt for 10× the largest run's compute"))
    if report.seed_spreads:
        first = report.seed_spreads[0]
        print_table(f"seed spread: {first.predictions.size} one-seed sweeps, {int((first.seeds > 1).sum())} of "
                    f"{first.seeds.size} points at {_seed_counts(first.seeds)} seeds",
                    ["N", "D", "all runs", "median", "90% range", "median |dev|"],
                    [(f"{s.n:.3g}", f"{s.d:.3g}", s.pooled, s.median, _interval(*s.interval()), f"{s.spread:.2%}")
                     for s in report.seed_spreads])
        print("seed spread: each sweep keeps one seed per point at random and is refitted; how far apart those "
              "predict" + ("" if report.predictions else ", at N_opt, D_opt for 10× the largest run's compute"))
    for note in report.runs.dropped:
        print(f"left out: {note}")
    for warning in law.warnings:
        print(f"warning: {warning}")
    print(f"wrote {', '.join(short_path(p) for p in report.files)}")
    args.result = {**report.to_json(), "files": report.files}
    return 0


# ---- plan ----------------------------------------------------------------------------------------------------


def _plan_args(p: argparse.ArgumentParser) -> None:
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=float, help="compute budget C in FLOPs (e.g. 1e21)")
    budget.add_argument("--usd", type=float, help="money budget in USD (needs --instance)")
    p.add_argument("--instance", help="instance type from the price file (default with --flops: the cheapest)")
    p.add_argument("--spot", action="store_true", help="buy spot capacity (the budget and summary refer to spot)")
    p.add_argument("--fit", help="fit.json from `python -m app fit` (default: Besiroglu et al.'s Chinchilla refit)")
    p.add_argument("--summary", help="a training run's summary.json: use its measured tokens/s per worker")
    p.add_argument("--throughput-from", metavar="RESULTS",
                   help="a sweep's results.parquet: interpolate its trials' measured FLOP/s to N_opt")
    p.add_argument("--workers", type=int, default=1, help="training workers (GPUs) of the run (default 1)")
    p.add_argument("--preemptions-per-hour", type=float, default=0.0,
                   help="spot interruptions per instance-hour (default 0)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation if no --summary (default 0.4)")
    p.add_argument("--save-seconds", type=float, default=60.0, help="seconds one checkpoint stalls training")
    p.add_argument("--restart-seconds", type=float, default=300.0, help="seconds to recover from a failure")
    p.add_argument("--prices", help="price YAML (default: app/prices.yaml)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _amount(value: float, decimals: int) -> str:
    """Hours or USD with thousands separators; small amounts keep two significant decimals (0.62 h, $0.25)."""
    return f"{value:,.{decimals}f}" if value >= 10 ** (2 - decimals) else f"{value:,.2f}"


def _plan(args: argparse.Namespace) -> int:
    from app import sdk
    from app.console import print_table

    plan = sdk.plan(flops=args.flops, usd=args.usd, instance=args.instance, spot=args.spot, fit=args.fit,
                    summary=args.summary, throughput_from=args.throughput_from, workers=args.workers,
                    preemptions_per_hour=args.preemptions_per_hour, mfu=args.mfu, save_seconds=args.save_seconds,
                    restart_seconds=args.restart_seconds, prices=args.prices)
    args.result = plan.to_dict()
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    chosen = "" if args.instance else " (the cheapest in the price file)"
    workers = f"{plan.workers} worker{'s' if plan.workers != 1 else ''}"
    rows = [("compute C (FLOPs)", plan.compute_flops), ("N_opt (parameters)", plan.n_params),
            ("D_opt (tokens)", plan.n_tokens), ("tokens per parameter", plan.n_tokens / plan.n_params),
            ("predicted loss", f"{plan.loss:.4g} {_interval(plan.loss_lo, plan.loss_hi)}".strip()),
            ("tokens/s per worker", f"{plan.tokens_per_second_per_worker:,.0f}")]
    if args.usd:
        rows.insert(0, ("budget", f"${args.usd:,.2f} of {plan.purchase.replace('_', '-')}"))
    print_table("compute-optimal run", ["field", "value"], rows)
    cost_rows = [(est.purchase.replace("_", "-") + (" *" if est.purchase == plan.purchase else ""),
                  est.usd_per_instance_hour, est.failures_per_hour, f"{est.checkpoint_interval_s / 60:,.1f} min",
                  est.goodput, _amount(est.wall_hours, 1), _amount(est.cost_usd, 0))
                 for est in (plan.on_demand, plan.spot)]
    print_table(f"{plan.instance} × {plan.instances} ({workers}); * = the option asked for",
                ["purchase", "$/inst-h", "fail/h", "ckpt every", "goodput", "hours", "USD"], cost_rows)
    if chosen:
        print(f"instance: {plan.instance}{chosen}")
    print(f"law: {args.fit or 'Besiroglu et al. 2024 refit of Chinchilla (pass --fit fit.json for your own)'}")
    print(f"throughput: {plan.throughput_source}")
    for warning in plan.warnings:
        print(f"warning: {warning}")
    return 0


# ---- chaos ---------------------------------------------------------------------------------------------------


def _chaos_args(p: argparse.ArgumentParser) -> None:
    from pipelines.chaos import SCENARIOS

    p.add_argument("--scenario", required=True, choices=SCENARIOS, help="the fault to inject")
    _train_args(p)
    p.add_argument("--out", default="runs/chaos", help="folder for chaos.json and both runs (default runs/chaos)")
    p.add_argument("--inject-at-step", type=int, help="inject once training passes this step (default steps/3)")
    p.add_argument("--notice", type=int, default=8, help="spot: seconds between drain notice and node loss")
    p.add_argument("--no-rejoin", action="store_true", help="spot/kill-node: the lost node never comes back")


def _chaos(args: argparse.Namespace) -> int:
    import json

    from app import sdk

    result = sdk.chaos(args.preset, args.scenario, _train_overrides(args), out=args.out,
                       inject_at_step=args.inject_at_step, notice_s=args.notice,
                       rejoin_after_s=None if args.no_rejoin else 4.0)
    from app.console import print_table

    print_table(f"chaos: {args.scenario}", ["metric", "value"], [(k, json.dumps(v) if isinstance(v, list) else v)
                                                                 for k, v in result.report.items()])
    print(f"report {result.path}")
    args.result = {**result.report, "path": result.path}
    return 0


# ---- quantize, eval, models ---------------------------------------------------------------------------------


def _add_registry(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", metavar="PATH|URI",
                   help="registry root: a folder or pyarrow URI (default: $SCALESTACK_REGISTRY, else runs/registry)")


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a registry name or an artifact folder (e.g. runs/NAME/artifact)")
    p.add_argument("--method", default="int8", choices=["int8", "int8-weight-only", "int4", "qat"],
                   help="int8: dynamic int8 activations + int8 weights; int8-weight-only; int4: int4 weight-only "
                        "(torchao's kernel, else torch's CPU one); qat: int8 after quantization-aware fine-tuning")
    p.add_argument("--backend", default="auto", choices=["auto", "torchao", "torch.ao", "aten"],
                   help="auto: torch.ao for int8 (faster on x86 CPUs), torchao otherwise, and for int4 torch's own "
                        "CPU kernel (aten) where torchao has none")
    p.add_argument("--name", help="registry name of the result (default: PARENT-METHOD)")
    _add_registry(p)
    p.add_argument("--data", help="prepared data folder (default: the model card's data)")
    p.add_argument("--steps", type=int, default=50, help="QAT fine-tuning steps (default 50)")
    p.add_argument("--lr", type=float, default=1e-4, help="QAT learning rate (default 1e-4)")
    p.add_argument("--batches", type=int, default=8, help="validation batches of 8 windows per domain (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace a model of the same name")


def _quantize(args: argparse.Namespace) -> int:
    from app import sdk
    from app.console import print_table, short_path

    r = sdk.quantize(args.model, args.method, name=args.name, registry=args.registry, data=args.data,
                     backend=args.backend, steps=args.steps, lr=args.lr, batches=args.batches,
                     overwrite=args.overwrite)
    print_table(f"{r.name}: {r.after.quantization} ({r.backend})", r.columns(), r.rows())
    if r.fallback:
        print(f"backend: {r.fallback}; ran {r.backend} instead")
    if r.qat_losses:
        print(f"QAT: {len(r.qat_losses)} steps, training loss {r.qat_losses[0]:.3f} -> {r.qat_losses[-1]:.3f}")
    print(f"published {r.name} to {short_path(r.path)}")
    args.result = {"name": r.name, "path": r.path, "method": r.method, "backend": r.backend, "card": r.card}
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a registry name or an artifact folder")
    p.add_argument("--domain", default="all", help="code, docs, ... or all (default: every domain of the data)")
    p.add_argument("--data", help="prepared data folder (default: the model card's data)")
    p.add_argument("--batches", type=int, default=8, help="validation batches of 8 windows per domain (default 8)")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile, as `serve` does with compile: true (the first calls compile: "
                        "tens of seconds)")
    _add_registry(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _eval(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from app import sdk
    from app.console import print_table, short_path

    r = sdk.evaluate(args.model, args.data, domains=args.domain, batches=args.batches, registry=args.registry,
                     compile=args.compile)
    args.result = {**asdict(r), "perplexity": r.perplexity}
    if args.json:
        print(json.dumps(args.result, indent=2))
        return 0
    print_table(f"eval {r.model} on {short_path(r.data)}", ["metric", "value"], r.rows())
    print(f"{sum(r.tokens_evaluated.values()):,} validation tokens; {r.machine['cpu']}, "
          f"{r.machine['torch_threads']} torch threads; {r.seconds:.1f} s")
    return 0


def _models_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    _add_registry(sub.add_parser("list", help="a table of every model in the registry"))
    show = sub.add_parser("show", help="one model's card")
    show.add_argument("name")
    _add_registry(show)
    publish = sub.add_parser("publish", help="copy an artifact folder into the registry under a name")
    publish.add_argument("path", help="an artifact folder, e.g. runs/NAME/artifact")
    publish.add_argument("--name", required=True, help="registry name")
    publish.add_argument("--overwrite", action="store_true", help="replace a model of the same name")
    _add_registry(publish)


def _models(args: argparse.Namespace) -> int:
    from app import sdk
    from app.console import print_table, short_path
    from app.registry import Registry

    reg = Registry(args.registry)
    if args.action == "show":
        print(json.dumps({"name": args.name, **reg.card(args.name)}, indent=2, sort_keys=True))
    elif args.action == "publish":
        print(f"published {args.name} to {short_path(reg.publish(args.name, args.path, overwrite=args.overwrite))}")
    else:
        models = sdk.models(reg.root)
        print_table(f"registry {short_path(reg.root)}: {len(models.cards)} models", models.columns(), models.rows())
        if not models.cards and "://" not in str(reg.root) and not Path(reg.root).exists():
            print(f"({short_path(reg.root)} does not exist yet: train, distill and quantize publish models there; "
                  "another registry: --registry DIR or $SCALESTACK_REGISTRY)")
    return 0


# ---- serve ---------------------------------------------------------------------------------------------------


INGRESS_NAMES = {"haproxy": "HAProxy", "proxy": "Serve's HTTP proxy", "direct": "the router replica (direct ingress)"}


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML: serve_deployments/serve_config.yaml (Serve's format) or ServeArgs fields")
    p.add_argument("--model", dest="models", action="append", default=[], metavar="NAME=ARTIFACT",
                   help="serve an artifact folder or registry name as NAME (repeatable; adds to --config)")
    p.add_argument("--host", help="HTTP bind address (default 127.0.0.1; anything else requires API keys)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--num-cpus", type=int, help="CPUs for embedded Ray (default: all)")
    p.add_argument("--ingress", choices=("auto", "haproxy", "proxy", "direct"), default="auto",
                   help="who listens on --port: HAProxy forwarding to the router replicas' own servers (haproxy: "
                        "one actor hop fewer than Serve's proxy; Ray's HAProxy flag, set for the Ray started here), "
                        "Serve's Python HTTP proxy (proxy), or the router replica itself (direct; Ray's direct-"
                        "ingress flag). auto (default): haproxy on the Ray started here, else whichever of haproxy "
                        "and proxy the cluster runs")
    p.add_argument("--start-timeout", type=float, default=600.0, metavar="S",
                   help="give up (and remove the application) if its replicas are not all running after S seconds, "
                        "saying what they wait for, e.g. CPUs the cluster lacks (default 600; 0 waits for ever)")


def _serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from app import sdk
    from app.console import print_table
    from serve_deployments.app import curl_example, load_serve_args
    from serve_deployments.guard import is_loopback

    if args.start_timeout < 0:  # before anything is read: a bad flag is named whatever else is wrong
        raise UserError(f"--start-timeout {args.start_timeout:g}: must be >= 0 seconds (0 waits for ever)")
    serve_args = load_serve_args(args.config, args.models, args.host, args.port)
    client = sdk.deploy(serve_args, num_cpus=args.num_cpus, ingress=args.ingress,
                        start_timeout_s=args.start_timeout or None)

    def stop(signum, frame):  # SIGTERM (`kill`, `ray job stop`, a container stop) shuts down like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # after ray.init, whose own handler would exit without shutting down
    try:
        rows = [(m["id"], m["scalestack"].get("parameters"), m["scalestack"].get("quantization"),
                 m["scalestack"].get("max_batch_size"))
                for m in client.models() if m["id"] != "auto"] if is_loopback(serve_args.host) else []
        if rows:
            print_table("models", ["name", "parameters", "quantization", "max batch"], rows)
        print(f"serving on {client.base_url} through {INGRESS_NAMES.get(client.ingress, client.ingress)} "
              "(OpenAI-compatible: /v1/completions, /v1/chat/completions, /v1/models)")
        print(curl_example(client, needs_key=not is_loopback(serve_args.host)))
        print("Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        client.shutdown()
        print("stopped: Serve shut down", file=sys.stderr)
    return 0


# ---- demo ----------------------------------------------------------------------------------------------------


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast", action="store_true", help="a reduced demo for CI: tiny models, few steps (~5 min on 2 cores)")
    p.add_argument("--out", help="output folder, new or empty (default: runs/demo/<timestamp>)")
    p.add_argument("--port", type=int, help="HTTP port of the router (default: a free one)")


def _demo(args: argparse.Namespace) -> int:
    from app import sdk
    from app.console import short_path
    from app.demo import print_report

    result = sdk.demo(args.out, fast=args.fast, port=args.port)
    print_report(result.report)
    print(f"demo finished in {result.wall_s:,.0f} s; report {short_path(result.report_html)} (+ report.json); "
          f"everything in {short_path(result.out)}")
    args.result = {"out": str(result.out), "report_json": str(result.report_json),
                   "report_html": str(result.report_html), "wall_s": result.wall_s}
    return 0


# ---- the table -----------------------------------------------------------------------------------------------

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "prepare-data": ("tokenise a corpus into Parquet token shards with a manifest", _prepare_data_args, _prepare_data),
    "info": ("parameters, FLOPs per token and memory per worker of a preset", _info_args, _info),
    "train": ("train with Ray Train + DeepSpeed (ZeRO 0-3, offload, pipeline); resumes a run by name",
              _train_args, _train),
    "distill": ("distil a teacher into a smaller student (or a one-domain specialist) with the same trainer, "
                "checkpoints and elasticity", _distill_args, _distill),
    "chaos": ("inject a fault (spot reclaim, killed worker or node, torn checkpoint, resize) into training on a "
              "local multi-node Ray cluster and measure recovery against an undisturbed run", _chaos_args, _chaos),
    "sweep": ("run a scaling sweep from tune_configs/*.yaml with Ray Tune; resumes an interrupted one",
              _sweep_args, _sweep),
    "fit": ("fit scaling laws (Chinchilla approach 3, Kaplan, IsoFLOP) to a results table → fit.json + PNGs",
            _fit_args, _fit),
    "plan": ("compute-optimal size, tokens, loss, hours and cost for a FLOP or USD budget", _plan_args, _plan),
    "quantize": ("quantize a model (int8, int8 weight-only, int4, or QAT then int8) into the registry",
                 _quantize_args, _quantize),
    "eval": ("validation loss and perplexity per domain, generation tokens/s and size of a model", _eval_args,
             _eval),
    "models": ("the model registry: list, show NAME, publish PATH --name NAME", _models_args, _models),
    "serve": ("serve models behind the OpenAI-compatible router on Ray Serve; prints the URL, Ctrl-C stops",
              _serve_args, _serve),
    "demo": ("the whole pipeline on this machine: data, a teacher through a spot reclaim, sweep, fit, plan, "
             "specialists, int8, serving through every routing policy → report.html", _demo_args, _demo),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit 2) instead of the usage block."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m app", description="scalestack: train, sweep and serve GPTs on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _emit_result(args: argparse.Namespace) -> None:
    """With SCALESTACK_RESULT_LINE=1 (app.Client sets it for jobs), end stdout with one `scalestack-result: {json}`
    line: the result a handler left in `args.result`, else {"command": ..., "exit": 0}."""
    import os

    if os.environ.get("SCALESTACK_RESULT_LINE") == "1":
        from app.client import result_line

        print(result_line(getattr(args, "result", None) or {"command": args.command, "exit": 0}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command][2](args)
        if code == 0:
            _emit_result(args)
        return code
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
