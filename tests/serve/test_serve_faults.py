"""The deployed application: ServeArgs and config files, app.deploy + HTTP end to end through the router, and one
of two replicas killed under load on 127.0.0.1 (at most 0.1% of requests may fail)."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from app.errors import ConfigError
from pipelines.ray_session import free_port
from serve_deployments.app import ROUTER_ENV, load_serve_args, parse_args, router_actor_options
from tests.serve.test_lm_server import alone, build_tiny_artifact

REPO = Path(__file__).resolve().parents[2]

# ---- config: no Ray ---------------------------------------------------------------------------------------------


def test_serve_config_yaml_and_model_flags() -> None:
    args = load_serve_args(REPO / "serve_deployments" / "serve_config.yaml", ["demo=runs/x/artifact", "extra=y"],
                           port=9001)
    assert [m.name for m in args.models] == ["demo", "demo-int8", "extra"]
    assert args.models[0].artifact == "runs/x/artifact" and args.models[0].max_batch_size == 16
    assert args.models[1].autoscaling_config["max_replicas"] == 2 and args.models[1].num_replicas is None
    assert (args.host, args.port, args.router["default_model"]) == ("127.0.0.1", 9001, "demo-int8")


@pytest.mark.parametrize("raw, message", [
    ({"models": []}, "models"),
    ({"models": [{"name": "a", "artifact": "x"}, {"name": "a", "artifact": "y"}]}, "repeated: a"),
    ({"models": [{"name": "a", "artifact": "x", "num_replicas": 2, "autoscaling_config": {}}]}, "not both"),
    ({"models": [{"name": "a b", "artifact": "x"}]}, "models.0.name"),
    ({"models": [{"name": "a", "artifact": "x", "max_batch_size": 0}]}, "models.0.max_batch_size"),
    ({"models": [{"name": "a", "artifact": "x"}], "prot": 1}, "prot"),
])
def test_bad_serve_args_are_one_line_config_errors(raw, message) -> None:
    with pytest.raises(ConfigError) as err:
        parse_args(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_router_replica_runs_its_code_on_its_own_loop_unless_told_otherwise() -> None:
    assert router_actor_options(None) == {"runtime_env": {"env_vars": ROUTER_ENV}}  # Serve adds its 1 CPU
    mine = {"num_cpus": 0.5, "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
                                                          "X": "y"}, "working_dir": "."}}
    out = router_actor_options(mine)
    assert out["num_cpus"] == 0.5 and out["runtime_env"]["working_dir"] == "."
    assert out["runtime_env"]["env_vars"] == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1", "X": "y",
                                              "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
    assert mine["runtime_env"]["env_vars"] == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1", "X": "y"}


def test_the_router_process_never_imports_torch() -> None:
    """The router replica loads serve_deployments.router only; torch there cost its first request ~1.3 s."""
    import subprocess
    import sys

    code = "import sys, serve_deployments.router, serve_deployments.app; print(sorted(m for m in sys.modules if m == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_model_flag_needs_name_and_artifact() -> None:
    with pytest.raises(ConfigError, match="NAME=ARTIFACT"):
        load_serve_args(None, ["just-a-path"])
    with pytest.raises(ConfigError, match="no models to serve"):
        load_serve_args(None, [])


def test_config_files_that_are_not_serve_configs_are_one_line_errors(tmp_path) -> None:
    cases = {"broken.yaml": ("models: [\n", r"not valid YAML at line 2"),  # was a yaml traceback
             "list.yaml": ("- 1\n- 2\n", "expected a YAML mapping")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=f"--config {tmp_path / name}: {message}"):
            load_serve_args(tmp_path / name)
    with pytest.raises(ConfigError, match="no such file"):
        load_serve_args(tmp_path / "missing.yaml")


# ---- deployed: one app, two replicas of a tiny model, HTTP on loopback ----------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return build_tiny_artifact(tmp_path_factory.mktemp("faults") / "tiny")


@pytest.fixture(scope="module")
def client(ray_local, artifact):
    import app

    quarter = {"num_cpus": 0.25}
    c = app.deploy({
        "models": [{"name": "tiny", "artifact": str(artifact), "num_replicas": 2, "ray_actor_options": quarter}],
        # No cache (every request must reach a replica) and no rate limit (the load is the point).
        "router": {"cache": {"exact": {"enabled": False}}, "guard": {"rate_per_s": 0}},
        "router_ray_actor_options": quarter,
    }, port=free_port())
    assert c.ingress == "proxy"  # auto on a running Ray without the HAProxy flag: Serve's proxy answers
    yield c
    c.shutdown()


def test_http_completion_through_the_router(client, artifact) -> None:
    from app.registry import load_artifact

    loaded = load_artifact(artifact)
    res = client.complete("def f(x):", model="tiny", max_tokens=8, temperature=0)
    expected = alone(loaded, [loaded.tokenizer.eos_id, *loaded.tokenizer.encode("def f(x):")], 8)
    assert res["choices"][0]["text"] == loaded.tokenizer.decode(expected)
    assert res["scalestack"]["model"] == "tiny" and res["usage"]["completion_tokens"] == len(expected)
    assert [m["id"] for m in client.models()] == ["auto", "tiny"]
    chat = client.chat("hello", max_tokens=4, temperature=0)
    assert chat["choices"][0]["message"]["role"] == "assistant" and chat["scalestack"]["model"] == "tiny"


def _replicas() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::scalestack#tiny#"))


def test_killing_one_of_two_replicas_under_load_fails_at_most_0_1_percent(client) -> None:
    import ray

    replicas = _replicas()
    assert len(replicas) == 2
    n, concurrency = 200, 8
    done, failures, lock = [], [], threading.Lock()
    killed_at: list[int] = []

    def one(i: int) -> None:
        body = json.dumps({"model": "tiny", "prompt": f"request {i}: def f(x):", "max_tokens": 8,
                           "temperature": 0}).encode()
        req = urllib.request.Request(client.base_url + "/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                ok = resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] >= 1
        except Exception:  # noqa: BLE001 - every failure counts, whatever its kind
            ok = False
        with lock:
            (done if ok else failures).append(i)
            if len(done) == 40 and not killed_at:  # a fifth of the way in, with requests in flight on both
                killed_at.append(len(done) + len(failures))
                ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    assert killed_at, "the replica was never killed"
    assert len(failures) <= 0.001 * n, f"{len(failures)} of {n} requests failed: {failures[:5]}"
    assert len(done) == n and wall < 45
    # Serve replaces the dead replica.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (len(_replicas()) < 2 or replicas[0] in _replicas()):
        time.sleep(0.5)
    assert len(_replicas()) == 2 and replicas[0] not in _replicas()
