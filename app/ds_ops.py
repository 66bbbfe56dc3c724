"""DeepSpeed's JIT-built CPU comm op, without torch's stale-lock hang.

DeepSpeed compiles its shared-memory all-reduce op (``deepspeed_shm_comm``) with ``torch.utils.cpp_extension`` on
first use and caches it under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). Every *load* of the
cached op briefly holds an empty ``lock`` file in that folder, and every other process waits for the file to vanish,
with no timeout. A process killed while holding it — a preempted worker, a killed test run — leaves the file behind
and every later training run hangs in ``deepspeed.init_distributed`` forever.

Two ninja builds may be on a machine (here the system's 1.11 and the 1.13 that pip installs with DeepSpeed): they
keep incompatible build logs, so a process that found the other one first on ``PATH`` (an activated virtualenv or
not, a Ray worker started from either) rebuilt the op, 40-60 s of its start. ``use_interpreters_ninja()`` makes
every build run the ninja installed beside this interpreter, and ``use_interpreters_extension_dir()`` keeps each
virtualenv's builds in its own folder.

``stale_lock_breaker()`` wraps the call that may load the op: it removes a lock file once the lock *and* everything
else in its folder have been untouched for ``STALE_AFTER_S`` (a real compile writes objects and ninja logs as it
goes; a load holds the lock for milliseconds). ``python -m app.ds_ops`` builds the op ahead of time (``make install``
does this).

``import_muon_uncompiled()`` imports DeepSpeed's Muon optimizer, which DeepSpeed imports on every ZeRO engine start,
without the ``torch.compile`` of its kernels that pulls in torch's inductor compiler: 2-3 s of every worker start
(and so of every recovery) for an optimizer we never use.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

STALE_AFTER_S = 180.0
"""A lock whose folder has seen no write for this long is left over from a dead process."""

OP_NAME = "deepspeed_shm_comm"


def extension_roots() -> list[Path]:
    """Folders torch may build extensions under: ``$TORCH_EXTENSIONS_DIR`` and the default build root."""
    from torch.utils.cpp_extension import get_default_build_root

    roots = [os.environ.get("TORCH_EXTENSIONS_DIR"), get_default_build_root()]
    return [Path(r) for r in dict.fromkeys(r for r in roots if r)]


def lock_files(roots: list[Path] | None = None) -> list[Path]:
    """The ``lock`` files of every extension folder (``ROOT/NAME/lock`` and ``ROOT/pyXY_cpu/NAME/lock``)."""
    found: list[Path] = []
    for root in extension_roots() if roots is None else roots:
        if root.is_dir():
            found += list(root.glob("*/lock")) + list(root.glob("*/*/lock"))
    return found


def _last_write(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for p in folder.iterdir():
        with contextlib.suppress(OSError):
            times.append(p.stat().st_mtime)
    return max(times)


def clear_stale_locks(stale_after_s: float = STALE_AFTER_S, roots: list[Path] | None = None,
                      now: float | None = None) -> list[Path]:
    """Remove lock files whose folder has not been written for ``stale_after_s``; returns the ones removed."""
    now = time.time() if now is None else now
    removed = []
    for lock in lock_files(roots):
        try:
            idle = now - _last_write(lock.parent)
            if idle < stale_after_s:
                continue
            lock.unlink()
        except FileNotFoundError:
            continue  # released meanwhile
        log.warning("removed a stale torch extension lock %s (untouched for %.0f s; its holder died)", lock, idle)
        removed.append(lock)
    return removed


@contextlib.contextmanager
def stale_lock_breaker(stale_after_s: float = STALE_AFTER_S, poll_s: float = 5.0, roots: list[Path] | None = None):
    """Clear stale extension locks now and, while the body runs, every ``poll_s`` (so a waiter is freed)."""
    clear_stale_locks(stale_after_s, roots)
    stop = threading.Event()

    def watch():
        while not stop.wait(poll_s):
            clear_stale_locks(stale_after_s, roots)

    watcher = threading.Thread(target=watch, name="stale-lock-breaker", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def use_interpreters_ninja() -> Path | None:
    """Put this interpreter's folder first on ``PATH`` when a ``ninja`` lies there (torch runs the first ``ninja``
    on ``PATH``); returns that ninja, or None (PATH left alone) where there is none. Idempotent."""
    here = Path(sys.executable).parent
    ninja = here / "ninja"
    if not ninja.is_file():
        return None
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != str(here):
        os.environ["PATH"] = os.pathsep.join([str(here), path]) if path else str(here)
    return ninja


def use_interpreters_extension_dir() -> Path | None:
    """Build extensions under this virtualenv (``PREFIX/torch_extensions``) unless ``$TORCH_EXTENSIONS_DIR`` is set;
    returns that folder, or None where the default stays (not a virtualenv, or one that cannot be written).

    torch keys its build folder by name only, and the build command holds the torch and DeepSpeed paths of the
    interpreter that runs it: two virtualenvs sharing ``~/.cache/torch_extensions`` (two clones, CI beside a
    checkout) rebuilt the comm op in turn, ~25-40 s each time the other one had built last."""
    if os.environ.get("TORCH_EXTENSIONS_DIR") or sys.prefix == sys.base_prefix:
        return None
    folder = Path(sys.prefix) / "torch_extensions"
    try:
        folder.mkdir(exist_ok=True)
    except OSError:
        return None
    if not os.access(folder, os.W_OK):
        return None
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)  # inherited by the worker processes and compilers it starts
    return folder


@contextlib.contextmanager
def comm_op_loading():
    """Around anything that may build or load DeepSpeed's comm op: the interpreter's own ninja and extension folder,
    stale locks cleared."""
    use_interpreters_ninja()
    use_interpreters_extension_dir()
    with stale_lock_breaker():
        yield


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer with its ``torch.compile`` decorators left out (idempotent).

    DeepSpeed 0.19.8 imports ``deepspeed.runtime.zero.muon.muon_optimizer`` in ``deepspeed.initialize`` (to ask
    whether our optimizer is ZeRO-supported) and in the ZeRO 1/2 gradient reduction and ZeRO-3 set-up (to ask
    whether the optimizer is Muon). At import that module wraps three kernels in ``torch.compile``, and
    ``torch.compile`` imports torch's inductor compiler on the spot: 2.6 s of a 3.4 s ``initialize`` for the tiny
    model, paid by every worker at every start and restart. We never train with Muon (the optimizer is always
    ``app.optim.AdamW``, torch's own), so we import it once with ``torch.compile`` standing in as the identity: the
    module and its classes are all there, its kernels just stay eager."""
    if MUON_MODULE in sys.modules:
        return
    import torch

    real = torch.compile

    def eager(model=None, **_kwargs):
        return model if model is not None else (lambda fn: fn)

    torch.compile = eager
    try:
        importlib.import_module(MUON_MODULE)
    finally:
        torch.compile = real


def build_comm_op():
    """Build (or load from cache) DeepSpeed's CPU shared-memory comm op; ``None`` where it does not apply."""
    from deepspeed.comm.torch import build_shm_op

    with comm_op_loading():
        return build_shm_op()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_comm_op()
