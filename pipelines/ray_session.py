"""Connect to Ray: the cluster named by RAY_ADDRESS, or a fresh embedded local instance with explicit CPUs."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator

# Set before `import ray` anywhere in this process so no usage report is attempted (there is no network).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def default_num_cpus() -> int:
    return os.cpu_count() or 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for Serve's proxy, a test's `ray start`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def environ(updates: dict[str, str]) -> Iterator[None]:
    """`updates` in os.environ for the block (a Ray started inside inherits them), the old values after."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, **init_kwargs) -> Iterator[bool]:
    """Use Ray for the duration of the block; yields True when this block started (and will stop) Ray.

    An already-initialised Ray (a notebook, a test fixture, a Ray job's driver) is reused as it is. With
    RAY_ADDRESS set we join that cluster; otherwise `address="local"` starts a fresh instance, so a stale
    /tmp/ray/ray_current_cluster can never point us at a dead cluster. Token authentication stays at Ray's
    default (on).
    """
    import ray

    if ray.is_initialized():
        yield False
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, **init_kwargs)
    else:
        init_kwargs.setdefault("include_dashboard", False)
        # Worker chatter (per-report INFO lines, DeepSpeed banners) stays in /tmp/ray/session_latest/logs; errors
        # still reach the driver as exceptions. SCALESTACK_VERBOSE=1 streams it all.
        init_kwargs.setdefault("log_to_driver", os.environ.get("SCALESTACK_VERBOSE") == "1")
        ray.init(address="local", num_cpus=num_cpus or default_num_cpus(), **init_kwargs)
    try:
        yield True
    finally:
        ray.shutdown()
