"""Direct ingress: the router replica serves HTTP itself on the asked port, Serve's proxy moves aside.

Ray reads the direct-ingress flag when it starts, so the deployed case runs in a child process with a Ray of its
own (the session's embedded Ray has no flag); the refusals need no Ray at all.
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
from serve_deployments.app import PROXY_ENV, direct_ingress_env, load_serve_args, serving_env, start
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
    with pytest.raises(ConfigError, match="ingress: expected one of proxy, direct, got 'haproxy'"):
        start(args, ingress="haproxy")


def test_serving_env_always_sends_the_proxy_over_grpc() -> None:
    assert serving_env(8123) == PROXY_ENV == {"RAY_SERVE_PROXY_USE_GRPC": "1"}
    assert serving_env(8123, "direct") == {**PROXY_ENV, **direct_ingress_env(8123)}


def test_direct_ingress_env_names_the_port_range() -> None:
    env = direct_ingress_env(8123)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("8123", "8187")
    assert direct_ingress_env(65530)["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] == "65535"
