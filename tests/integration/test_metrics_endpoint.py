"""Our training and serving metrics reach Ray's Prometheus endpoint, with the values the code computed.

A tiny training run (2 workers, ZeRO-2, a few steps) sets the `scalestack_train_*` gauges on rank 0; the model it
exports is then served by two LMServer deployments behind the router, whose `scalestack_router_*` counters and
histograms are compared with what the HTTP client saw and with the router's own /v1/stats.

Ray's per-node metrics agent serves every process's metrics on the node's metrics export port; it runs with the
session's embedded Ray although that starts without the dashboard. Processes report to it every
`metrics_report_interval_ms` (10 s by default), and the agent drops a gauge that has not been re-reported for two
intervals: once the training workers exit, their gauges age out. So the endpoint is read by a scraper thread that
runs beside training, and every read is polled against a deadline. Counters are cumulative over the session, so
the router's figures are compared as differences from a reading taken just before the requests.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections import Counter

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from app.config import load_config
from pipelines import train
from serve_deployments.metrics import route_label

pytestmark = pytest.mark.slow

RUN = "metrics-endpoint"
STEPS = 8
TRAIN_GAUGES = {f"ray_scalestack_train_{n}" for n in
                ("loss", "val_loss", "tokens_per_s", "mfu", "step_time_s", "straggler_ratio", "step")}
EXPORT_WAIT_S = 35  # > 3 report intervals of 10 s
CODE = "import os\nfor name in os.listdir(path):\n    print(name)\n"
CODE_2 = "import os\nfor name in os.listdir(path):\n    print(len(name))\n"
DOCS = "The import statement finds a module, loads and initialises it, and binds a name in the local scope."
DOCS_2 = "The import statement finds a module and binds a name in the local scope."
POLICY = {"kind": "domain", "default": "probe-teacher", "routes": {
    # threshold 0: a mean log-prob is always below it, so every code request escalates to the teacher
    "code": {"kind": "cascade", "student": "probe-student", "teacher": "probe-teacher", "threshold": 0.0},
    "docs": {"kind": "shadow", "route": "probe-student", "shadow": "probe-teacher"}}}


def scrape(endpoint: str, prefix: str = "ray_scalestack_") -> list:
    """Every sample on the endpoint whose series name starts with `prefix` (parsed by prometheus_client)."""
    text = requests.get(endpoint, timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name.startswith(prefix)]


def _key(sample) -> tuple:
    return sample.name, tuple(sorted(sample.labels.items()))


@pytest.fixture(scope="module")
def endpoint(ray_local) -> str:
    node = ray_local._private.worker.global_worker.node
    port = node.metrics_export_port
    assert [n["MetricsExportPort"] for n in ray_local.nodes() if n["Alive"]] == [port]
    return f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="module")
def training(tiny_data, endpoint, tmp_path_factory):
    """The run's result and every value the endpoint showed for each of its gauges (series name -> values)."""
    seen: dict[str, list[float]] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for s in scrape(endpoint, "ray_scalestack_train_"):
                if s.labels.get("run") == RUN:
                    seen.setdefault(s.name, []).append(s.value)
            stop.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cfg = load_config("tiny", [f"data.dir={tiny_data}", f"storage={tmp_path_factory.mktemp('runs')}", f"name={RUN}",
                               f"steps={STEPS}", "eval_every=4", "checkpoint.every_steps=0", "log_every=4"])
    try:
        result = train.run(cfg, progress=False)
        deadline = time.monotonic() + EXPORT_WAIT_S
        while time.monotonic() < deadline and not TRAIN_GAUGES <= seen.keys():
            time.sleep(0.5)
    finally:
        stop.set()
        watcher.join()
    return result, seen


@pytest.mark.slow
def test_training_gauges_carry_the_runs_own_values(training):
    result, seen = training
    assert TRAIN_GAUGES <= seen.keys(), f"seen only {sorted(seen)} within {EXPORT_WAIT_S} s of the run's end"
    assert all(v == int(v) and 1 <= v <= STEPS for v in seen["ray_scalestack_train_step"])
    # every value the endpoint showed is one that rank 0 computed for some step of this run, bit for bit
    for name in TRAIN_GAUGES:
        column = result.history[name.removeprefix("ray_scalestack_train_")].dropna().tolist()
        for value in seen[name]:
            assert value in column, f"{name}={value!r} is none of the run's values {column}"
    assert all(0 < v < math.log(512) + 2 for v in seen["ray_scalestack_train_loss"])
    assert all(0 < v < 1 for v in seen["ray_scalestack_train_mfu"])
    assert all(v >= 1.0 for v in seen["ray_scalestack_train_straggler_ratio"])
    assert all(v > 0 for v in seen["ray_scalestack_train_tokens_per_s"] + seen["ray_scalestack_train_step_time_s"])
    # goodput is this attempt's productive share so far (not in the history): a fraction, set with the others
    assert seen.get("ray_scalestack_train_goodput") and all(0 < v <= 1 for v in seen["ray_scalestack_train_goodput"])


@pytest.fixture(scope="module")
def router(training, endpoint):
    """The trained model served as `probe-student` and `probe-teacher` behind a router exporting its metrics."""
    from ray import serve

    from serve_deployments.lm_server import LMServer
    from serve_deployments.router import Router

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    artifact = str(training[0].artifact)
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    models = {name: LMServer.options(name=name, **small).bind(artifact, name)
              for name in ("probe-student", "probe-teacher")}
    app = Router.options(name="probe-router", **small).bind(models, {
        "policy": POLICY, "guard": {"rate_per_s": 0}, "export_metrics": True})
    serve.run(app, name="metrics-probe", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _series_sum(before: dict, after: list, name: str, by: str | None = None, **match) -> Counter:
    """Increase of a cumulative series since `before`, summed by one label (or in all when `by` is None)."""
    out: Counter = Counter()
    for s in after:
        if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
            out[s.labels.get(by) if by else "all"] += s.value - before.get(_key(s), 0.0)
    return +out  # drop zero entries


@pytest.mark.slow
def test_router_metrics_match_the_responses_and_the_routers_stats(router, endpoint):
    before = {_key(s): s.value for s in scrape(endpoint, "ray_scalestack_router_")}
    greedy = {"max_tokens": 6, "temperature": 0}
    answers = [requests.post(f"{router}/v1/completions", json={"prompt": p, **greedy}, timeout=120)
               for p in (DOCS, DOCS_2, CODE, CODE_2, DOCS)]  # the second DOCS is an exact cache hit
    missing = requests.post(f"{router}/v1/completions", json={"prompt": DOCS, "model": "nope", **greedy}, timeout=30)
    assert [r.status_code for r in answers] == [200] * 5 and missing.status_code == 404

    want_model = Counter(r.headers["x-scalestack-model"] for r in answers)
    want_cache = Counter(r.headers["x-scalestack-cache"] for r in answers)
    want_route = Counter("cache" if r.headers["x-scalestack-cache"] in ("exact", "semantic")
                         else route_label(r.headers["x-scalestack-route"]) for r in answers)
    want_tokens = Counter()
    for r in answers:
        if r.headers["x-scalestack-cache"] == "miss":
            want_tokens[r.headers["x-scalestack-model"]] += r.json()["usage"]["completion_tokens"]
    escalated = sum(r.headers["x-scalestack-escalated"] == "true" for r in answers)
    assert want_cache == {"miss": 4, "exact": 1} and escalated == 2 and want_model["probe-teacher"] >= 2

    # the shadow copies finish after their responses; /v1/stats also sets the drift gauge
    deadline = time.monotonic() + 30
    while (stats := requests.get(f"{router}/v1/stats", timeout=30).json())["shadow"]["calls"] < 2:
        assert time.monotonic() < deadline, stats["shadow"]
        time.sleep(0.5)
    assert stats["by_model"] == dict(want_model) and stats["escalations"] == escalated

    def figures(after: list) -> dict:
        return {
            "by_model": _series_sum(before, after, "ray_scalestack_router_requests_total", "model"),
            "by_cache": _series_sum(before, after, "ray_scalestack_router_requests_total", "cache"),
            "by_route": _series_sum(before, after, "ray_scalestack_router_requests_total", "route"),
            "tokens": _series_sum(before, after, "ray_scalestack_router_tokens_total", "model"),
            "escalations": _series_sum(before, after, "ray_scalestack_router_escalations_total")["all"],
            "errors": _series_sum(before, after, "ray_scalestack_router_errors_total", "status"),
            "latency_n": _series_sum(before, after, "ray_scalestack_router_latency_s_count", "model"),
            "latency_inf": _series_sum(before, after, "ray_scalestack_router_latency_s_bucket", "model", le="+Inf"),
            "latency_sum": _series_sum(before, after, "ray_scalestack_router_latency_s_sum", "model"),
            "shadow_n": _series_sum(before, after, "ray_scalestack_router_shadow_disagreement_count")["all"],
            "drift": [s.value for s in after if s.name == "ray_scalestack_router_prompt_drift"],
        }

    want = {"by_model": want_model, "by_cache": want_cache, "by_route": want_route, "tokens": +want_tokens,
            "escalations": escalated, "errors": Counter({"404": 1}), "latency_n": want_model,
            "latency_inf": want_model, "shadow_n": stats["shadow"]["calls"]}
    deadline = time.monotonic() + EXPORT_WAIT_S
    while True:
        after = scrape(endpoint, "ray_scalestack_router_")
        got = figures(after)
        if all(got[k] == v for k, v in want.items()) and stats["drift"]["score"] in got["drift"]:
            break
        assert time.monotonic() < deadline, f"after {EXPORT_WAIT_S} s the endpoint shows {got}, expected {want}"
        time.sleep(1.0)

    # latency: one observation per answer, and the router's own median lies in the bucket the endpoint puts it in
    for model, n in want_model.items():
        assert stats["latency"][model]["n"] == n and 0 < got["latency_sum"][model] < 60 * n
        cumulative = {float(le): c for le, c in _series_sum(before, after, "ray_scalestack_router_latency_s_bucket",
                                                            "le", model=model).items()}
        below = max([le for le, c in cumulative.items() if c < math.ceil(n / 2)], default=0.0)
        above = min(le for le, c in cumulative.items() if c >= n // 2 + 1)
        assert below < stats["latency"][model]["p50_ms"] / 1e3 <= above, (model, stats["latency"], cumulative)
    assert stats["shadow"]["calls"] == 2  # both docs misses were copied to the shadow; the cache hit was not
    assert 0 <= stats["drift"]["score"] <= 1
