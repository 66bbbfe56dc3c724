"""Full-state checkpoints on any pyarrow filesystem: completion markers, finding the latest good one, pruning,
and turning the final DeepSpeed checkpoint into consolidated fp32 weights.

A run folder (``{storage}/{name}``) holds ``checkpoint_step_XXXXXXXX/`` folders. Every rank writes its DeepSpeed
shards into one, then — after all ranks are done — rank 0 writes ``scalestack_complete.json`` listing every file
and its size plus the client state (step, samples consumed, world size, config hash). A folder without the
marker, or with a listed file missing or of the wrong size, is torn and never taken as the latest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

MARKER = "scalestack_complete.json"
TAG = "state"  # DeepSpeed's tag folder inside each checkpoint folder
_NAME = re.compile(r"^checkpoint_step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_step_{step:08d}"


def storage_fs(uri_or_path: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local folder or any pyarrow URI."""
    if "://" in uri_or_path:
        return pafs.FileSystem.from_uri(uri_or_path)
    return pafs.LocalFileSystem(), str(Path(uri_or_path).resolve())


def _files(fs: pafs.FileSystem, path: str) -> dict[str, int]:
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {e.path[len(path) + 1:]: e.size for e in entries if e.type == pafs.FileType.File}


def write_marker(fs: pafs.FileSystem, path: str, state: dict[str, Any]) -> None:
    """Seal a checkpoint folder; call only after every rank's files are in place."""
    files = {k: v for k, v in _files(fs, path).items() if k != MARKER}
    body = json.dumps({"files": files, "state": state}, indent=1, sort_keys=True).encode()
    tmp = f"{path}/{MARKER}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(body)
    fs.move(tmp, f"{path}/{MARKER}")


def read_complete(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The client state of a sealed, intact checkpoint folder; None when it is torn."""
    try:
        with fs.open_input_stream(f"{path}/{MARKER}") as f:
            marker = json.loads(f.read())
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return None
    present = _files(fs, path)
    if any(present.get(name) != size for name, size in marker["files"].items()):
        return None
    return marker["state"]


@dataclass(frozen=True)
class FoundCheckpoint:
    path: str  # inside fs
    step: int
    state: dict[str, Any]
    skipped: tuple[str, ...]  # newer folders passed over because they were torn


def list_checkpoints(fs: pafs.FileSystem, run_path: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint folder in the run, newest first, complete or not."""
    entries = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    found = [(int(m.group(1)), e.path) for e in entries if e.type == pafs.FileType.Directory
             and (m := _NAME.match(e.base_name))]
    return sorted(found, reverse=True)


def latest_complete(fs: pafs.FileSystem, run_path: str) -> FoundCheckpoint | None:
    """The newest intact checkpoint of a run, skipping torn ones."""
    skipped = []
    for step, path in list_checkpoints(fs, run_path):
        state = read_complete(fs, path)
        if state is not None:
            return FoundCheckpoint(path, step, state, tuple(skipped))
        skipped.append(path)
    return None


def prune(fs: pafs.FileSystem, run_path: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` intact checkpoints, and torn folders older than the newest intact one."""
    removed, kept = [], 0
    for _, path in list_checkpoints(fs, run_path):
        intact = read_complete(fs, path) is not None
        if intact and kept < keep:
            kept += 1
            continue
        if intact or kept > 0:  # a torn folder newer than every intact one may still be in flight: leave it
            fs.delete_dir(path)
            removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------------------------
# Consolidation: a DeepSpeed checkpoint folder (local) → one fp32 state dict with the GPT's parameter names.


def consolidated_state_dict(local_dir: str | Path, zero_stage: int, pipeline_stages: int, n_layer: int) -> dict:
    """Gather ZeRO shards (or pipeline layer files) of a local checkpoint folder into fp32 GPT weights."""
    import torch

    tag_dir = Path(local_dir) / TAG
    if pipeline_stages > 1:
        from app.pipeline import state_dict_from_layer_files

        return state_dict_from_layer_files(tag_dir, n_layer)
    if zero_stage == 0:
        module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in module.items()}
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # per-shard chatter
        state = get_fp32_state_dict_from_zero_checkpoint(str(local_dir), tag=TAG)
    return {k: v.float() for k, v in state.items()}


# --------------------------------------------------------------------------------------------------------------
# Resharding: a ZeRO checkpoint written at one data-parallel size → DeepSpeed's universal format, loadable at any.

UNIVERSAL_TAG = "universal"


def convert_to_universal(local_dir: str | Path) -> Path:
    """Convert `local_dir/state` (a ZeRO 1/2/3 checkpoint) into `local_dir/universal` once; returns that folder.

    Runs DeepSpeed's own converter (deepspeed/checkpoint/ds_to_universal.py) in-process. It builds into a
    `.partial` sibling and renames at the end, so an interrupted conversion is redone, never half-used.
    """
    import argparse
    import contextlib
    import io
    import shutil

    from deepspeed.checkpoint import ds_to_universal

    local_dir = Path(local_dir)
    out = local_dir / UNIVERSAL_TAG
    if (out / "zero").is_dir():
        return out
    partial = local_dir / f"{UNIVERSAL_TAG}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(local_dir / TAG), output_folder=str(partial), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter narrates every parameter
        ds_to_universal.main(args)
    partial.rename(out)
    return out
