"""Helpers shared by the Serve tests."""

from __future__ import annotations

import time


def batch_stats_when(handle, done, timeout_s: float = 30.0) -> dict:
    """An LMServer's batch_stats, polled every 50 ms until `done(stats)` or `timeout_s` passed (the last read)."""
    deadline, stats = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        stats = handle.info.remote().result()["batch_stats"]
        if done(stats):
            break
        time.sleep(0.05)
    return stats
