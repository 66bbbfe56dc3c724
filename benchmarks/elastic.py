"""Elastic training under faults: recovery time, lost steps, goodput through spot reclaims, checkpoint cost.

    python benchmarks/elastic.py [--presets tiny,bench] [--goodput-minutes 10] [--reclaims 3]

On a local multi-node Ray cluster (a head without CPUs plus two 1-CPU worker raylets, `pipelines/chaos.py`), per
preset:

1. one undisturbed reference run, then one run per chaos scenario (spot, kill-worker, kill-node, torn-checkpoint,
   resize) against it: seconds from the node's (or worker's) death — after a drain notice, from the death or the
   noticed group's last step, whichever came first — to the first step of the new group (goal ≤ 15 s), steps lost
   (goal 0 with a notice), samples duplicated or skipped, loss difference to the reference, and the time spent
   converting to DeepSpeed's universal format when the world size changed;
2. a run of about `--goodput-minutes` with `--reclaims` spot reclaims spread over it (drain notice, just-in-time
   checkpoint, node removed at the deadline, a fresh node joining `--rejoin` s later, the group growing back):
   goodput (productive step time / wall time, startup and restarts included; goal ≥ 90 %), each reclaim's
   recovery, lost steps, and checkpoint cost at the Young–Daly interval for that reclaim rate
   (`checkpoint.every_minutes=auto`, MTBF = minutes / reclaims): mean save time and its share of step time (goal
   ≤ 5 %), plus what the same save would cost at the base preset's every-50-steps default.

Prints one table per preset and writes benchmarks/results/elastic.json (elastic_<presets>.json for other
`--presets`). Nothing is timed against another machine;
every run of a preset shares this machine's two cores with Ray's own processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Per preset: steps of a scenario run, its checkpoint interval, and where the fault lands.
SCENARIO_RUNS = {
    "tiny": {"steps": 600, "every_steps": 50, "inject_at_step": 120},  # long enough to grow back after a resize
    "bench": {"steps": 60, "every_steps": 10, "inject_at_step": 20},  # ~2 s per step on two CPU workers
}


def _scenario_config(preset: str):
    from app.config import load_config

    r = SCENARIO_RUNS.get(preset, SCENARIO_RUNS["bench"])
    return load_config(preset, [f"steps={r['steps']}", f"checkpoint.every_steps={r['every_steps']}", "eval_every=0",
                                f"log_every={r['every_steps']}", "parallel.workers=2"]), r["inject_at_step"]


def scenarios(preset: str, names: list[str], out: Path, notice_s: int) -> tuple[list[dict], object]:
    """One chaos run per scenario against one shared reference; returns the reports and the reference result."""
    from pipelines import chaos

    cfg, at_step = _scenario_config(preset)
    reports, reference = [], None
    for name in names:
        print(f"[{preset}] {name} ...", flush=True)
        result = chaos.run(cfg, name, out=out / preset, inject_at_step=at_step, notice_s=notice_s,
                           reference=reference)
        reference = result.reference
        reports.append({**result.report,
                        "universal_conversion_s": result.disturbed.summary["universal_conversion_s"]})
    return reports, reference


def _steps_per_s(result) -> float:
    """Steady training rate of a finished run: steps over wall time between its first and last step."""
    records = sorted(result.records, key=lambda r: r["time"])
    return (len(records) - 1) / (records[-1]["time"] - records[0]["time"])


def _first_step(records: list[dict], attempt: int, since: float) -> float | None:
    """When `attempt`'s first recorded step began, in seconds from `since` (None: a group that recorded no step)."""
    starts = [r["time"] - r["step_time_s"] for r in records if r["attempt"] == attempt]
    return round(min(starts) - since, 1) if starts else None


def goodput_run(preset: str, reference, minutes: float, reclaims: int, notice_s: int, rejoin_s: float,
                out: Path) -> dict:
    """About `minutes` of elastic training with `reclaims` spot reclaims; what it kept of the wall time."""
    from app.config import load_config
    from pipelines import chaos

    cfg, _ = _scenario_config(preset)
    steps = max(10 * (reclaims + 1), round(minutes * 60 * _steps_per_s(reference)))
    storage = out / preset / "goodput" / "runs"
    run_cfg = cfg.model_copy(update={
        "name": "goodput", "steps": steps, "storage": str(storage), "log_every": max(1, steps // 50),
        "data": cfg.data.model_copy(update={"dir": str(Path(cfg.data.dir).resolve())}),
        "parallel": cfg.parallel.model_copy(update={"workers": "1:2"}),
        "checkpoint": cfg.checkpoint.model_copy(update={
            "every_steps": 0, "every_minutes": "auto", "mtbf_minutes": minutes / reclaims}),
    })
    shutil.rmtree(storage / run_cfg.name, ignore_errors=True)  # a run of that name would resume, not start over
    at_steps = [steps * (i + 1) // (reclaims + 1) for i in range(reclaims)]
    print(f"[{preset}] goodput: {steps} steps (~{minutes:g} min), spot reclaims past steps {at_steps} ...",
          flush=True)
    with chaos.local_cluster(2, cfg.parallel.cpus_per_worker) as cluster:
        result, faults = chaos.train_with_faults(run_cfg, "spot", cluster, at_steps, notice_s, rejoin_s)
    ledger = result.summary["ledger"]
    saves = [r for r in result.records if r.get("checkpoint") and not r["checkpoint"].startswith("deferred")]
    save_s = ledger["checkpoint_s"] / max(1, len(saves))
    step_s = statistics.median(r["step_time_s"] for r in result.records)
    recoveries = [chaos.recovery_s(result.records, f["death"], f.get("notice")) for f in faults]
    started = min(r["time"] - r["step_time_s"] for r in result.records)
    return {
        # seconds from the first step: each reclaim's notice and node loss; each restart's group start and first step
        "faults": [{k: round(v - started, 1) for k, v in f.items() if k in ("notice", "death")} for f in faults],
        "group_timeline": [{
            "world_size": a["world_size"], "warm_standby_workers": chaos.warm_workers(a),
            "group_start": round(a["group_start"] - started, 1) if a.get("group_start") else None,
            "first_step": _first_step(result.records, i, started)} for i, a in enumerate(result.attempts, start=1)],
        "steps": steps, "wall_s": result.summary["wall_s"], "reclaims": len(faults), "notice_s": notice_s,
        "rejoin_s": rejoin_s, "goodput": result.summary["goodput"], "ledger": ledger,
        "recovery_s": [round(r, 2) if r is not None else None for r in recoveries],
        "lost_steps": result.summary["lost_steps"], "restarts": result.summary["restarts"],
        "world_sizes": result.summary["world_sizes"],
        "universal_conversion_s": result.summary["universal_conversion_s"],
        "checkpoints": len(saves), "checkpoint_save_s": round(save_s, 3),
        "checkpoint_share_of_step_time": round(ledger["checkpoint_s"] / ledger["productive_s"], 4),
        "median_step_s": round(step_s, 4),
        "share_at_every_50_steps": round(save_s / (load_config("base").checkpoint.every_steps * step_s), 4),
        "checkpoint_interval_s": next((r["checkpoint_interval_s"] for r in reversed(result.records)
                                       if r.get("checkpoint_interval_s")), None),
    }


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return json.dumps(value) if isinstance(value, list) else str(value)


def main() -> int:
    from pipelines.chaos import SCENARIOS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,bench", help="comma-separated presets (default tiny,bench)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated chaos scenarios")
    parser.add_argument("--goodput-minutes", type=float, default=10.0, help="length of the goodput run (0 = skip)")
    parser.add_argument("--reclaims", type=int, default=3, help="spot reclaims during the goodput run")
    parser.add_argument("--notice", type=int, default=8, help="seconds between drain notice and node loss")
    parser.add_argument("--rejoin", type=float, default=20.0, help="goodput run: seconds until a node replaces "
                        "the reclaimed one")
    parser.add_argument("--out", default="runs/bench-elastic", help="folder for the runs")
    args = parser.parse_args()
    names = [s for s in args.scenarios.split(",") if s]
    if unknown := sorted(set(names) - set(SCENARIOS)):
        parser.error(f"--scenarios: unknown {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    if args.goodput_minutes and args.reclaims < 1:
        parser.error("--reclaims must be at least 1 (or --goodput-minutes 0 to skip the goodput run)")

    from app.console import print_table
    from app.config import load_config
    from pipelines import train
    from pipelines.ray_session import ray_session

    out = Path(args.out).resolve()
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} CPUs",
                     "goals": {"recovery_s": 15, "lost_steps_with_notice": 0, "goodput": 0.9,
                               "checkpoint_share_of_step_time": 0.05},
                     "presets": {}}
    t_start = time.perf_counter()
    for preset in [p for p in args.presets.split(",") if p]:
        cfg = load_config(preset)
        with ray_session(num_cpus=2):
            train._ensure_data(cfg, Path(cfg.data.dir).resolve(), num_cpus=2)
        reports, reference = scenarios(preset, names, out, args.notice)
        entry = {"scenarios": reports}
        rows = [(r["scenario"], _fmt(r["recovery_s"]), r["lost_steps"], r["duplicated_samples"],
                 r["skipped_samples"], _fmt(r["max_rel_loss_diff_vs_reference"]), _fmt(r["universal_conversion_s"]),
                 _fmt(r["world_sizes"]), _fmt(r["goodput"])) for r in reports]
        if args.goodput_minutes and reference is not None:
            g = goodput_run(preset, reference, args.goodput_minutes, args.reclaims, args.notice, args.rejoin, out)
            entry["goodput_run"] = g
            rows.append((f"{g['reclaims']} spot reclaims, {g['wall_s'] / 60:.1f} min",
                         "/".join(_fmt(r) for r in g["recovery_s"]), g["lost_steps"], "-", "-", "-",
                         _fmt(g["universal_conversion_s"]), _fmt(g["world_sizes"]), _fmt(g["goodput"])))
        results["presets"][preset] = entry
        print_table(f"elastic training under faults, preset {preset} (goals: recovery ≤ 15 s, 0 lost steps with "
                    "notice, goodput ≥ 0.9)",
                    ["scenario", "recovery s", "lost steps", "dup", "skip", "max rel Δloss", "universal conv s",
                     "world sizes", "goodput"], rows)
        if "goodput_run" in entry:
            g = entry["goodput_run"]
            print_table(f"checkpoints in the goodput run, preset {preset}", ["metric", "value"], [
                ("Young–Daly interval (s)", _fmt(g["checkpoint_interval_s"])),
                ("checkpoints written", g["checkpoints"]),
                ("mean save (s)", _fmt(g["checkpoint_save_s"])),
                ("median step (s)", _fmt(g["median_step_s"])),
                ("checkpoint share of step time (goal ≤ 0.05)", _fmt(g["checkpoint_share_of_step_time"])),
                ("same save every 50 steps (base default)", _fmt(g["share_at_every_50_steps"])),
                ("ledger", ", ".join(f"{k} {v}" for k, v in g["ledger"].items())),
            ])
        _write(results, t_start)  # after every preset, so a long run that is stopped keeps what it measured
    path = _write(results, t_start)
    print(f"wrote {path} ({results['wall_s'] / 60:.1f} min)")
    return 0


def _write(results: dict, t_start: float) -> Path:
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    presets = "_".join(results["presets"])
    path = out_dir / ("elastic.json" if presets in ("tiny_bench", "") else f"elastic_{presets}.json")
    path.write_text(json.dumps(results, indent=2))
    return path


if __name__ == "__main__":
    raise SystemExit(main())
