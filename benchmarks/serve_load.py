"""Serving load on loopback: latency and throughput at concurrency 1, 8 and 32, side by side in one run.

    python benchmarks/serve_load.py [--quick] [--teacher ART] [--student ART] [--compiled-student ART]
                                    [--max-tokens 32]

One Serve application holds the teacher three times (continuous batching up to 32 requests, static batching up
to 32, and batching off: max_batch_size 1), the int8 student, and the router; Ray runs as `python -m app serve
--ingress haproxy` starts it (serve_deployments.app.serving_env: HAProxy in place of Serve's proxy, which turns
direct ingress on), so the router answers HTTP behind HAProxy (on one port), by itself (on another) and behind
Serve's Python proxy (the fallback proxy Serve keeps on the head node in that mode, calling the router over gRPC as
`--ingress proxy` does, on a third). Every
configuration gets the same prompts in the same order, from a closed loop of `concurrency` clients on 127.0.0.1;
each request is greedy, at most --max-tokens tokens, and distinct (the router's cache is off), so every one reaches
a model.
Compared:

  (a) the teacher through a DeploymentHandle vs over HTTP through the router, via Serve's proxy, HAProxy
      and direct; goal: router overhead <= 2 ms at p50. Besides the closed loops, one client sends --paired prompts
      each five ways in turn (Serve's default handle, a by-value gRPC handle, proxy, HAProxy, direct; order
      rotating), and the
      overhead is the median of the per-prompt differences, split by the router's Server-Timing header into the
      router's own code and the transport (HTTP, proxy and actor hops) — generation jitter cancels out of the
      pairs. The router calls its models by value over gRPC (router.model_transport), which is faster than the
      default handle, so the overhead is also given against a gRPC handle: the router's cost net of transport;
  (b) batching on vs off, both through handles; goal: >= 4x throughput at concurrency 32; and continuous vs
      static batching (a batch runs to its last request before the next starts), both through handles;
  (c) the fp32 teacher vs the int8 student, both through handles; with --compiled-student, also that artifact
      served with compile: true (GPT.compile_decoding, compiled at replica start) against both.

"mean batch" is the mean number of requests per decode step (forward) in the deployment that served the level,
from its LMServer batch_stats (continuous batching: requests join and leave the running batch between steps).

--teacher defaults to the registry's `demo` (else the newest runs/*/artifact); --student to TEACHER-int8 from the
registry, else an int8 copy of the teacher made here with app.quantize (torch.ao dynamic int8); without
app.quantize, (c) is skipped.
Every replica gets a quarter of a logical CPU and one torch thread. Prints the tables and writes
benchmarks/results/serve_load.json (serve_load_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

LEVELS = (1, 8, 32)
ROUTER_PATHS = ("proxy", "haproxy", "direct")  # Serve's Python proxy, HAProxy, the router replica's own server
SNIPPETS = ["def parse(self, text):", "import os\nimport sys\n", "class Config:\n    def __init__(self",
            "The module provides", "for key, value in items.items():", "Return the number of",
            "    if not isinstance(value, str):", "This function is called when"]


def prompts(n: int) -> list[str]:
    """n distinct prompts (a counter in front of a code or prose snippet), so no two requests are the same."""
    return [f"# {i}\n{SNIPPETS[i % len(SNIPPETS)]}" for i in range(n)]


def requests_per_level(concurrency: int, quick: bool) -> int:
    return max(8 * concurrency, 48) if not quick else max(2 * concurrency, 12)


async def closed_loop(send, texts: list[str], concurrency: int) -> dict:
    """`concurrency` clients each sending the next prompt as soon as their previous answer arrived."""
    latencies: list[float] = []
    tokens = 0
    it = iter(texts)

    async def client() -> None:
        nonlocal tokens
        for text in it:
            t0 = time.perf_counter()
            n = await send(text)  # not `tokens += await ...`: that reads `tokens` before the await
            tokens += n
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"requests": len(latencies), "p50_ms": 1e3 * statistics.median(latencies),
            "p99_ms": 1e3 * latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
            "req_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall, "wall_s": wall}


def router_ms(server_timing: str) -> float:
    """The router's own milliseconds from `Server-Timing: router;dur=1.20, model;dur=35.00`."""
    parts = dict(p.strip().split(";dur=") for p in server_timing.split(","))
    return float(parts["router"])


async def paired_overhead(handles: dict, post, texts: list[str], tick) -> dict:
    """One client; each prompt through each handle in `handles` (label → send) and the router via each of
    ROUTER_PATHS, in an order rotating per prompt (so no path always goes first). Per router path: the median and
    quartiles of (path − handle) latency per prompt against the first handle (Serve's default), the median
    against each other handle, the router's own median time, and the rest of the median overhead as transport."""
    import numpy as np

    lat: dict[str, list[float]] = {**{label: [] for label in handles}, **{path: [] for path in ROUTER_PATHS}}
    own: dict[str, list[float]] = {path: [] for path in ROUTER_PATHS}
    order = list(lat)
    for i, text in enumerate(texts):
        k = i % len(order)
        for path in order[k:] + order[:k]:
            t0 = time.perf_counter()
            if path in handles:
                await handles[path](text)
            else:
                own[path].append((await post(path, text))[1])
            lat[path].append(1e3 * (time.perf_counter() - t0))
        tick()
    baseline, *others = handles
    out = {}
    for path in ROUTER_PATHS:
        diff = np.array(lat[path]) - np.array(lat[baseline])
        overhead, mine = float(np.median(diff)), float(np.median(own[path]))
        out[path] = {"overhead_ms": overhead, "iqr_ms": [float(q) for q in np.percentile(diff, [25, 75])],
                     "router_ms": mine, "transport_ms": overhead - mine,
                     "p50_ms": float(np.median(lat[path])), "handle_p50_ms": float(np.median(lat[baseline])),
                     "overhead_vs_ms": {label: float(np.median(np.array(lat[path]) - np.array(lat[label])))
                                        for label in others}}
    return {"n": len(texts), "baseline": baseline, "paths": out,
            "handle_p50_ms": {label: float(np.median(lat[label])) for label in handles}}


def default_teacher() -> str:
    """The registry's `demo` model, else the newest runs/*/artifact."""
    from app.registry import Registry

    if Registry().exists("demo"):
        return "demo"
    found = sorted(REPO.glob("runs/*/artifact/model_card.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit("no artifact under runs/*/artifact: run `make demo` or pass --teacher ARTIFACT")
    return str(found[-1].parent)


def default_student(teacher: str, out: Path) -> str | None:
    """TEACHER-int8 from the registry (`python -m app quantize TEACHER`), else an int8 copy made here."""
    from app.errors import UserError
    from app.registry import Registry

    try:
        if Registry().exists(f"{teacher}-int8"):
            return f"{teacher}-int8"
    except UserError:  # the teacher is an artifact folder, not a registry name
        pass
    return make_student(teacher, out)


def make_student(teacher: str, out: Path) -> str | None:
    """An int8 (dynamic, torch.ao) copy of the teacher as an artifact in `out`, or None without app.quantize."""
    try:
        from app.quantize import quantize, quantized_state_dict
    except ImportError:
        return None
    from app.registry import load_artifact, save_artifact

    parent = load_artifact(teacher)
    qmodel, spec = quantize(parent.model, "int8")
    card = {"quantization": spec.method, "quantization_config": spec.to_card(),
            "parameters": parent.model.num_params(non_embedding=False), "lineage": {"parent": teacher}}
    return str(save_artifact(out, quantized_state_dict(qmodel, spec), parent.model.cfg, parent.tokenizer, card))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="artifact folder or registry name (default: newest runs/*/artifact)")
    parser.add_argument("--student", help="int8 artifact or registry name (default: quantize the teacher here)")
    parser.add_argument("--compiled-student",
                        help="also serve this artifact or registry name with compile: true (GPT.compile_decoding; "
                             "e.g. a `quantize --backend torchao` int8 model) and load it through its handle")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    parser.add_argument("--paired", type=int, default=300, help="prompts in the paired overhead run (default 300)")
    parser.add_argument("--quick", action="store_true", help="a few requests per level (smoke run)")
    args = parser.parse_args()
    if args.max_tokens < 1 or args.paired < 10:
        parser.error("--max-tokens must be >= 1 and --paired >= 10")

    import aiohttp
    import ray
    from ray import serve

    from app.console import print_table, progress_bar
    from pipelines.ray_session import environ, free_port
    from serve_deployments.app import APP_NAME, build_app, direct_ingress_env, serving_env

    teacher = args.teacher or default_teacher()
    tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
    student = args.student or default_student(teacher, Path(tmp.name) / "student-int8")
    quarter = {"num_cpus": 0.25}
    models = [{"name": "teacher", "artifact": teacher, "max_batch_size": 32, "ray_actor_options": quarter},
              {"name": "teacher-static", "artifact": teacher, "max_batch_size": 32, "continuous_batching": False,
               "ray_actor_options": quarter},
              {"name": "teacher-nobatch", "artifact": teacher, "max_batch_size": 1, "ray_actor_options": quarter}]
    if student:
        models.append({"name": "student-int8", "artifact": student, "max_batch_size": 32,
                       "ray_actor_options": quarter})
    if args.compiled_student:
        models.append({"name": "student-compiled", "artifact": args.compiled_student, "max_batch_size": 32,
                       "compile": True, "ray_actor_options": quarter})
    port, direct_port = free_port(), free_port()  # HAProxy's, the router replica's
    serve_args = {"models": models, "port": port, "router_ray_actor_options": quarter,
                  "router": {"cache": {"exact": {"enabled": False}}, "guard": {"rate_per_s": 0}}}

    # what `python -m app serve --ingress haproxy` runs, with the router replica's own server on direct_port
    env = {**serving_env(port, "haproxy"), **direct_ingress_env(direct_port)}
    with environ(env):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(serve_args), name=APP_NAME, route_prefix="/")
    handles = {m["name"]: serve.get_deployment_handle(m["name"], app_name=APP_NAME) for m in models}
    infos = {name: h.info.remote().result() for name, h in handles.items()}
    urls = {"proxy": f"http://127.0.0.1:{env['RAY_SERVE_FALLBACK_PROXY_HTTP_PORT']}/v1/completions",
            "haproxy": f"http://127.0.0.1:{port}/v1/completions",
            "direct": f"http://127.0.0.1:{direct_port}/v1/completions"}
    params = {"max_tokens": args.max_tokens, "temperature": 0}

    def via_handle(name: str, by_reference: bool = True):
        """Requests through a DeploymentHandle: Serve's default (Ray actor calls, results by object reference) or
        by value over Serve's inter-deployment gRPC, as the router calls its models by default."""
        handle = handles[name] if by_reference else handles[name].options(_by_reference=False)

        async def send(text: str) -> int:
            return (await handle.generate.remote({"prompt": text, **params}))["completion_tokens"]
        return send

    # (label, how requests are sent, the deployment that decodes them)
    configs = [("teacher, handle", via_handle("teacher"), "teacher"), ("teacher, router (proxy)", "proxy", "teacher"),
               ("teacher, router (HAProxy)", "haproxy", "teacher"), ("teacher, router (direct)", "direct", "teacher"),
               ("teacher, static batching", via_handle("teacher-static"), "teacher-static"),
               ("teacher, batching off", via_handle("teacher-nobatch"), "teacher-nobatch")]
    if student:
        configs.append(("student int8, handle", via_handle("student-int8"), "student-int8"))
    if args.compiled_student:
        configs.append(("compiled student, handle", via_handle("student-compiled"), "student-compiled"))

    async def batches(name: str) -> tuple[int, int]:
        stats = (await handles[name].info.remote())["batch_stats"]
        return stats["rows"], stats["steps"]

    async def run_all() -> tuple[dict, dict]:
        results: dict[str, dict[int, dict]] = {}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
            async def post(path: str, text: str) -> tuple[int, float]:
                """(completion tokens, the router's own ms from its Server-Timing header)."""
                async with http.post(urls[path], json={"model": "teacher", "prompt": text, **params}) as resp:
                    body = await resp.json()
                    if resp.status != 200:
                        raise RuntimeError(f"router ({path}) answered {resp.status}: {body}")
                    return body["usage"]["completion_tokens"], router_ms(resp.headers["server-timing"])

            def via_router(path: str):
                async def send(text: str) -> int:
                    return (await post(path, text))[0]
                return send

            sends = [(label, via_router(send) if isinstance(send, str) else send, name)
                     for label, send, name in configs]
            paired_n = 30 if args.quick else args.paired
            with progress_bar("serve load", len(sends) * len(LEVELS) + paired_n) as bar:
                bar.update(status="warm-up")
                for _, send, _ in sends:  # every path before any is measured: first batches, connections, code
                    await closed_loop(send, prompts(16), 4)
                for label, send, name in sends:
                    for c in LEVELS:
                        bar.update(status=f"{label} @ {c}")
                        n = requests_per_level(c, args.quick)
                        r0, b0 = await batches(name)
                        out = await closed_loop(send, prompts(n), c)
                        r1, b1 = await batches(name)
                        out["mean_batch"] = (r1 - r0) / max(b1 - b0, 1)  # requests per decode step
                        results.setdefault(label, {})[c] = out
                        bar.advance()
                bar.update(status="paired overhead")
                paired = await paired_overhead({"handle": via_handle("teacher"),
                                                "handle (gRPC)": via_handle("teacher", by_reference=False)},
                                               post, prompts(paired_n), bar.advance)
        return results, paired

    try:
        results, paired = asyncio.run(run_all())
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    rows = [(label, c, r["requests"], f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['req_per_s']:.1f}",
             f"{r['tokens_per_s']:.0f}", f"{r['mean_batch']:.1f}") for label, by_c in results.items()
            for c, r in by_c.items()]
    print_table(f"serve load: {args.max_tokens} tokens/request, greedy, loopback",
                ["configuration", "clients", "requests", "p50 ms", "p99 ms", "req/s", "tokens/s", "mean batch"], rows)

    t, r, off = results["teacher, handle"], results["teacher, router (proxy)"], results["teacher, batching off"]
    d, st = results["teacher, router (direct)"], results["teacher, static batching"]
    hp = results["teacher, router (HAProxy)"]
    s = results.get("student int8, handle")
    cs = results.get("compiled student, handle")
    ratios = {c: {"router_overhead_p50_ms": r[c]["p50_ms"] - t[c]["p50_ms"],
                  "router_haproxy_overhead_p50_ms": hp[c]["p50_ms"] - t[c]["p50_ms"],
                  "router_direct_overhead_p50_ms": d[c]["p50_ms"] - t[c]["p50_ms"],
                  "batching_speedup": t[c]["req_per_s"] / off[c]["req_per_s"],
                  "continuous_vs_static_throughput": t[c]["req_per_s"] / st[c]["req_per_s"],
                  "continuous_vs_static_p50": t[c]["p50_ms"] / st[c]["p50_ms"],
                  **({"student_vs_teacher_throughput": s[c]["req_per_s"] / t[c]["req_per_s"],
                      "student_vs_teacher_p50": s[c]["p50_ms"] / t[c]["p50_ms"]} if s else {}),
                  **({"compiled_student_vs_teacher_throughput": cs[c]["req_per_s"] / t[c]["req_per_s"],
                      "compiled_student_vs_student_throughput": cs[c]["req_per_s"] / s[c]["req_per_s"]}
                     if cs and s else {})}
              for c in LEVELS}
    ratio_rows = [(c, f"{x['router_overhead_p50_ms']:+.1f}", f"{x['router_haproxy_overhead_p50_ms']:+.1f}",
                   f"{x['router_direct_overhead_p50_ms']:+.1f}",
                   f"{x['batching_speedup']:.2f}x", f"{x['continuous_vs_static_throughput']:.2f}x",
                   f"{x['continuous_vs_static_p50']:.2f}x",
                   f"{x['student_vs_teacher_throughput']:.2f}x" if s else "skipped",
                   f"{x['student_vs_teacher_p50']:.2f}x" if s else "skipped") for c, x in ratios.items()]
    print_table("side by side (same run)", ["clients", "router overhead p50 ms: proxy", "HAProxy", "direct",
                                            "batching on/off req/s", "continuous/static req/s", "p50",
                                            "int8/fp32 req/s", "int8/fp32 p50"], ratio_rows)
    if cs and s:
        print_table("compiled student (same run)", ["clients", "compiled/teacher req/s", "compiled/int8 student req/s"],
                    [(c, f"{x['compiled_student_vs_teacher_throughput']:.2f}x",
                      f"{x['compiled_student_vs_student_throughput']:.2f}x") for c, x in ratios.items()])
    print_table(f"router overhead, paired: {paired['n']} prompts each sent five ways by one client (ms)",
                ["path", "p50 overhead vs handle", "IQR", "vs gRPC handle", "router's own code", "transport"],
                [(path, f"{x['overhead_ms']:+.2f}", f"{x['iqr_ms'][0]:+.1f} .. {x['iqr_ms'][1]:+.1f}",
                  f"{x['overhead_vs_ms']['handle (gRPC)']:+.2f}", f"{x['router_ms']:.2f}", f"{x['transport_ms']:+.2f}")
                 for path, x in paired["paths"].items()])
    handle_p50 = paired["handle_p50_ms"]
    print(f"handle p50: {handle_p50['handle']:.1f} ms (Serve's default), {handle_p50['handle (gRPC)']:.1f} ms (by "
          "value over gRPC, as the router calls its models)")
    speedup = ratios[32]["batching_speedup"]
    for path, x in paired["paths"].items():
        for against, ms in (("the default handle", x["overhead_ms"]),
                            ("a gRPC handle", x["overhead_vs_ms"]["handle (gRPC)"])):
            print(f"goal (a) router overhead <= 2 ms p50, {path}, against {against}: {ms:+.2f} ms -> "
                  f"{'met' if ms <= 2 else 'NOT met'}")
    print(f"goal (b) batching >= 4x throughput at 32 clients: {speedup:.2f}x -> {'met' if speedup >= 4 else 'NOT met'}")
    if not s:
        print("(c) skipped: no --student and app.quantize is not available to make one")

    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / ("serve_load_quick.json" if args.quick else "serve_load.json")
    out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "teacher": teacher, "student": student if student and not student.startswith(tmp.name) else
        ("int8 copy of the teacher" if student else None),
        "max_tokens": args.max_tokens, "quick": args.quick,
        "compiled_student": args.compiled_student,
        "models": {k: {f: v.get(f) for f in ("parameters", "seq_len", "quantization", "max_batch_size",
                                             "continuous_batching", "torch_threads", "compiled")}
                   for k, v in infos.items()},
        "results": {label: {str(c): r for c, r in by_c.items()} for label, by_c in results.items()},
        "ratios": {str(c): x for c, x in ratios.items()}, "paired_overhead": paired}, indent=2))
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
