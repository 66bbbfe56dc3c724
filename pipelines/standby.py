"""Warm standby workers: a training group that restarts (a lost node, a spot reclaim, a resize) starts on worker
processes that have already imported torch, DeepSpeed, Ray Train and this project.

Restarting a Ray Train group costs a new Python process per worker, and each spends seconds importing before it can
train (measured here: ~2 s for the worker actor, ~2.4 s for Ray Train's context to unpickle, which imports torch
and ray.train.torch). Ray keeps no warm processes for actors, but its raylet will start idle ones on request and
hand them to the next actor whose runtime environment matches (its `PrestartWorkers` call, which Ray Core uses for
task backlogs). So:

- the workers' runtime environment runs `warm_cpu_worker` / `warm_gpu_worker` in every new worker process before it
  accepts work (Ray's `worker_process_setup_hook`, as an environment variable so that it also reaches processes
  started ahead of time), and names the run;
- each training worker, once its group trains, asks its node's raylet for one such process with its own exact
  runtime environment (`request`); the elastic policy does the same on a node that joins, before it grows the
  group onto it; and the driver asks every node for the first group's, predicting the runtime environment Ray
  Train will give its workers (`request_for_first_group`);
- an idle standby watches for the run's progress board and exits when the run is over (nothing lingers), and stops
  watching the moment a training worker claims it (`claim`).

Everything here is best effort: a standby that cannot be had only means the restart pays its imports as before.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
"""Where Ray's default worker looks for `worker_process_setup_hook` (ray._private.ray_constants; a module path works
as its value, and unlike the runtime_env key it reaches processes started ahead of time)."""

RUN_ENV = "SCALESTACK_STANDBY_BOARD"
"""`namespace/name` of the run's progress-board actor: an idle standby lives while it exists. It also makes each
run's runtime environment, and so its standby pool, its own."""

KEEP_ALIVE_S = 24 * 3600
"""How long Ray keeps an unclaimed standby at the least; the board watch ends it sooner, when the run ends."""

WATCH_INTERVAL_S = 2.0

_claimed = threading.Event()


def worker_runtime_env(board_namespace: str, board_name: str, use_gpu: bool) -> dict:
    """Ray Train's `RunConfig(worker_runtime_env=...)` for a run whose workers get warm standbys."""
    hook = "warm_gpu_worker" if use_gpu else "warm_cpu_worker"
    return {"env_vars": {SETUP_HOOK_ENV: f"{__name__}.{hook}", RUN_ENV: f"{board_namespace}/{board_name}"}}


def expected_worker_env(worker_runtime_env: dict) -> str:
    """The serialized runtime environment Ray Train 2.60 gives its workers, predicted in the driver so that the first
    group can start on standbys too: the job's environment, then the controller's variables (Ray Train's propagated
    ones and its RAY_WARN_BLOCKING_GET_INSIDE_ASYNC), then `worker_runtime_env`, merged as Ray merges a child's
    (variables merged, other fields replaced) and written as Ray writes it (sorted keys, no spaces). A wrong
    prediction costs only idle processes, which leave with the run; the chaos test checks it is right."""
    import ray
    from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
    from ray.train.v2._internal.constants import (
        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
        get_env_vars_to_propagate,
    )

    job = json.loads(ray.get_runtime_context().get_runtime_env_string() or "{}")
    controller = {RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR: DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
                  **get_env_vars_to_propagate()}
    merged = {**job, **{k: v for k, v in worker_runtime_env.items() if k != "env_vars"}}
    merged["env_vars"] = {**job.get("env_vars", {}), **controller, **worker_runtime_env.get("env_vars", {})}
    return json.dumps(merged, sort_keys=True, separators=(",", ":"))


def request_for_first_group(worker_runtime_env: dict, resources_per_worker: dict[str, float], max_workers: int) -> int:
    """Before a run's first group starts: ask every node that can hold workers for a standby per worker it can hold
    (at most `max_workers` each), so that the first group skips the imports as a restarted one does. Returns how many
    were asked for."""
    import ray

    runtime_env, asked = expected_worker_env(worker_runtime_env), 0
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        fits = min((node["Resources"].get(k, 0.0) // v for k, v in resources_per_worker.items() if v > 0),
                   default=0)
        count = int(min(fits, max_workers))
        if count and request(node["NodeID"], runtime_env, count=count):
            asked += count
    return asked


def _import_common() -> None:
    """What a training worker imports before and during its first steps (in a cold process they cost seconds of
    the restart: scipy alone, which the Young–Daly interval's module pulls in, took 1-2 s beside a booting group)."""
    import torch  # noqa: F401
    import ray.train.torch  # noqa: F401  (Ray Train's context unpickles into these)
    import ray.train.v2._internal.execution.context  # noqa: F401
    import ray.train.v2._internal.execution.train_fn_utils  # noqa: F401
    from ray._private import grpc_utils  # noqa: F401  (request(), below)
    from ray.core.generated import node_manager_pb2_grpc  # noqa: F401

    import app.costs  # noqa: F401
    import app.data  # noqa: F401
    import app.distill  # noqa: F401
    import app.metrics  # noqa: F401
    import app.model  # noqa: F401
    import app.optim  # noqa: F401
    import app.parallel  # noqa: F401


def warm_cpu_worker() -> None:
    """Setup hook of a CPU run's worker processes: import what a training worker needs, then watch the run."""
    t0 = time.perf_counter()
    _import_common()
    import deepspeed  # noqa: F401
    from deepspeed.accelerator import get_accelerator

    get_accelerator()  # DeepSpeed picks its accelerator once per process (here: CPU)
    import pyarrow.dataset  # noqa: F401  (the first Parquet read imports it)

    import pipelines.train  # noqa: F401
    from app import ds_ops

    ds_ops.import_muon_uncompiled()
    try:  # loaded once per process, and each load runs a ninja check: 0.4-0.7 s of every group start, measured
        ds_ops.build_comm_op()
    except Exception:  # the group's own start builds it, or says why it cannot
        log.warning("could not load DeepSpeed's CPU comm op ahead of the group", exc_info=True)
    _start_watch(time.perf_counter() - t0)


def warm_gpu_worker() -> None:
    """Setup hook of a GPU run's workers. DeepSpeed is left out: importing it probes CUDA, which would fix the
    visible devices before Ray assigns this process its GPU."""
    t0 = time.perf_counter()
    _import_common()
    _start_watch(time.perf_counter() - t0)


def process_start_time() -> float:
    """When this process started (epoch s, to ~10 ms): from /proc on Linux, whose uptime has sub-second precision
    (psutil's create_time rounds the boot time to a whole second); psutil elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
        return time.time() - (uptime_s - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().create_time()


def claim() -> None:
    """Called by the training loop in its process: this process is a training worker now, not a standby."""
    _claimed.set()


def _start_watch(import_s: float) -> None:
    board = os.environ.get(RUN_ENV)
    log.debug("warm after %.2f s of imports (run board %s)", import_s, board)
    if board:
        threading.Thread(target=_watch, args=(board,), name="standby-watch", daemon=True).start()


def _watch(board: str, misses_to_exit: int = 2) -> None:
    """Exit this idle process once the run's board is gone (`misses_to_exit` looks in a row); stop watching once a
    training worker claims it."""
    import ray

    namespace, name = board.split("/", 1)
    misses = 0
    while not _claimed.wait(WATCH_INTERVAL_S):
        try:
            ray.get_actor(name, namespace=namespace)
            misses = 0
        except ValueError:  # no such actor: the run is over
            misses += 1
            if misses >= misses_to_exit and not _claimed.is_set():
                os._exit(0)
        except Exception:  # the GCS briefly unreachable: look again later
            continue


def request(node_id: str, runtime_env: str, count: int = 1, keep_alive_s: int = KEEP_ALIVE_S) -> bool:
    """Ask `node_id`'s raylet to start `count` idle worker processes of this job with `runtime_env` (a serialized
    runtime environment, as `ray.get_runtime_context().get_runtime_env_string()` gives it). True when asked."""
    import ray
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc, runtime_environment_pb2

    try:
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"])
        channel = init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
        try:
            node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(
                node_manager_pb2.PrestartWorkersRequest(
                    language=common_pb2.Language.PYTHON,
                    job_id=bytes.fromhex(ray.get_runtime_context().get_job_id()),
                    runtime_env_info=runtime_environment_pb2.RuntimeEnvInfo(serialized_runtime_env=runtime_env),
                    keep_alive_duration_secs=keep_alive_s, num_workers=count),
                timeout=10)
        finally:
            channel.close()
    except Exception as err:  # StopIteration (node gone), gRPC errors: the restart will just be a cold one
        log.info("no standby worker on node %s: %s", node_id[:8], err)
        return False
    return True
