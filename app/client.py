"""Ray jobs from Python: `Client(address).submit("train", ...)` runs a CLI command on a cluster and returns a `Job`.

    from app import Client
    job = Client("http://127.0.0.1:8265").submit("train", "--preset", "small", "--workers", "2:8")
    for line in job.stream_logs():   # as the driver prints them
        print(line)
    job.wait()                       # "SUCCEEDED", or UserError naming the job and its last log lines
    job.result()                     # the command's result as a dict (train: summary + run_dir + artifact)

A job runs `python -m app COMMAND ARGS` in a copy of the working directory (runs/, .venv/, .git/ and caches are
left out of the upload). Relative paths in ARGS resolve inside that copy: give data and storage as absolute paths
on a filesystem every node mounts, or as URIs. The command's last stdout line is `scalestack-result: {json}`
(the CLI prints it when SCALESTACK_RESULT_LINE=1, which the Client sets); `Job.result()` parses it.

Token auth: like `ray job submit`, the client sends the token (~/.ray/auth_token or RAY_AUTH_TOKEN) only with
RAY_AUTH_MODE=token in the environment. Ray is imported when a Client is made, not when this module is.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from app.console import html_table
from app.errors import UserError

__all__ = ["Client", "Job", "JobResult", "RESULT_PREFIX", "build_entrypoint", "default_submission_id",
           "job_runtime_env", "parse_result", "result_line"]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
RESULT_PREFIX = "scalestack-result: "
RESULT_ENV = "SCALESTACK_RESULT_LINE"
# Gitignore syntax, relative to the working dir. Runs, checkpoints and the venv are GBs (Ray refuses a working dir
# over 500 MiB) and no job needs them. Ray 2.60 also skips .gitignore'd files and, by default, .git, .venv and
# __pycache__; both can be turned off (RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES, no .gitignore), this list cannot.
# No trailing slashes: Ray matches a folder's own path without one, and a match skips the whole folder.
UPLOAD_EXCLUDES = ["/runs", "/.venv", "/.git", "/benchmarks/results", "__pycache__", "/.pytest_cache", "/.hypothesis",
                   "*.egg-info"]
_CHECKOUT = Path(__file__).resolve().parents[1]  # the folder holding app/ and pyproject.toml in a source checkout


# ---- pure parts: entrypoint, names, runtime env, the result line ---------------------------------------------


def build_entrypoint(command: str, args: Sequence[object] = ()) -> str:
    """`python -m app COMMAND ARGS`, each word shell-quoted. Raises UserError for a command the CLI lacks."""
    from app.__main__ import COMMANDS

    if command not in COMMANDS:
        raise UserError(f"command {command!r} is not a scalestack command; use one of {', '.join(COMMANDS)}")
    return shlex.join(["python", "-m", "app", command, *(str(a) for a in args)])


def run_name(args: Sequence[object]) -> str | None:
    """The run name in CLI args: `--run-name X`, `--run-name=X` or `--set name=X` (the last one wins)."""
    words, found = [str(a) for a in args], None
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else None
        if word == "--run-name" and following is not None:
            found = following
        elif word.startswith("--run-name="):
            found = word.split("=", 1)[1]
        elif word == "--set" and following is not None and following.startswith("name="):
            found = following.split("=", 1)[1]
    return found


def default_submission_id(command: str, args: Sequence[object] = (), *, now: datetime | None = None,
                          suffix: str | None = None) -> str:
    """`scalestack-COMMAND-<run name, else YYYYmmdd-HHMMSS>-<6 hex>`: readable in the dashboard, unique per submit."""
    label = run_name(args) or (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "run"
    return f"scalestack-{command}-{label}-{suffix or secrets.token_hex(3)}"


def job_runtime_env(runtime_env: Mapping[str, Any] | None = None, *, working_dir: str | Path | None = None,
                    env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime env: `runtime_env` plus the working dir (default: this checkout, else the current folder),
    the upload excludes, and env vars that make the CLI print its result line and flush logs as it goes.
    Precedence: `env` over `runtime_env["env_vars"]` over these defaults."""
    out = dict(runtime_env or {})
    if working_dir is not None or "working_dir" not in out:
        default = _CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path.cwd()
        out["working_dir"] = str(working_dir if working_dir is not None else default)
    out["excludes"] = [*out.get("excludes", []), *(e for e in UPLOAD_EXCLUDES if e not in out.get("excludes", []))]
    out["env_vars"] = {"RAY_USAGE_STATS_ENABLED": "0", RESULT_ENV: "1", "PYTHONUNBUFFERED": "1",
                       **out.get("env_vars", {}), **{k: str(v) for k, v in (env or {}).items()}}
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    return str(value)


def result_line(result: Mapping[str, Any]) -> str:
    """One line: RESULT_PREFIX + the result as compact JSON (paths and numpy values converted)."""
    return RESULT_PREFIX + json.dumps(result, default=_jsonable, separators=(",", ":"))


def parse_result(logs: str) -> dict[str, Any] | None:
    """The last `scalestack-result:` line in `logs` as a dict, or None when there is none."""
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


class JobResult(dict):
    """A command's result (a plain dict) that renders as a table in a notebook."""

    def _repr_html_(self) -> str:
        rows = [(k, v if isinstance(v, (str, int, float)) else json.dumps(v, default=str)) for k, v in self.items()]
        return html_table(["field", "value"], rows)


# ---- the shell over Ray's JobSubmissionClient --------------------------------------------------------------


@contextmanager
def _ray_errors(what: str, address: str) -> Iterator[None]:
    """Ray's connection, auth and request errors as one-line UserErrors that say what to do."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except ConnectionError:
        raise UserError(f"no Ray job server answers at {address} ({what}): start one (`ray start --head`), open a "
                        "tunnel (`ray dashboard cluster.yaml`), or pass Client(address=...) / set RAY_ADDRESS") from None
    except AuthenticationError:
        raise UserError(f"the Ray job server at {address} refused the token ({what}): set RAY_AUTH_MODE=token and the "
                        "cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN (`ray get-auth-token` prints it)") from None
    except RuntimeError as err:  # the server's answer; on a 500 it is a traceback whose last line says why
        lines = [line.strip() for line in str(err).splitlines() if any(c.isalpha() for c in line)] or ["?"]
        raise UserError(f"{what} at {address} failed: {lines[-1][:300]}") from None


def _sync_auth_mode() -> None:
    """Ray reads RAY_AUTH_MODE once per process; when it was set afterwards (a notebook cell, a test), re-read it
    the way `ray.init` does, so the token goes with every request."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and not is_token_auth_enabled():
        from ray._raylet import Config

        Config.initialize("")


class Client:
    """Submits scalestack commands as Ray jobs to the job server at `address` (default $RAY_ADDRESS, else
    http://127.0.0.1:8265; an explicit address wins over the variable)."""

    def __init__(self, address: str | None = None) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
        _sync_auth_mode()
        # Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given: hide them while connecting.
        hidden = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
                  if address and k in os.environ}
        try:
            with _ray_errors("connecting", self.address):
                self.jobs = JobSubmissionClient(self.address)
        finally:
            os.environ.update(hidden)

    def submit(self, command: str, *args: object, working_dir: str | Path | None = None,
               runtime_env: Mapping[str, Any] | None = None, submission_id: str | None = None,
               entrypoint_num_cpus: float | None = None, entrypoint_resources: Mapping[str, float] | None = None,
               metadata: Mapping[str, object] | None = None, env: Mapping[str, str] | None = None) -> Job:
        """Run `python -m app COMMAND ARGS` as a job; returns at once with a `Job`.

        `working_dir`: uploaded for the job (default: this checkout); `runtime_env`: Ray's, merged with the working
        dir, upload excludes and env vars; `env`: extra env vars; `submission_id`: default
        `scalestack-COMMAND-<run name or time>-<hex>`; `entrypoint_num_cpus` / `entrypoint_resources`: what the
        driver reserves (the trainer's workers ask for their own); `metadata`: shown in the dashboard, next to
        `scalestack_command`, `scalestack_args` and `run_name`."""
        entrypoint = build_entrypoint(command, args)
        sid = submission_id or default_submission_id(command, args)
        tags = {"scalestack_command": command, "scalestack_args": shlex.join(str(a) for a in args)}
        if run_name(args):
            tags["run_name"] = run_name(args)
        tags.update({str(k): str(v) for k, v in (metadata or {}).items()})
        with _ray_errors(f"submitting job {sid}", self.address):
            self.jobs.submit_job(
                entrypoint=entrypoint, submission_id=sid, metadata=tags,
                runtime_env=job_runtime_env(runtime_env, working_dir=working_dir, env=env),
                entrypoint_num_cpus=entrypoint_num_cpus,
                entrypoint_resources=dict(entrypoint_resources) if entrypoint_resources else None,
            )
        return Job(sid, self)

    def job(self, submission_id: str) -> Job:
        """A handle on a job submitted earlier (by this client, `ray job submit`, or another machine)."""
        with _ray_errors(f"looking up job {submission_id}", self.address):
            self.jobs.get_job_status(submission_id)
        return Job(submission_id, self)

    def __repr__(self) -> str:
        return f"Client({self.address!r})"


class Job:
    """One submitted job: `.status()`, `.logs()`, `.stream_logs()`, `.wait()`, `.result()`, `.stop()`."""

    def __init__(self, id: str, client: Client) -> None:
        self.id, self.client = id, client

    def status(self) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        with _ray_errors(f"status of job {self.id}", self.client.address):
            return str(self.client.jobs.get_job_status(self.id))

    def info(self):
        """Ray's `JobDetails`: status, message, entrypoint, metadata, runtime_env, start/end time (ms)."""
        with _ray_errors(f"info of job {self.id}", self.client.address):
            return self.client.jobs.get_job_info(self.id)

    def logs(self) -> str:
        """Everything the job has printed so far (stdout and stderr)."""
        with _ray_errors(f"logs of job {self.id}", self.client.address):
            return self.client.jobs.get_job_logs(self.id)

    def stream_logs(self) -> Iterator[str]:
        """The job's log lines as they are printed, until it ends. Ray's `tail_job_logs` is an async generator;
        it runs on an event loop in a thread of its own, so this also works inside a notebook's running loop."""
        import asyncio
        import threading

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"logs-{self.id}", daemon=True)
        thread.start()
        chunks = self.client.jobs.tail_job_logs(self.id)
        pending = ""
        try:
            while True:
                try:
                    with _ray_errors(f"following logs of job {self.id}", self.client.address):
                        chunk = asyncio.run_coroutine_threadsafe(chunks.__anext__(), loop).result()
                except StopAsyncIteration:
                    break
                *lines, pending = (pending + chunk).split("\n")
                yield from lines
            if pending:
                yield pending
        finally:  # also when the caller stops early: close the websocket, then the loop
            asyncio.run_coroutine_threadsafe(chunks.aclose(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def wait(self, timeout_s: float = 3600.0, show_progress: bool = True, poll_s: float = 1.0) -> str:
        """Block until the job ends; returns "SUCCEEDED". A FAILED or STOPPED job, or one still running after
        `timeout_s` seconds, raises UserError naming the job and its last log lines."""
        from app.console import err_console

        start = time.monotonic()
        spinner = err_console.status(f"job {self.id}") if show_progress else None
        if spinner:
            spinner.start()
        try:
            while (status := self.status()) not in ("SUCCEEDED", "FAILED", "STOPPED"):
                elapsed = time.monotonic() - start
                if elapsed > timeout_s:
                    raise UserError(f"job {self.id} is still {status} after {timeout_s:.0f} s (timeout_s); "
                                    f"last log lines: {self._tail()} — wait again, or job.stop()")
                if spinner:
                    spinner.update(f"job {self.id}: {status} for {elapsed:.0f} s")
                time.sleep(poll_s)
        finally:
            if spinner:
                spinner.stop()
        if status != "SUCCEEDED":
            raise UserError(f"job {self.id} {status}: last log lines: {self._tail()} "
                            f"(all of them: job.logs() or `ray job logs --address {self.client.address} {self.id}`)")
        return status

    def _tail(self, n: int = 3) -> str:
        """The job's last `n` log lines (without Ray's own start-up lines) joined into one line."""
        lines = [line.strip() for line in self.logs().splitlines()
                 if line.strip() and "job_manager.py" not in line and not line.startswith("Running entrypoint")]
        return " | ".join(lines[-n:])[-600:] or "(none)"

    def stop(self) -> bool:
        """Ask Ray to stop the job (SIGTERM, then SIGKILL); False when it had already ended."""
        with _ray_errors(f"stopping job {self.id}", self.client.address):
            return self.client.jobs.stop_job(self.id)

    def result(self) -> JobResult:
        """The command's result from its `scalestack-result:` log line (printed when the command succeeds)."""
        found = parse_result(self.logs())
        if found is None:
            raise UserError(f"job {self.id} printed no result line (status {self.status()}): a command prints one "
                            f"when it succeeds; call job.wait() first, and see job.logs() if it failed")
        return JobResult(found)

    def _rows(self) -> list[tuple[str, object]]:
        def when(ms: int | None) -> str:
            return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else ""

        info = self.info()
        return [("id", self.id), ("status", str(info.status)), ("entrypoint", info.entrypoint),
                ("start", when(info.start_time)), ("end", when(info.end_time)), ("message", info.message or ""),
                *((f"metadata.{k}", v) for k, v in (info.metadata or {}).items()),
                ("dashboard", f"{self.client.address}/#/jobs/{self.id}")]

    def _repr_html_(self) -> str:
        return html_table(["field", "value"], self._rows())

    def __repr__(self) -> str:
        return f"Job({self.id!r}, address={self.client.address!r})"
