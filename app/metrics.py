"""Training measurements: throughput, MFU against a measured matmul peak, stragglers, and the goodput ledger.

Goodput follows Google's ml-goodput definition: the share of a run's wall time spent on optimizer steps that
count. Every second of a run falls in one bucket: productive, checkpoint, restore, startup, or lost (steps that
were computed and then thrown away by a failure, and must be recomputed).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

LEDGER_BUCKETS = ("productive", "checkpoint", "restore", "startup", "lost")


@dataclass
class GoodputLedger:
    """Seconds per bucket; `other` is wall time no bucket claimed (scheduling, waiting for workers)."""

    seconds: dict[str, float] = field(default_factory=lambda: {b: 0.0 for b in LEDGER_BUCKETS})

    def add(self, bucket: str, seconds: float) -> None:
        assert bucket in LEDGER_BUCKETS, bucket
        self.seconds[bucket] += max(0.0, seconds)

    def goodput(self, wall_s: float) -> float:
        """productive / wall; 0 for an empty run."""
        return self.seconds["productive"] / wall_s if wall_s > 0 else 0.0

    def summary(self, wall_s: float) -> dict[str, float]:
        claimed = sum(self.seconds.values())
        return {**{f"{k}_s": round(v, 3) for k, v in self.seconds.items()},
                "other_s": round(max(0.0, wall_s - claimed), 3), "wall_s": round(wall_s, 3),
                "goodput": round(self.goodput(wall_s), 4)}


def straggler_ratio(step_times: list[float]) -> float:
    """max / median of per-rank step times for one step: 1.0 means perfectly even ranks."""
    med = statistics.median(step_times)
    return max(step_times) / med if med > 0 else 1.0


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak FLOP/s of the devices used."""
    return tokens_per_s * flops_per_token / peak_flops if peak_flops > 0 else 0.0


# --------------------------------------------------------------------------------------------------------------
# Peak FLOP/s: measured once per machine (and thread count / device / dtype) and cached.


def _cache_path(key: str) -> Path:
    root = Path(os.environ.get("SCALESTACK_CACHE", Path.home() / ".cache" / "scalestack"))
    return root / f"matmul_peak_{key}.json"


def matmul_peak_flops(device: str = "cpu", dtype: str = "float32", threads: int | None = None,
                      size: int = 1024, seconds: float = 1.0, use_cache: bool = True) -> float:
    """Best sustained FLOP/s of a square matmul on this device with this many threads.

    This is the practical ceiling MFU is measured against here (vendor peaks are meaningless for a shared CPU).
    The result is cached under ~/.cache/scalestack keyed by host, device, dtype and threads.
    """
    import torch

    threads = threads or torch.get_num_threads()
    key = f"{platform.node()}_{device}_{dtype}_{threads}t_{size}"
    path = _cache_path(key)
    if use_cache and path.is_file():
        return float(json.loads(path.read_text())["flops"])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dt = getattr(torch, dtype)
        a = torch.randn(size, size, device=device, dtype=dt)
        b = torch.randn(size, size, device=device, dtype=dt)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        for _ in range(3):
            a @ b
        sync()
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            sync()
            best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(previous)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"flops": best, "key": key, "measured": time.strftime("%Y-%m-%d")}))
    return best


# --------------------------------------------------------------------------------------------------------------
# Export to Ray's metrics (Prometheus endpoint, dashboard).


class RayTrainMetrics:
    """Gauges under `scalestack_train_*`, tagged by run; set from rank 0 each logging step."""

    NAMES = ("loss", "val_loss", "tokens_per_s", "mfu", "step_time_s", "straggler_ratio", "goodput", "step")

    def __init__(self, run: str) -> None:
        from ray.util.metrics import Gauge

        self._tags = {"run": run}
        self._gauges = {
            n: Gauge(f"scalestack_train_{n}", description=f"scalestack training {n.replace('_', ' ')}",
                     tag_keys=("run",))
            for n in self.NAMES
        }

    def set(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            if name in self._gauges and value is not None:
                self._gauges[name].set(float(value), tags=self._tags)
