"""Training throughput: bare single-process PyTorch vs Ray Train + DeepSpeed layouts, side by side in one run.

    python benchmarks/train_throughput.py [--steps 30] [--rounds 3] [--preset bench] [--only ZeRO-2 ...]

Same model (the `bench` preset: 4 layers, width 256, context 128), same data, same global batch. The bare
baseline is one process with AdamW and 2 threads — the practical ceiling on a 2-core machine. Each DeepSpeed
layout runs 2 workers with 1 thread each. Throughput is the median over steady-state steps (the first
`--warmup` steps are excluded) of the whole training loop's period, bookkeeping included, for both. The bare run
and every layout are repeated `--rounds` times in turn (this machine's speed drifts by several percent between
minutes); a layout's ratio to bare is the median of its per-round ratios, with their range. MFU is against the
matmul peak measured on this machine with the same thread count. Prints a table and writes
benchmarks/results/train_throughput.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

LAYOUTS = [  # (label, overrides)
    ("ZeRO-0", ["parallel.zero_stage=0"]),
    ("ZeRO-1", ["parallel.zero_stage=1"]),
    ("ZeRO-2", ["parallel.zero_stage=2"]),
    ("ZeRO-3", ["parallel.zero_stage=3"]),
    ("ZeRO-2 + offload", ["parallel.zero_stage=2", "parallel.offload_optimizer=true"]),
    ("pipeline x2 (ZeRO-1)", ["parallel.zero_stage=1", "parallel.pipeline_stages=2"]),
]


def bare_worker(preset: str, steps: int, warmup: int, threads: int, data_dir: str) -> dict:
    """Plain PyTorch: the same model, optimizer, schedule-free loop and GlobalOrder batches; no Ray, no DeepSpeed."""
    import torch

    from app.config import load_config
    from app.data import GlobalOrder, load_tokens, windows
    from app.model import GPT

    torch.set_num_threads(threads)
    cfg = load_config(preset)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    stream = load_tokens(data_dir, "train")
    order = GlobalOrder.for_stream(cfg.data.seed, len(stream), cfg.model.seq_len)
    g, micro, t = cfg.parallel.global_batch, cfg.parallel.micro_batch, cfg.model.seq_len
    rates = []
    for step in range(steps):
        t0 = time.perf_counter()
        ids = order.batch_ids(step, g)
        for m in range(g // micro):
            x, y = windows(stream, ids[m * micro:(m + 1) * micro], t)
            _, loss = model(torch.from_numpy(x).long(), torch.from_numpy(y).long())
            (loss / (g // micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            rates.append(g * t / (time.perf_counter() - t0))
    return {"tokens_per_s": statistics.median(rates), "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "flops_per_token": model.flops_per_token()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat the bare run and every layout this many times (ratios: median over rounds)")
    parser.add_argument("--only", nargs="*", help="run only these layout labels (plus the bare baseline)")
    parser.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.steps <= args.warmup + 2:
        parser.error("--rounds must be >= 1 and --steps at least --warmup + 3 (periods need two steady steps)")

    from app.config import load_config

    cfg = load_config(args.preset)
    data_dir = str(Path(cfg.data.dir).resolve())
    if args.bare_worker:
        print(json.dumps(bare_worker(args.preset, args.steps, args.warmup, 2, data_dir)))
        return 0

    from app.console import print_table
    from app.metrics import matmul_peak_flops
    from pipelines import train
    from pipelines.ray_session import ray_session

    peak_1t = matmul_peak_flops("cpu", "float32", threads=1)
    peak_2t = matmul_peak_flops("cpu", "float32", threads=2)
    bare_label = "bare PyTorch (1 proc, 2 threads)"
    layouts = [(label, o) for label, o in LAYOUTS if not args.only or label in args.only]
    runs: dict[str, list[dict]] = {bare_label: [], **{label: [] for label, _ in layouts}}
    with ray_session(num_cpus=2):
        train._ensure_data(cfg, Path(data_dir), num_cpus=2)
    for round_ in range(args.rounds):
        # the bare baseline gets the machine to itself (no Ray running), then every layout in turn, each round
        out = subprocess.run([sys.executable, __file__, "--bare-worker", "--preset", args.preset,
                              "--steps", str(args.steps), "--warmup", str(args.warmup)],
                             capture_output=True, text=True, check=True)
        bare = json.loads(out.stdout.strip().splitlines()[-1])
        fpt = bare["flops_per_token"]
        runs[bare_label].append(bare)
        print(f"round {round_ + 1}/{args.rounds}: bare {bare['tokens_per_s']:,.0f} tokens/s", flush=True)
        with ray_session(num_cpus=2, include_dashboard=False, log_to_driver=False):
            for label, overrides in layouts:
                run_cfg = load_config(args.preset, [
                    f"name=bench-{re.sub(r'[^a-z0-9.]+', '-', label.lower()).strip('-')}-{int(time.time())}",
                    "storage=runs/bench", "parallel.workers=2", f"steps={args.steps}", "checkpoint.every_steps=0",
                    "eval_every=0", "optim.warmup_steps=0", f"parallel.peak_flops_per_worker={peak_1t}", *overrides])
                summary = train.run(run_cfg)
                history = summary.history
                # Whole loop periods (rank 0's record times), as the bare loop is timed: the step plus everything
                # the loop does around it (the step's all-gather, progress board, gauges, reports).
                period = history["time"].diff()[history["step"] > args.warmup + 1]
                tps = run_cfg.parallel.global_batch * run_cfg.model.seq_len / float(period.median())
                runs[label].append({
                    "tokens_per_s": tps, "ratio_to_bare": tps / bare["tokens_per_s"],
                    "step_only_tokens_per_s": float(history[history["step"] > args.warmup]["tokens_per_s"].median()),
                    "max_rss_mb": summary.summary["max_rss_mb_per_worker"],
                    "straggler_ratio": summary.summary["straggler_ratio_p50"],
                    "final_loss": summary.summary["final_loss"]})
    # per layout: medians over rounds; the ratio is the median of each round's ratio to that round's bare run
    results = {}
    for label, rs in runs.items():
        ratios = [r.get("ratio_to_bare", 1.0) for r in rs]
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        results[label] = {
            "tokens_per_s": tps, "ratio_to_bare": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
            "mfu": tps * fpt / (peak_2t if label == bare_label else 2 * peak_1t),
            "max_rss_mb": max(r["max_rss_mb"] for r in rs), "rounds": rs}
    rows = [(label, round(r["tokens_per_s"]), f"{r['ratio_to_bare']:.2f}x",
             "-" if label == bare_label else f"{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}",
             f"{100 * r['mfu']:.1f}%", f"{r['max_rss_mb']:.0f}") for label, r in results.items()]
    print_table(f"train throughput, preset {args.preset}, {args.steps} steps x {args.rounds} rounds "
                f"(matmul peak {peak_1t / 1e9:.1f} GFLOP/s at 1 thread, {peak_2t / 1e9:.1f} at 2)",
                ["layout", "tokens/s", "vs bare", "range", "MFU", "peak RSS MiB / proc"], rows)
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_throughput.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "preset": args.preset, "steps": args.steps, "rounds": args.rounds, "peak_flops_1_thread": peak_1t,
        "peak_flops_2_threads": peak_2t, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
