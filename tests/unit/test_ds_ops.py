"""DeepSpeed's JIT-built comm op: the stale torch-extension lock breaker (a lock left by a killed process hung CI in
`make install`), one ninja for every build, and Muon imported without torch's compiler."""

import os
import sys
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


def test_engine_build_imports_deepspeeds_muon_without_its_compiler(tmp_path):
    """DeepSpeed imports its Muon optimizer on every ZeRO start and in the gradient reduction, and Muon's import
    pulls in torch's inductor compiler (2-3 s of every worker start); torch.optim.AdamW imports torch._dynamo
    (1.4 s more). Built in a fresh interpreter, trained two steps under ZeRO 2, checkpointed and restored: the engine
    still accepts our AdamW, Muon is there (kernels eager), neither the compiler nor dynamo ever loads, and
    torch.compile is torch's own again."""
    import json
    import subprocess

    script = """
import json, os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch, torch.distributed as dist
real_compile = torch.compile
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
from app.config import load_config
from app.parallel import batch_plan
from pipelines.train import _build_engine
cfg = load_config("tiny", ["parallel.zero_stage=2"])
engine = _build_engine(cfg, batch_plan(8, 4, 1, 1), "fp32")
x = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.seq_len))
before = next(engine.module.parameters()).detach().clone()
for _ in range(2):  # the warm-up's first step has lr 0
    _, loss = engine(x, x.roll(-1, dims=1))
    engine.backward(loss)
    engine.step()
engine.save_checkpoint(sys.argv[2], tag="t")
engine.load_checkpoint(sys.argv[2], tag="t", load_optimizer_states=True, load_lr_scheduler_states=True)
muon = sys.modules["deepspeed.runtime.zero.muon.original_muon"]
print(json.dumps({"optimizer": type(engine.optimizer).__name__, "dynamo": "torch._dynamo" in sys.modules, "muon_eager": not hasattr(muon.muon_update, "_torchdynamo_orig_callable"),
                  "stepped": not torch.equal(before, next(engine.module.parameters())),
                  "inductor": "torch._inductor.compile_fx" in sys.modules, "compile_restored": torch.compile is real_compile}))
"""
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store"), str(tmp_path / "ckpt")],
                         capture_output=True, text=True, check=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"optimizer": "DeepSpeedZeroOptimizer", "dynamo": False, "muon_eager": True, "stepped": True,
                   "inductor": False, "compile_restored": True}


def test_extension_builds_run_the_interpreters_own_ninja(monkeypatch, tmp_path):
    """Two ninja versions keep incompatible build logs: a process that found the other one on PATH rebuilt the comm
    op (40-60 s). Whatever PATH holds, the ninja beside the interpreter (pip's, installed with DeepSpeed) comes
    first, once."""
    import shutil

    from app.ds_ops import use_interpreters_ninja

    here = os.path.dirname(sys.executable)
    assert os.path.isfile(os.path.join(here, "ninja")), "deepspeed's lock installs ninja beside the interpreter"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert str(use_interpreters_ninja()) == os.path.join(here, "ninja")
    assert shutil.which("ninja") == os.path.join(here, "ninja")
    use_interpreters_ninja()
    assert os.environ["PATH"] == os.pathsep.join([here, "/usr/bin:/bin"])  # not prepended twice

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))  # an interpreter with no ninja beside it
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert use_interpreters_ninja() is None and os.environ["PATH"] == "/usr/bin:/bin"


def test_each_virtualenv_builds_extensions_in_its_own_folder(monkeypatch, tmp_path):
    """torch names its build folder after the extension only, while the build command holds the interpreter's torch
    and DeepSpeed paths: two virtualenvs sharing ~/.cache/torch_extensions rebuilt the comm op in turn (~25-40 s).
    Each now builds under its own prefix, where torch looks for it (read at build time); a folder named by the user
    wins, and outside a virtualenv (or where the venv cannot be written) torch's default stays."""
    from torch.utils.cpp_extension import _get_build_directory

    from app.ds_ops import use_interpreters_extension_dir

    venv = tmp_path / "venv"
    venv.mkdir()
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert use_interpreters_extension_dir() == venv / "torch_extensions"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(venv / "torch_extensions")
    assert _get_build_directory("deepspeed_shm_comm", verbose=False).startswith(str(venv / "torch_extensions"))

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "chosen"))
    assert use_interpreters_extension_dir() is None and os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "chosen")

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "base_prefix", str(venv))  # not a virtualenv
    assert use_interpreters_extension_dir() is None and "TORCH_EXTENSIONS_DIR" not in os.environ
