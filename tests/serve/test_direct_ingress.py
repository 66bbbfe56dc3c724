"""Direct ingress: the router replica serves HTTP itself on the asked port, Serve's proxy moves aside; and
HAProxy ingress: HAProxy takes the port in the proxy's place and forwards to the router replica's own server.

Ray reads these flags when it starts, so the deployed cases run in a child process with a Ray of their own (the
session's embedded Ray has no flag); the refusals need no Ray at all.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.errors import ConfigError, UserError
from pipelines.ray_session import free_port
import serve_deployments.app as serving
from serve_deployments.app import (DRAIN_VAR, HAPROXY_PORT_VARS, PROXY_ENV, direct_ingress_env, haproxy_env, load_serve_args,
                                   serving_env, start)
from tests.serve.test_lm_server import build_tiny_artifact

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import json, sys, urllib.request
    import app
    from app.errors import UserError
    from serve_deployments.app import parse_args, start

    artifact, port, other = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    args = {"models": [{"name": "tiny", "artifact": artifact, "ray_actor_options": {"num_cpus": 0.25}}],
            "router_ray_actor_options": {"num_cpus": 0.25}}
    client = app.deploy(args, port=port, ingress="direct", num_cpus=1)
    out = {}
    try:
        req = urllib.request.Request(client.base_url + "/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "def f(x):", "max_tokens": 4,
                                                      "temperature": 0}).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            out["status"], out["timing"] = resp.status, resp.headers["server-timing"]
            out["model"] = json.loads(resp.read())["scalestack"]["model"]
        # A client that gives up on a 1,000-token answer after 0.3 s: its row must leave the model's batch
        import time
        from ray import serve
        long = urllib.request.Request(client.base_url + "/v1/completions", method="POST",
                                      data=json.dumps({"prompt": "def f(x):", "max_tokens": 1000, "temperature": 0,
                                                       "stop": ["never-\u2603"]}).encode(),
                                      headers={"content-type": "application/json"})
        try:
            urllib.request.urlopen(long, timeout=0.3)
        except Exception as err:
            out["client_gave_up"] = type(err).__name__
        handle, deadline = serve.get_deployment_handle("tiny", "scalestack"), time.monotonic() + 30
        while time.monotonic() < deadline:
            out["left"] = handle.info.remote().result()["batch_stats"]
            if out["left"]["cancelled"] or out["left"]["steps"] >= 999:
                break
            time.sleep(0.05)
        import os, ray
        from ray.serve.context import _get_global_client
        out["proxy_port"] = ray.get(_get_global_client()._controller.get_http_config.remote()).port
        out["flag_left_in_driver"] = "RAY_SERVE_ENABLE_DIRECT_INGRESS" in os.environ
        # Serve again on this Ray, whose flags name another port: nothing answers there, refused saying how
        try:
            start(parse_args({**args, "port": other}), ingress="direct", wait_s=3)
        except UserError as err:
            out["refusal"] = str(err)
    finally:
        client.shutdown()
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return build_tiny_artifact(tmp_path_factory.mktemp("direct") / "tiny", seq_len=1024)


def test_direct_ingress_serves_on_the_port_without_the_proxy(artifact) -> None:
    """The router answers on the asked port with Serve's proxy elsewhere, a client that leaves mid-answer frees the
    model's row, and serving again on another port of the same Ray is refused saying why."""
    port, other = free_port(), free_port()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(artifact), str(port), str(other)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["status"] == 200 and out["model"] == "tiny"
    assert out["proxy_port"] != port  # Serve's proxy was moved off the port the router replica answered on
    assert out["timing"].startswith("router;dur=") and ", model;dur=" in out["timing"]
    # the client that left: Serve cancels the router's handler, and with it the model call (the row is freed)
    assert out["client_gave_up"] == "TimeoutError", out
    assert out["left"]["cancelled"] == 1 and out["left"]["steps"] < 999, out["left"]
    assert out["flag_left_in_driver"] is False  # the flags went to the Ray it started, not into the caller's env
    assert out["refusal"].startswith(f"ingress direct: nothing answers on port {other}")
    assert f"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT={other}" in out["refusal"]


def test_direct_ingress_refuses_a_taken_port_and_unknown_modes(artifact) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = load_serve_args(None, [f"tiny={artifact}"], None, port)
        with pytest.raises(UserError, match=f"port {port}: already in use on 127.0.0.1; pass a free --port"):
            start(args, ingress="direct")
    with pytest.raises(ConfigError, match="ingress: expected one of auto, proxy, direct, haproxy, got 'nginx'"):
        start(args, ingress="nginx")


def test_serving_env_always_sends_the_proxy_over_grpc() -> None:
    assert serving_env(8123) == PROXY_ENV == {"RAY_SERVE_PROXY_USE_GRPC": "1"}
    assert serving_env(8123, "direct") == {**PROXY_ENV, **direct_ingress_env(8123)}


def test_direct_ingress_env_names_the_port_range() -> None:
    env = direct_ingress_env(8123)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("8123", "8187")
    assert direct_ingress_env(65530)["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] == "65535"


HAPROXY_CHILD = textwrap.dedent("""
    import json, os, subprocess, sys, urllib.request
    import app
    from serve_deployments.app import haproxy_running

    artifact, port = sys.argv[1], int(sys.argv[2])
    args = {"models": [{"name": "tiny", "artifact": artifact, "ray_actor_options": {"num_cpus": 0.25}}],
            "router_ray_actor_options": {"num_cpus": 0.25}}
    client = app.deploy(args, port=port, num_cpus=1)  # the default ingress, auto: HAProxy on a Ray started here
    out = {"ingress": client.ingress}
    try:
        def post(body):
            req = urllib.request.Request(client.base_url + "/v1/completions", method="POST",
                                         data=json.dumps(body).encode(), headers={"content-type": "application/json"})
            return urllib.request.urlopen(req, timeout=60)
        with post({"prompt": "def f(x):", "max_tokens": 4, "temperature": 0}) as resp:
            out["status"], out["timing"] = resp.status, resp.headers["server-timing"]
            out["model"] = json.loads(resp.read())["scalestack"]["model"]
        with post({"prompt": "def f(x):", "max_tokens": 6, "temperature": 0, "stream": True}) as resp:
            out["stream_type"] = resp.headers["content-type"]
            out["events"] = [line.decode().strip() for line in resp if line.startswith(b"data:")]
        try:  # the empty prompt: the router's own 400, through HAProxy
            post({"prompt": "", "max_tokens": 4}).close()
            out["bad_status"] = 200
        except urllib.error.HTTPError as err:
            out["bad_status"], out["bad_body"] = err.code, json.loads(err.read())
        out["haproxy_running"] = haproxy_running()
        listeners = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
        out["listener"] = next((line for line in listeners.splitlines() if f"127.0.0.1:{port} " in line), "")
        out["flag_left_in_driver"] = "RAY_SERVE_ENABLE_HA_PROXY" in os.environ
    finally:
        client.shutdown()
    print("RESULT " + json.dumps(out))
""")


def test_haproxy_ingress_answers_streams_and_refuses_through_haproxy(artifact) -> None:
    """app.deploy starting Ray itself serves through HAProxy by default: HAProxy itself listens on the asked port;
    completions, streams and the router's own 400s pass through it unchanged; the flag went to the Ray app.deploy
    started, not into the caller."""
    port = free_port()
    proc = subprocess.run([sys.executable, "-c", HAPROXY_CHILD, str(artifact), str(port)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["ingress"] == "haproxy"
    assert out["status"] == 200 and out["model"] == "tiny"
    assert out["timing"].startswith("router;dur=") and ", model;dur=" in out["timing"]
    assert out["stream_type"].startswith("text/event-stream")
    assert out["events"][-1] == "data: [DONE]" and len(out["events"]) >= 3, out["events"]
    assert out["bad_status"] == 400 and "prompt" in json.dumps(out["bad_body"]), out
    assert out["haproxy_running"] is True
    assert '"haproxy"' in out["listener"], out["listener"]  # the port is HAProxy's, not a Ray actor's
    assert out["flag_left_in_driver"] is False


def test_haproxy_ingress_on_a_ray_without_the_flag_is_refused_saying_how(artifact, monkeypatch) -> None:
    """A running Ray started without RAY_SERVE_ENABLE_HA_PROXY answers through Serve's Python proxy: the app is
    taken down again and the error says which flag the cluster needs (Serve itself is stubbed: no Ray here)."""
    from ray import serve

    calls = []
    monkeypatch.setattr(serve, "start", lambda **kw: calls.append(("start", kw["http_options"]["port"])))
    monkeypatch.setattr(serving, "run_bounded", lambda app, timeout_s: calls.append(("run", serving.APP_NAME)))
    monkeypatch.setattr(serve, "delete", lambda name: calls.append(("delete", name)))
    monkeypatch.setattr(serving.ServeClient, "wait_ready", lambda self, timeout_s: None)
    monkeypatch.setattr(serving, "haproxy_running", lambda: False)
    args = load_serve_args(None, [f"tiny={artifact}"], None, 8123)
    with pytest.raises(UserError, match="ingress haproxy: this Ray cluster runs Serve's Python proxy, not HAProxy; "
                                        "start it with RAY_SERVE_ENABLE_HA_PROXY=1"):
        start(args, ingress="haproxy")
    assert calls == [("start", 8123), ("run", "scalestack"), ("delete", "scalestack")]


def test_haproxy_env_keeps_servers_on_one_machine_apart(monkeypatch) -> None:
    env, other = haproxy_env(8123), haproxy_env(8124)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    files = [k for k in env if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
    assert len(files) == 5 and all(env[k].startswith("/tmp/ss-haproxy-8123") for k in files)
    assert all(env[k] != other[k] for k in files)
    assert not {*HAPROXY_PORT_VARS, DRAIN_VAR} & set(env)  # on a cluster, Ray's default ports and drain period
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "9999")  # one a user named stays
    local = serving_env(8123, "haproxy")
    assert local["RAY_SERVE_HAPROXY_METRICS_PORT"] == "9999"
    ports = [int(local[k]) for k in HAPROXY_PORT_VARS]
    assert len(set(ports)) == 4 and all(1024 < p < 65536 for p in ports)
    assert local[DRAIN_VAR] == "2"  # one node: its HAProxy forgets a stopping replica at once, no 30 s wait
    assert local["RAY_SERVE_PROXY_USE_GRPC"] == "1"  # its fallback proxy calls over gRPC like the default one
