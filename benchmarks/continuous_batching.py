"""Continuous vs static batching of generation, side by side in one run (no Ray: the scheduling alone).

    python benchmarks/continuous_batching.py [--teacher ART] [--quick]

The LMServer's scheduler (`serve_deployments.decoding.ContinuousBatcher`, one torch thread, max_batch_size 32)
serves a closed loop of 1, 8 and 32 clients, twice per level with each policy, in the order static, continuous,
continuous, static (so drift over the run hits both alike):

  static      a batch runs until its last request finishes; requests that arrive meanwhile wait for the next
              (what @serve.batch alone gives: the baseline);
  continuous  a request that arrives while others decode is prefilled and joins them at the next step, and a
              finished one leaves at once.

Every request is greedy with its own max_tokens, drawn once (seeded) from 4..64 so lengths differ as real
traffic does; both policies get the same prompts and lengths in the same order. Reported per policy and level:
requests/s, generated tokens/s, p50 and p99 latency, p50 time to first token, and the mean rows per decode step;
then continuous/static ratios. Goal (ours): continuous batching gives >= 1.5x the tokens/s of static batching at
32 clients with a lower p99. Writes benchmarks/results/continuous_batching.json.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.serve_load import closed_loop as serve_closed_loop, default_teacher, prompts  # noqa: E402

LEVELS = (1, 8, 32)
ORDER = ("static", "continuous", "continuous", "static")


async def closed_loop(batcher, make_seq, work: list[tuple[str, int]], concurrency: int) -> dict:
    """serve_load's closed loop over (prompt, max_tokens) items sent straight to the batcher, plus the time to each
    request's first token and the mean rows per decode step."""
    first_token, tokens = [], 0

    async def send(item: tuple[str, int]) -> int:
        nonlocal tokens
        seq = make_seq(*item)
        t0, first = time.perf_counter(), None
        async for _ in batcher.join([seq]):
            first = first or time.perf_counter() - t0
        first_token.append(first)
        tokens += len(seq.token_ids)
        return len(seq.token_ids)

    stats0 = dict(batcher.stats)
    out = await serve_closed_loop(send, work, concurrency)
    steps = batcher.stats["steps"] - stats0["steps"]
    return {**out, "tokens": tokens, "ttft_p50_ms": 1e3 * statistics.median(first_token),
            "mean_batch": (batcher.stats["rows"] - stats0["rows"]) / max(steps, 1)}


def merge(blocks: list[dict]) -> dict:
    """Two blocks of one policy as one: totals over total wall time, latency medians averaged."""
    wall = sum(b["wall_s"] for b in blocks)
    out = {"requests": sum(b["requests"] for b in blocks), "tokens": sum(b["tokens"] for b in blocks),
           "wall_s": wall}
    out["req_per_s"], out["tokens_per_s"] = out["requests"] / wall, out["tokens"] / wall
    for k in ("p50_ms", "p99_ms", "ttft_p50_ms", "mean_batch"):
        out[k] = statistics.fmean(b[k] for b in blocks)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="artifact folder or registry name (default: the registry's demo model)")
    parser.add_argument("--quick", action="store_true", help="a few requests per block (smoke run)")
    args = parser.parse_args()

    import torch

    from app.console import print_table, progress_bar
    from app.registry import load_artifact, machine
    from serve_deployments.decoding import ContinuousBatcher, Sequence

    teacher = args.teacher or default_teacher()
    artifact = load_artifact(teacher)
    model, tokenizer = artifact.model.eval(), artifact.tokenizer
    worker = concurrent.futures.ThreadPoolExecutor(1)
    worker.submit(torch.set_num_threads, 1).result()  # as an LMServer replica with one CPU
    rng = random.Random(0)

    def make_seq(text: str, max_tokens: int) -> Sequence:
        ids = [tokenizer.eos_id, *tokenizer.encode(text)]
        return Sequence(ids, max_tokens, 0.0, None, None, (), None, tokenizer)

    results: dict[str, dict[int, list[dict]]] = {"static": {}, "continuous": {}}
    with progress_bar("batching", len(LEVELS) * len(ORDER)) as bar:
        for c in LEVELS:
            n = 2 * c if args.quick else 8 * c
            work = [(text, rng.randint(4, 64)) for text in prompts(n)]
            for policy in ORDER:
                bar.update(status=f"{policy} @ {c}")
                batcher = ContinuousBatcher(model, tokenizer.pad_id, worker, max_batch_size=32,
                                            continuous=policy == "continuous")
                asyncio.run(closed_loop(batcher, make_seq, work[:c], c))  # warm-up: allocator, code paths
                results[policy].setdefault(c, []).append(asyncio.run(closed_loop(batcher, make_seq, work, c)))
                bar.advance()
    merged = {p: {c: merge(blocks) for c, blocks in by_c.items()} for p, by_c in results.items()}

    rows = [(p, str(c), str(r["requests"]), f"{r['req_per_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['p50_ms']:.0f}",
             f"{r['p99_ms']:.0f}", f"{r['ttft_p50_ms']:.0f}", f"{r['mean_batch']:.1f}")
            for p, by_c in merged.items() for c, r in by_c.items()]
    print_table(f"static vs continuous batching: {teacher}, greedy, max_tokens 4..64, 1 torch thread",
                ["policy", "clients", "requests", "req/s", "tokens/s", "p50 ms", "p99 ms", "TTFT p50 ms",
                 "mean batch"], rows)
    ratios = {c: {k: merged["continuous"][c][k] / merged["static"][c][k]
                  for k in ("tokens_per_s", "p50_ms", "p99_ms", "ttft_p50_ms")} for c in LEVELS}
    print_table("continuous / static (same run)", ["clients", "tokens/s", "p50", "p99", "TTFT p50"],
                [(str(c), *(f"{r[k]:.2f}x" for k in ("tokens_per_s", "p50_ms", "p99_ms", "ttft_p50_ms")))
                 for c, r in ratios.items()])
    met = ratios[32]["tokens_per_s"] >= 1.5 and ratios[32]["p99_ms"] < 1
    print(f"goal: continuous >= 1.5x static tokens/s at 32 clients with a lower p99: "
          f"{ratios[32]['tokens_per_s']:.2f}x, p99 {ratios[32]['p99_ms']:.2f}x -> {'met' if met else 'NOT met'}")

    out = REPO / "benchmarks" / "results" / ("continuous_batching_quick.json" if args.quick
                                             else "continuous_batching.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    card = artifact.card
    out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "platform": platform.platform(),
        "teacher": teacher,
        "parameters": card.get("parameters"), "blocks": results, "merged": merged, "ratios": ratios, "goal_met": met,
    }, indent=2, default=str))
    print(f"wrote {out.relative_to(REPO)}")
    worker.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
