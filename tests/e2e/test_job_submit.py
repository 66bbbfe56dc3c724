"""`ray job submit` against a real head: the test starts `ray start --head --block` as its child and stops it by PID."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.ray_session import free_port
from tests.conftest import REPO


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster with the dashboard (job server) on loopback, token authentication on."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # On SIGTERM the head drains for up to 30 s while the jobs' leftover workers hold leases; nothing here needs that.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "3"
    # `ray start` turns token authentication on only when a token already exists (a fresh machine has none, and the
    # head would then start without it): make sure ~/.ray/auth_token exists, as README's cluster section says.
    subprocess.run([str(bin_dir / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True)
    gcs_port, dash_port = free_port(), free_port()
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs_port),
         "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
         "--include-dashboard", "true", "--disable-usage-stats",
         # fixed defaults (52365, …) would collide with the session's embedded Ray
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
         "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())],
        env={**env, "RAY_AUTH_MODE": "token"}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash_port}"
    client_env = {**env, "RAY_AUTH_MODE": "token"}  # the client sends the token `ray start` keeps in ~/.ray
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            # Ready means a job actually runs: the job server answers before the node's agent can take jobs.
            probe = subprocess.run([str(bin_dir / "ray"), "job", "submit", "--address", address, "--", "python",
                                    "-c", "pass"], env=client_env, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, "ray start exited early; see head.log"
            time.sleep(2)
        else:
            pytest.fail("the Ray head could not run a job within 120 s")
        yield address, client_env, bin_dir
    finally:  # also when start-up failed: never leave a head behind
        head.send_signal(signal.SIGTERM)  # ray start drains, then stops its own processes
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the group we started, by its PID
            head.wait()
        log.close()


@pytest.mark.slow
def test_train_job_submitted_with_ray_job_submit(ray_head, tiny_data, tmp_path):
    address, env, bin_dir = ray_head
    storage = tmp_path / "runs"
    cmd = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--submission-id", f"scalestack-e2e-{os.getpid()}", "--",
           "python", "-m", "app", "train", "--preset", "tiny", "--steps", "8", "--storage", str(storage),
           "--run-name", "job", "--set", f"data.dir={tiny_data}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    summary = json.loads((storage / "job" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["world_sizes"] == [2]
    assert summary["final_loss"] < summary["first_loss"]
    assert (storage / "job" / "artifact" / "model.safetensors").is_file()


@pytest.fixture
def client(ray_head, monkeypatch):
    """app.Client on the test head; like the `ray` CLI it sends the token from ~/.ray/auth_token."""
    from app.client import Client

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return Client(ray_head[0])


def test_client_submits_streams_waits_and_parses_the_result(client, ray_head):
    from dataclasses import asdict

    from ray.job_submission import JobSubmissionClient

    import app
    from app.client import RESULT_PREFIX, parse_result
    from app.errors import UserError

    sid = f"scalestack-e2e-client-{os.getpid()}"
    job = client.submit("info", "--preset", "tiny", "--set", "model.n_layer=3", submission_id=sid,
                        metadata={"owner": "e2e"}, env={"SCALESTACK_E2E": "1"})
    assert job.id == sid
    lines = list(job.stream_logs())  # returns when the job ends
    assert job.wait(timeout_s=120, show_progress=False) == "SUCCEEDED"
    result = job.result()
    assert result == asdict(app.info("tiny", ["model.n_layer=3"]))  # the same numbers as in this process
    assert result["n_layer"] == 3 and result["preset"] == "tiny" and result["params_total"] > 0
    assert "model info: preset tiny" in "\n".join(lines)
    assert lines[-1].startswith(RESULT_PREFIX) and parse_result("\n".join(lines)) == result
    assert parse_result(job.logs()) == result

    info = JobSubmissionClient(ray_head[0]).get_job_info(sid)  # what the dashboard shows
    assert info.metadata == {"scalestack_command": "info", "scalestack_args": "--preset tiny --set model.n_layer=3",
                             "owner": "e2e"}
    assert info.entrypoint == "python -m app info --preset tiny --set model.n_layer=3"
    assert info.runtime_env["env_vars"]["SCALESTACK_E2E"] == "1" and "/runs" in info.runtime_env["excludes"]
    assert "<td>status</td><td>SUCCEEDED</td>" in job._repr_html_()
    assert client.job(sid).result() == result and job.stop() is False  # already over
    with pytest.raises(UserError, match=f"submitting job {sid} at .* failed: .*already exists"):
        client.submit("info", submission_id=sid)


def test_client_failed_job_raises_naming_the_job(client):
    from app.errors import UserError

    job = client.submit("info", "--preset", "nosuchpreset")
    assert job.id.startswith("scalestack-info-2")  # no run name: the time, then random hex
    with pytest.raises(UserError, match=rf"job {job.id} FAILED: last log lines: .*unknown preset 'nosuchpreset'"):
        job.wait(timeout_s=120, show_progress=False)
    with pytest.raises(UserError, match=rf"job {job.id} printed no result line \(status FAILED\)"):
        job.result()
