"""Completion markers, torn-checkpoint detection, latest selection and pruning — on a local pyarrow filesystem."""

import pyarrow.fs as pafs

from app.checkpoint import MARKER, checkpoint_name, latest_complete, list_checkpoints, prune, read_complete, write_marker


def _make(run, step, files=("state/a.pt", "state/b.pt"), seal=True):
    path = run / checkpoint_name(step)
    for name in files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(b"x" * (10 + step))
    if seal:
        write_marker(pafs.LocalFileSystem(), str(path), {"step": step})
    return path


def test_marker_round_trip(tmp_path):
    path = _make(tmp_path, 5)
    assert read_complete(pafs.LocalFileSystem(), str(path)) == {"step": 5}
    assert not (path / f"{MARKER}.tmp").exists()


def test_unsealed_checkpoint_is_ignored(tmp_path):
    _make(tmp_path, 10)
    _make(tmp_path, 20, seal=False)  # a save that died before every rank finished
    found = latest_complete(pafs.LocalFileSystem(), str(tmp_path))
    assert found.step == 10 and found.skipped == (str(tmp_path / checkpoint_name(20)),)


def test_missing_or_truncated_shard_is_torn(tmp_path):
    fs = pafs.LocalFileSystem()
    _make(tmp_path, 10)
    p20 = _make(tmp_path, 20)
    (p20 / "state" / "b.pt").unlink()
    assert latest_complete(fs, str(tmp_path)).step == 10
    p30 = _make(tmp_path, 30)
    (p30 / "state" / "a.pt").write_bytes(b"short")
    assert latest_complete(fs, str(tmp_path)).step == 10


def test_no_checkpoints(tmp_path):
    assert latest_complete(pafs.LocalFileSystem(), str(tmp_path / "nothing")) is None


def test_prune_keeps_newest_intact_and_inflight(tmp_path):
    fs = pafs.LocalFileSystem()
    for step in (10, 20, 30):
        _make(tmp_path, step)
    _make(tmp_path, 5, seal=False)  # old torn folder: removed
    _make(tmp_path, 40, seal=False)  # newer than every intact one: may still be being written, kept
    removed = prune(fs, str(tmp_path), keep=2)
    assert sorted(removed) == sorted(str(tmp_path / checkpoint_name(s)) for s in (5, 10))
    assert [s for s, _ in list_checkpoints(fs, str(tmp_path))] == [40, 30, 20]
