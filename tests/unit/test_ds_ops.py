"""The stale torch-extension lock breaker (a lock left by a killed process hung CI in `make install`)."""

import os
import threading
import time

from torch.utils.file_baton import FileBaton

from app.ds_ops import clear_stale_locks, lock_files, stale_lock_breaker


def _op_dir(tmp_path, age_s):
    folder = tmp_path / "py311_cpu" / "deepspeed_shm_comm"
    folder.mkdir(parents=True)
    for name in ("lock", "deepspeed_shm_comm.so", "build.ninja"):
        path = folder / name
        path.write_bytes(b"")
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    os.utime(folder, (time.time() - age_s, time.time() - age_s))
    return folder


def test_an_old_lock_in_an_idle_folder_is_removed(tmp_path):
    folder = _op_dir(tmp_path, age_s=600)
    assert lock_files([tmp_path]) == [folder / "lock"]
    assert clear_stale_locks(180, roots=[tmp_path]) == [folder / "lock"]
    assert not (folder / "lock").exists() and (folder / "deepspeed_shm_comm.so").exists()


def test_a_lock_is_kept_while_its_folder_is_being_written(tmp_path):
    folder = _op_dir(tmp_path, age_s=600)
    (folder / "shm.o").write_bytes(b"compiler output")  # a build in progress writes objects
    assert clear_stale_locks(180, roots=[tmp_path]) == []
    fresh = _op_dir(tmp_path / "other", age_s=5)
    assert clear_stale_locks(180, roots=[tmp_path / "other"]) == []
    assert (folder / "lock").exists() and (fresh / "lock").exists()


def test_a_waiter_on_a_dead_holders_lock_is_freed(tmp_path):
    folder = _op_dir(tmp_path, age_s=0)  # the holder died a moment ago
    waited = threading.Event()

    def waiter():  # what torch does when it cannot take the baton: wait, with no timeout
        FileBaton(str(folder / "lock"), wait_seconds=0.02).wait()
        waited.set()

    with stale_lock_breaker(stale_after_s=0.5, poll_s=0.1, roots=[tmp_path]):
        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        assert waited.wait(10), "the waiter is still blocked on the stale lock"
    assert not (folder / "lock").exists()
