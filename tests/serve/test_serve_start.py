"""Starting the application is bounded: replicas that cannot be placed (or a replica that fails) end in a one-line
error instead of Serve's silent, unbounded wait, and the application is removed again."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.errors import UserError
from pipelines.ray_session import free_port
from serve_deployments import app as serving
from tests.serve.test_lm_server import build_tiny_artifact


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return build_tiny_artifact(tmp_path_factory.mktemp("start") / "tiny")


def _status(state: str, app_message: str = "", **messages: str):
    deployments = {name: SimpleNamespace(message=text) for name, text in messages.items()}
    app = SimpleNamespace(status=state, message=app_message, deployments=deployments)
    return SimpleNamespace(applications={serving.APP_NAME: app})


def test_run_bounded_says_what_serve_waits_for_and_gives_up_at_the_deadline(monkeypatch, capsys) -> None:
    """Serve stubbed: each new reason is printed once while it waits; past the deadline the application is deleted
    and the error carries the last reason."""
    from ray import serve
    from ray.serve import api

    waiting = "Deployment 'big' in application 'scalestack' has 1 replicas that have taken more than 30s to be " \
              "scheduled. Resources required for each replica: {'CPU': 64.0}, total resources available: {'CPU': 2.0}."
    statuses = iter([_status("DEPLOYING"), _status("DEPLOYING", big=waiting)])
    calls = []
    monkeypatch.setattr(api, "_run", lambda app, **kw: calls.append(("run", kw["name"], kw["_blocking"])))
    monkeypatch.setattr(serve, "status", lambda: next(statuses, _status("DEPLOYING", big=waiting)))
    monkeypatch.setattr(serve, "delete", lambda name, _blocking=True: calls.append(("delete", name, _blocking)))
    monkeypatch.setattr(serving.time, "sleep", lambda s: None)
    clock = iter(range(0, 10_000, 5))
    monkeypatch.setattr(serving.time, "monotonic", lambda: next(clock))
    with pytest.raises(UserError) as err:
        serving.run_bounded(object(), timeout_s=60)
    text = str(err.value)
    assert text.startswith("serving did not start within 60 s: Deployment 'big'") and "\n" not in text
    assert "{'CPU': 64.0}" in text and "the application is being removed; raise --start-timeout" in text
    assert calls == [("run", "scalestack", False), ("delete", "scalestack", False)]
    assert capsys.readouterr().err.count("waiting: Deployment 'big'") == 1  # said once, not every poll

    failed = "The deployment failed to start 3 times in a row.\nTraceback ...\nFileNotFoundError: no model.pt"
    statuses = iter([_status("DEPLOY_FAILED", "Failed to update the deployments ['tiny'].", tiny=failed)])
    monkeypatch.setattr(serve, "status", lambda: next(statuses))
    with pytest.raises(UserError, match=r"^serving did not start: Failed to update the deployments \['tiny'\]. "
                                        r"\(FileNotFoundError: no model.pt\); replica logs: "):
        serving.run_bounded(object(), timeout_s=None)

    statuses = iter([_status("DEPLOYING"), _status("RUNNING")])
    monkeypatch.setattr(serve, "status", lambda: next(statuses))
    serving.run_bounded(object(), timeout_s=None)  # returns once running


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])  # Ctrl-C; SIGTERM under Ray's handler
def test_an_interrupted_start_removes_the_application(monkeypatch, capsys, interrupt) -> None:
    from ray import serve
    from ray.serve import api

    def status():
        raise interrupt()

    calls = []
    monkeypatch.setattr(api, "_run", lambda app, **kw: calls.append(("run", kw["name"], kw["_blocking"])))
    monkeypatch.setattr(serve, "status", status)
    monkeypatch.setattr(serve, "delete", lambda name, _blocking=True: calls.append(("delete", name, _blocking)))
    with pytest.raises(interrupt):
        serving.run_bounded(object(), timeout_s=60)
    assert calls == [("run", "scalestack", False), ("delete", "scalestack", False)]
    assert "interrupted while serving started: the application is being removed" in capsys.readouterr().err


def test_unplaceable_replicas_end_at_the_start_timeout_and_leave_nothing_behind(ray_local, artifact) -> None:
    """A model asking for more CPUs than the session Ray has: app.deploy gives up after start_timeout_s with the
    application deleted; Ray itself (not started by deploy) stays up."""
    import ray
    from ray import serve

    import app

    quarter = {"num_cpus": 0.25}
    with pytest.raises(UserError, match="serving did not start within 3 s: its replicas were still starting"):
        app.deploy({"models": [{"name": "tiny", "artifact": str(artifact), "ray_actor_options": {"num_cpus": 64}}],
                    "router_ray_actor_options": quarter}, port=free_port(), start_timeout_s=3)
    assert ray.is_initialized()
    deadline = time.monotonic() + 60  # the replica that never started gets Serve's 20 s shutdown grace
    while serving.APP_NAME in serve.status().applications and time.monotonic() < deadline:
        assert serve.status().applications[serving.APP_NAME].status == "DELETING"
        time.sleep(0.5)
    assert serving.APP_NAME not in serve.status().applications


def test_start_timeout_flag_is_checked(tmp_path) -> None:
    from tests.conftest import run_cli

    result = run_cli("serve", "--model", f"tiny={tmp_path / 'missing'}", "--start-timeout", "-1")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --start-timeout -1: must be >= 0 seconds (0 waits for ever)"
