"""Distributed training: a Ray Train TorchTrainer driver and the per-worker DeepSpeed loop.

    python -m app train --preset tiny --workers 2 --zero 2
    ray job submit --working-dir . -- python -m app train --preset tiny

Each worker builds the GPT, asks app/parallel.py for the batch plan and DeepSpeed config, and trains on the
samples GlobalOrder assigns to its rank at each optimizer step. Checkpoints are full state and sealed with a
completion marker (app/checkpoint.py); a re-run with the same run name resumes from the newest intact one.
"""

from __future__ import annotations

import math
import os
import resource
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.checkpoint import (
    TAG,
    UNIVERSAL_TAG,
    checkpoint_name,
    consolidated_state_dict,
    convert_to_universal,
    latest_complete,
    prune,
    storage_fs,
    write_marker,
)
from app.config import ModelConfig, TrainConfig, parse_workers
from app.data import read_manifest
from app.errors import ConfigError, DataError
from app.metrics import GoodputLedger
from app.parallel import batch_plan, check_parallel_settings, check_worker_range

# --------------------------------------------------------------------------------------------------------------
# Result


@dataclass
class TrainResult:
    """What a training run produced: its folder, summary metrics, exported artifact and loss history."""

    run_dir: str
    summary: dict[str, Any]
    artifact: str | None
    history: Any  # pandas.DataFrame, one row per step: step, loss, lr, step_time_s, tokens_per_s, val_loss, ...
    records: list[dict] = field(default_factory=list)  # every step as computed, recomputed ones included
    attempts: list[dict] = field(default_factory=list)  # one per worker-group start: world size, start step

    def _repr_html_(self) -> str:
        from app.console import html_table

        return html_table(["metric", "value"], list(self.summary.items()))

    def plot(self, ax=None):
        """Training loss per step, validation loss where it was measured, and a dotted line at each restart's
        first step; on `ax`, or on a new figure's. Returns the Axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        h = self.history
        ax.plot(h["step"], h["loss"], label="training loss")
        if "val_loss" in h and h["val_loss"].notna().any():
            measured = h[h["val_loss"].notna()]
            ax.plot(measured["step"], measured["val_loss"], "o-", label="validation loss")
        for attempt in self.attempts[1:]:
            ax.axvline(attempt["start_step"], linestyle=":", color="grey")
        ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=str(self.summary.get("run", "")))
        ax.legend()
        return ax


# --------------------------------------------------------------------------------------------------------------
# Progress board: rank 0 posts every step here; the driver polls it for the progress bar and the history.


BOARD_POST_INTERVAL_S = 0.25
"""Rank 0 posts its step records to the board at most this often, and at every checkpoint and drain notice: one
actor call per step cost ~1 ms of a tiny preset's ~20 ms step. A worker killed without notice takes up to this much of
its last records with it: steps that are lost work anyway, which then count as 'other' time rather than 'lost'."""


def _progress_board_cls():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self) -> None:
            self.records: list[dict] = []
            self.attempts: list[dict] = []
            self.ledger: dict[str, float] = {}
            self.workers: list[dict] = []  # every worker process ever started: rank, pid, node, attempt
            self.save_requests, self.save_request, self.saves_done = 0, None, set()  # checkpoints before resizes
            self.runtime_env: str | None = None
            self.group_starts: list[float] = []  # when the controller began creating each worker group (epoch s)

        def group_starting(self, at: float) -> None:
            self.group_starts.append(at)

        def worker(self, rank: int, pid: int, node_id: str, process_start: float) -> None:
            """A worker of the newest attempt registers; `process_start` (epoch s) tells a warm standby (a process
            started before its group was) from a cold start."""
            self.workers.append({"rank": rank, "pid": pid, "node_id": node_id, "attempt": len(self.attempts),
                                 "time": time.time(), "process_start": process_start})

        def live_workers(self) -> list[dict]:
            """Workers of the newest attempt (a fault injector's targets)."""
            latest = max((w["attempt"] for w in self.workers), default=0)
            return [w for w in self.workers if w["attempt"] == latest]

        def attempt(self, world_size: int, start_step: int, from_dp: int | None, conversion_s: float,
                    train_tokens: int, runtime_env: str | None = None) -> None:
            self.attempts.append({"world_size": world_size, "start_step": start_step, "from_dp": from_dp,
                                  "universal_conversion_s": conversion_s, "train_tokens": train_tokens,
                                  "time": time.time()})
            self.runtime_env = runtime_env

        def standby_env(self) -> str | None:
            """The workers' serialized runtime environment when the run keeps warm standbys (pipelines/standby.py):
            what the elastic policy asks a joining node's raylet for."""
            return self.runtime_env

        def log(self, records: list[dict], ledger: dict[str, float]) -> None:
            self.records.extend({**record, "attempt": len(self.attempts)} for record in records)
            for k, v in ledger.items():
                self.ledger[k] = self.ledger.get(k, 0.0) + v

        def request_save(self) -> int:
            """A resize is coming (the elastic policy asks): the workers checkpoint at their next agreed step.
            Returns the request's token."""
            self.save_requests += 1
            self.save_request = self.save_requests
            return self.save_requests

        def pending_save(self) -> int | None:
            return self.save_request

        def saved(self, token: int) -> None:
            self.saves_done.add(token)
            if self.save_request == token:
                self.save_request = None

        def saved_for(self, token: int) -> bool:
            return token in self.saves_done

        def started(self) -> list[tuple[float, int]]:
            """(start time, world size) of every worker group so far: the run's observed failure rate."""
            return [(a["time"], a["world_size"]) for a in self.attempts]

        def snapshot(self, since: int = 0) -> tuple[list[dict], list[dict], dict[str, float]]:
            """New records, every attempt (with its workers) and the goodput ledger so far."""
            attempts = [{**a, "workers": [w for w in self.workers if w["attempt"] == i],
                         "group_start": max((t for t in self.group_starts if t <= a["time"]), default=None)}
                        for i, a in enumerate(self.attempts, start=1)]
            return self.records[since:], attempts, dict(self.ledger)

    return ProgressBoard


# --------------------------------------------------------------------------------------------------------------
# Worker side


def _train_fn_utils():
    """What `ray.train.get_context/report/get_preemption_info` call. Those public wrappers refuse to run inside a
    Ray Tune trial (ray#49454), which is where an in-process sweep trial's loop runs (Ray Train's local mode); the
    loop calls the same object directly, on workers and in-process alike (ray.train.v2 internals; ray is pinned)."""
    from ray.train.v2._internal.execution.train_fn_utils import get_train_fn_utils

    return get_train_fn_utils()


def _report(metrics: dict, checkpoint=None, **kwargs) -> None:
    """ray.train.report, through `_train_fn_utils` (same defaults as the public function)."""
    from ray.train import CheckpointUploadMode

    mode = kwargs.setdefault("checkpoint_upload_mode", CheckpointUploadMode.SYNC)
    kwargs.setdefault("delete_local_checkpoint_after_upload", mode.default_delete_local_checkpoint_after_upload())
    _train_fn_utils().report(metrics=metrics, checkpoint=checkpoint, **kwargs)


def _worker_device(cfg: TrainConfig):
    import torch

    if cfg.parallel.device != "cpu" and torch.cuda.is_available():
        local_rank = _train_fn_utils().get_context().get_local_rank()
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _seed_step(seed: int, device) -> None:
    """torch.manual_seed for the generators a step draws from: the CPU's, and the worker's GPU's. torch.manual_seed
    itself also queues the seed for every accelerator torch has not initialized (CUDA, MPS, XPU), each through a
    lazy call that formats the whole call stack: 0.1-0.3 ms a step, 1.5 % of a tiny step's time in a profile."""
    import torch

    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device: the worker's (_worker_device)


def _lr_lambda(cfg: TrainConfig):
    """Linear warmup to lr, then cosine to min_lr_ratio × lr at the last step (the run's token budget)."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _optimizer(cfg: TrainConfig, model):
    import torch

    from app.optim import AdamW  # torch's, without importing torch._dynamo: 1.4 s of every (re)start

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # biases and norms
    o = cfg.optim
    opt = AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))


def _build_engine(cfg: TrainConfig, plan, precision: str, load_universal: bool = False,
                  init_from: str | None = None):
    import deepspeed
    import torch

    from app.ds_ops import comm_op_loading, import_muon_uncompiled
    from app.model import GPT
    from app.parallel import deepspeed_config

    p = cfg.parallel
    # Ray already created the torch.distributed group (gloo/NCCL); this only points DeepSpeed's comm layer at it
    # (and loads its JIT-built CPU comm op: with the interpreter's own ninja, past a lock a killed process left).
    with comm_op_loading():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and for every parallel layout
    model = GPT(cfg.model)
    if init_from:  # before deepspeed.initialize: ZeRO-3 partitions the parameters there
        from app.registry import load_artifact

        model.load_state_dict(load_artifact(init_from).model.state_dict())
    if p.pipeline_stages > 1:
        from app.pipeline import build_pipeline_module

        model = build_pipeline_module(cfg.model, p.pipeline_stages, p.activation_checkpointing, init_from=model)
    else:
        model.activation_checkpointing = p.activation_checkpointing
    optimizer, scheduler = _optimizer(cfg, model)
    ds_config = deepspeed_config(plan, p.zero_stage, p.offload_optimizer, precision, cfg.optim.grad_clip,
                                 load_universal)
    import_muon_uncompiled()  # 2-3 s of inductor imports per worker start, for an optimizer we do not use
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


class _Batches:
    """Micro-batches of one rank at one optimizer step, straight from GlobalOrder (no DataLoader, no state)."""

    def __init__(self, stream, order, plan, seq_len: int, device) -> None:
        self.stream, self.order, self.plan, self.seq_len, self.device = stream, order, plan, seq_len, device

    def micro_batches(self, step: int, dp_rank: int):
        import torch

        from app.data import windows

        ids = self.order.batch_ids(step, self.plan.global_batch, dp_rank, self.plan.dp)
        for m in range(self.plan.grad_accum):
            x, y = windows(self.stream, ids[m * self.plan.micro_batch:(m + 1) * self.plan.micro_batch], self.seq_len)
            yield (torch.from_numpy(x).long().to(self.device), torch.from_numpy(y).long().to(self.device))


def _val_batches(val_stream, cfg: TrainConfig, device):
    """A fixed validation set: eval_batches micro-batches of windows evenly spread over the validation stream.
    Every rank evaluates all of it, so the value does not depend on the world size."""
    import numpy as np
    import torch

    from app.data import windows

    n_windows = (len(val_stream) - 1) // cfg.model.seq_len
    count = min(n_windows, cfg.eval_batches * cfg.parallel.micro_batch)
    ids = np.linspace(0, n_windows - 1, count).astype(np.int64)
    out = []
    for start in range(0, count, cfg.parallel.micro_batch):
        x, y = windows(val_stream, ids[start:start + cfg.parallel.micro_batch], cfg.model.seq_len)
        out.append((torch.from_numpy(x).long().to(device), torch.from_numpy(y).long().to(device)))
    return out


def _evaluate(engine, batches, pipelined: bool, teacher=None, temperature: float = 1.0) -> tuple[float, float | None]:
    """Validation cross-entropy, and (when distilling) the student's KL to the teacher at temperature T."""
    import torch

    from app.distill import kd_loss

    engine.eval()
    kl = None
    with torch.no_grad():
        if pipelined:
            loss = float(engine.eval_batch(iter(batches), num_micro_batches=len(batches)))
        else:
            losses, kls = [], []
            for x, y in batches:
                logits, micro_loss = engine(x, y)
                losses.append(float(micro_loss))
                if teacher is not None:
                    kls.append(float(kd_loss(logits, teacher(x)[0], y, 1.0, temperature)[2]))
            loss = sum(losses) / len(losses)
            kl = sum(kls) / len(kls) if kls else None
    engine.train()
    return loss, kl


def _load_teacher(path: str | None, device):
    """The frozen teacher of a distillation run (None for plain training): eval mode, no gradients."""
    if not path:
        return None
    from app.registry import load_artifact

    teacher = load_artifact(path).model.to(device)
    teacher.requires_grad_(False)
    return teacher.eval()


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: restore if a checkpoint exists, train to cfg.steps, checkpoint and report."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from app.data import GlobalOrder, load_tokens
    from app.distill import kd_loss
    from app.metrics import RayTrainMetrics, matmul_peak_flops, mfu, straggler_ratio
    from app.parallel import resolve_precision
    from pipelines import standby
    from pipelines.elastic import SavedBeforeDeadline

    t_begin = time.perf_counter()
    if config["cfg"]["checkpoint"]["every_minutes"] == "auto":
        import app.costs  # noqa: F401  (scipy: in the start-up, not in the middle of the first steps)
    standby.claim()  # this process trains now: if it was a warm standby, it no longer waits to be reaped
    cfg = TrainConfig.model_validate(config["cfg"])
    board, data_dir = config["board"], config["data_dir"]
    ctx = _train_fn_utils().get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.parallel.cpus_per_worker)
    device = _worker_device(cfg)
    precision = resolve_precision(cfg.parallel.precision, device.type,
                                  device.type == "cuda" and torch.cuda.is_bf16_supported())
    plan = batch_plan(cfg.parallel.global_batch, cfg.parallel.micro_batch, world, cfg.parallel.pipeline_stages)
    pipelined = cfg.parallel.pipeline_stages > 1

    stream = load_tokens(data_dir, "train", domains=cfg.data.domains)
    order = GlobalOrder.for_stream(cfg.data.seed, len(stream), cfg.model.seq_len)
    batches = _Batches(stream, order, plan, cfg.model.seq_len, device)
    val = _val_batches(load_tokens(data_dir, "val", domains=cfg.data.domains), cfg, device)
    teacher = _load_teacher(config.get("teacher"), device)
    alpha, temperature = cfg.distill.alpha, cfg.distill.temperature
    flops_per_token = config["flops_per_token"]
    peak = cfg.parallel.peak_flops_per_worker or matmul_peak_flops(
        "cuda" if device.type == "cuda" else "cpu",
        "bfloat16" if precision == "bf16" else "float16" if precision == "fp16" else "float32",
        threads=cfg.parallel.cpus_per_worker)

    fs, storage_root = storage_fs(config["storage"])  # the driver's RunConfig storage_path, resolved alike
    run_path = f"{storage_root}/{cfg.name}"
    found = latest_complete(fs, run_path)
    # A checkpoint written at another data-parallel size is resharded through DeepSpeed's universal format
    # (ZeRO 1-3 partition optimizer state by dp rank); ZeRO 0 keeps whole state and loads at any size.
    reshard = bool(found) and found.state["dp"] != plan.dp and cfg.parallel.zero_stage > 0
    if reshard and pipelined:
        raise ConfigError(f"run '{cfg.name}' was checkpointed at data-parallel size {found.state['dp']}; pipeline "
                          f"runs resume at the same size (set parallel.workers={found.state['world_size']})")
    # Starting weights matter only to a fresh run: a checkpoint, when there is one, overwrites them.
    engine = _build_engine(cfg, plan, precision, load_universal=reshard,
                           init_from=None if found else config.get("init_from"))
    dp_rank = engine.grid.get_data_parallel_rank() if pipelined else rank

    start_step, restore_s, conversion_s = 0, 0.0, 0.0
    if found:
        t0 = time.perf_counter()
        assert found.state["config_hash"] == config["config_hash"], "the driver checks this before starting"
        with ray.train.Checkpoint(found.path, fs).as_directory() as local:
            tag = TAG
            if reshard:
                conversion_s = _reshard(local, found.path, fs, rank)
                tag = UNIVERSAL_TAG
            decay_by_group = [g["weight_decay"] for g in engine.optimizer.param_groups]
            engine.load_checkpoint(local, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
            if reshard:
                _repair_universal_load(engine, decay_by_group)
        start_step = found.state["step"]
        restore_s = time.perf_counter() - t0
    node_id, runtime_env = ray.get_runtime_context().get_node_id(), ray.get_runtime_context().get_runtime_env_string()
    if rank == 0:
        ray.get(board.attempt.remote(world, start_step, found.state["dp"] if found else None, conversion_s,
                                     len(stream), runtime_env if config.get("warm_standby") else None))
    dist.barrier()  # every worker registers under this attempt, not the previous one (a fault injector's targets)
    board.worker.remote(rank, os.getpid(), node_id, standby.process_start_time())
    standby_due = bool(config.get("warm_standby"))

    mtbf_s = _mtbf_seconds(cfg, ray.get(board.started.remote())) if rank == 0 else 0.0
    ledger = {"startup": time.perf_counter() - t_begin - restore_s, "restore": restore_s}
    attempt_productive_s = 0.0
    last_save = last_report = last_post = time.monotonic()
    unposted: list[dict] = []  # rank 0's records not yet on the board (with `ledger`, the seconds they add)
    retry_at, failures_in_a_row, storage_failures = None, 0, 0  # checkpoints deferred by unwritable storage
    report_gap_s = 2 * cfg.elastic.health_check_interval_s
    gauges = RayTrainMetrics(cfg.name) if rank == 0 else None
    end = min(cfg.steps, cfg.stop_at or cfg.steps)
    jit_saved, last_save_s = False, 0.0
    lo, hi = parse_workers(cfg.parallel.workers)
    elastic = lo < hi  # a group ends at its checkpoint before a preemption deadline only where it can restart smaller
    # The first drain-notice check waits one poll interval, and until Ray Train's synchronization actor answers: the
    # check is a barrier through it, and every new group starts that actor afresh (a new process, ~1-3 s while a
    # restart's other processes start too). Meanwhile the group trains.
    check_due, last_check, save_token = False, time.monotonic(), None
    checks_ready = _synchronization_ready() if rank == 0 else None
    last_check_step = last_report_step = start_step
    # Steps since the workers last agreed, this rank's view: (loss, step seconds, KL, learning rate, end time).
    rows: list[tuple[float, float, float, float, float]] = []
    next_sync = start_step + 1
    for step in range(start_step, end):
        # Dropout masks depend only on (seed, step, rank): a resumed step draws exactly what it drew before.
        _seed_step(cfg.seed * 1_000_003 + step * 4099 + rank, device)
        t0 = time.perf_counter()
        if pipelined:
            loss = float(engine.train_batch(iter(list(batches.micro_batches(step, dp_rank)))))
        else:
            losses, kls = [], []
            for x, y in batches.micro_batches(step, dp_rank):
                logits, micro_loss = engine(x, y)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits, _ = teacher(x)
                    micro_loss, _, micro_kl = kd_loss(logits, teacher_logits, y, alpha, temperature)
                    kls.append(micro_kl.detach())
                engine.backward(micro_loss)
                engine.step()
                losses.append(micro_loss.detach())
            loss = float(torch.stack(losses).mean())
            train_kl = float(torch.stack(kls).mean()) if kls else 0.0
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - t0
        if standby_due:  # once the group trains (not while it restores): a warm process for the next restart
            threading.Thread(target=standby.request, args=(node_id, runtime_env), daemon=True).start()
            standby_due = False

        done = step + 1
        ledger["productive"] = ledger.get("productive", 0.0) + step_time
        attempt_productive_s += step_time
        rows.append((loss, step_time, train_kl if not pipelined else 0.0, engine.get_lr()[0], time.time()))
        last = done == end
        evaluated = last or bool(cfg.eval_every and done % cfg.eval_every == 0)
        on_schedule = last or bool(cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0)
        retry_due = retry_at is not None and done >= retry_at
        # The workers agree (one all-gather) at the step rank 0 named last time, about every SYNC_INTERVAL_S, and at
        # every step they all know to be special; in between each rank just trains.
        if done < next_sync and not (evaluated or on_schedule or retry_due):
            continue

        # A drain notice (spot reclaim) reaches every rank through this barrier at the same steps: those where the
        # last agreement says it is due (Ray refreshes drain notices once per preemption_poll_interval_s, so asking
        # every step, ~5 ms each on two CPU workers, only costs), and every step while a notice stands.
        check = check_due and done - last_check_step >= cfg.elastic.preemption_check_every
        notice = _train_fn_utils().get_preemption_info() if check else None
        if check:
            last_check, last_check_step = time.monotonic(), done
            if rank == 0:  # at the same cadence: has the elastic policy asked for a checkpoint before a resize?
                save_token = ray.get(board.pending_save.remote())
        # One small all-gather: rank 0's wall-clock decisions (a timed checkpoint; winding down before a preemption
        # deadline; a report; the next notice check; the next agreement), so that every rank takes the same branch
        # below, and for each step since the last agreement every rank's loss and step time and the sample ids it
        # trained on.
        interval_s = _checkpoint_interval_s(cfg, last_save_s, step_time, mtbf_s)
        time_says_save = float(interval_s is not None and time.monotonic() - last_save >= interval_s)
        wind_down = float(notice is not None and _must_wind_down(notice, step_time, last_save_s))
        poll_due = time.monotonic() - last_check >= cfg.elastic.preemption_poll_interval_s
        time_says_check = float(notice is not None or (poll_due and (checks_ready is None or checks_ready())))
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        # ray.train.report blocks until Ray Train's controller has taken the previous report, which it polls once
        # per health-check interval (~0.9 s per report measured when reporting every few steps): report at most
        # once per two intervals so a report never waits. Every step still reaches the board and the gauges.
        report_free = float(time.monotonic() - last_report >= report_gap_s)
        time_says_report = float(done - last_report_step >= cfg.log_every and report_free)
        save_for_resize = float(check and save_token is not None)
        gap = _sync_gap([r[1] for r in rows], notice)
        first = done - len(rows)  # the agreement covers steps first+1 .. done
        decisions, per_step, sample_ids = _agree(
            [time_says_save, wind_down, time_says_report, time_says_check, save_for_resize, gap, rss_mb, report_free],
            [r[:3] for r in rows],
            [order.batch_ids(s, plan.global_batch, dp_rank, plan.dp) for s in range(first, done)],
            dp_rank, world)
        check_due, resize_save = bool(decisions[0, 3]), bool(decisions[0, 4])
        next_sync = done + int(decisions[0, 5])

        val_loss, val_kl = _evaluate(engine, val, pipelined, teacher, temperature) if evaluated else (None, None)
        periodic = on_schedule or bool(decisions[0, 0])
        save = periodic or resize_save
        winding_down = bool(decisions[0, 1])
        just_in_time = notice is not None and not jit_saved
        if notice is not None:
            # A node of ours is being drained: checkpoint at once (just in time), keep training while the deadline
            # leaves room, and checkpoint once more right before it, so that no optimizer step is lost.
            save = save or just_in_time or winding_down
            jit_saved = True
        max_rss_mb = float(decisions[:, 6].max())
        records = []
        for i, (_, own_step_s, _, lr, ended) in enumerate(rows):
            tokens_per_s = plan.global_batch * cfg.model.seq_len / own_step_s
            records.append({
                "step": first + i + 1, "loss": float(per_step[i, :, 0].mean()), "lr": lr, "step_time_s": own_step_s,
                "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, flops_per_token, peak * world),
                "straggler_ratio": straggler_ratio(per_step[i, :, 1].tolist()), "val_loss": None,
                "max_rss_mb": max_rss_mb, "sample_ids": sample_ids[i],
                **({"kl": float(per_step[i, :, 2].mean()), "val_kl": None} if teacher is not None else {}),
                "world_size": world, "time": ended, "checkpoint_interval_s": interval_s if rank == 0 else None,
            })
        rows = []
        record = records[-1]  # this step's: what a checkpoint, a report and the gauges carry
        record["val_loss"] = val_loss
        if teacher is not None:
            record["val_kl"] = val_kl
        record["checkpoint"] = ("final-before-deadline" if winding_down else "just-in-time" if just_in_time
                                else "periodic" if periodic else "before-resize") if save else None
        saved_for_resize = False
        if not save and retry_at is not None and done >= retry_at:
            save, record["checkpoint"] = True, "retry"
        if save:
            t0 = time.perf_counter()
            # Each checkpoint Ray Train is told of waits for the controller to take the previous report (it polls
            # once per health-check interval), and a group's end waits for all of them: a tiny run checkpointing
            # every 10 steps (~0.3 s) spent 46 s after its last step handing them over. So Ray Train hears of one
            # at most once per report gap, and of the last; every checkpoint is sealed in storage alike.
            register = last or bool(decisions[0, 7])
            saved = _save_checkpoint(engine, cfg, plan, done, config, record, fs, run_path, rank, register)
            while not saved and last:  # nothing left to train: wait for the storage rather than lose the run
                if failures_in_a_row >= FINAL_SAVE_TRIES:
                    raise OSError(f"checkpoint storage {run_path} stayed unwritable through {FINAL_SAVE_TRIES} "
                                  "tries at the end of the run; the run resumes from its last good checkpoint")
                time.sleep(min(2.0 ** failures_in_a_row, 30.0))
                failures_in_a_row += 1
                storage_failures += 1
                saved = _save_checkpoint(engine, cfg, plan, done, config, record, fs, run_path, rank, register)
            if saved:
                if resize_save and rank == 0:
                    board.saved.remote(save_token)  # the elastic policy may restart the group now
                    save_token = None
                saved_for_resize = resize_save
                retry_at, failures_in_a_row = None, 0
                last_save, last_save_s = time.monotonic(), time.perf_counter() - t0
                if register:
                    last_report = last_save
            else:  # storage briefly unwritable: keep training, try again after 1, 2, 4, ... steps
                storage_failures += 1
                retry_at = done + min(2 ** failures_in_a_row, 64)
                failures_in_a_row += 1
                record["checkpoint"] = f"deferred: storage unwritable, retry at step {retry_at}"
            ledger["checkpoint"] = ledger.get("checkpoint", 0.0) + time.perf_counter() - t0
            record["storage_failures"] = storage_failures
        elif bool(decisions[0, 2]):
            _report(record)
            last_report, last_report_step = time.monotonic(), done
        unposted.extend(records)
        if rank == 0 and (save or notice is not None or time.monotonic() - last_post >= BOARD_POST_INTERVAL_S):
            board.log.remote(unposted, ledger)
            # the gauge's goodput is this attempt's so far; the summary's covers the whole run, restarts included
            gauges.set({**record, "goodput": attempt_productive_s / max(time.perf_counter() - t_begin, 1e-9)})
            unposted, ledger, last_post = [], {}, time.monotonic()
        elif rank != 0:
            unposted, ledger = [], {}
        if winding_down and not last:
            if elastic and saved:
                # Everything is saved: end this group now, so that Ray Train restarts it at once on the nodes that
                # stay (pipelines/elastic.py) rather than once the node is gone and noticed.
                if rank == 0:
                    ray.get(board.log.remote([], {}))  # the board has taken this step's records (calls keep order)
                dist.barrier()  # no rank ends the group (and so rank 0's process) before that
                raise SavedBeforeDeadline(done, notice)
            _await_teardown(notice)
            jit_saved = False  # the node survived its deadline: a later notice gets its own checkpoints
        elif saved_for_resize and not last:
            # Saved for the resize the elastic policy is about to make: steps computed now would be thrown away.
            _await_resize()


SYNCHRONIZATION_WAIT_S = 10.0
"""How long drain-notice checks wait for a new group's synchronization actor before checking (and waiting) anyway."""


def _synchronization_ready():
    """A function telling, without waiting, whether Ray Train's synchronization actor for this group answers yet (or
    SYNCHRONIZATION_WAIT_S have passed). Where there is none to ask (Ray Train's local mode), always True."""
    import ray

    try:
        from ray.train.v2._internal.execution.context import get_train_context

        ready_ref = get_train_context().get_synchronization_actor().__ray_ready__.remote()
    except Exception:  # no synchronization actor here
        return lambda: True
    since, answered = time.monotonic(), []

    def ready() -> bool:
        if not answered and (ray.wait([ready_ref], timeout=0)[0] or time.monotonic() - since > SYNCHRONIZATION_WAIT_S):
            answered.append(True)
        return bool(answered)

    return ready


def _mtbf_seconds(cfg: TrainConfig, starts: list[tuple[float, int]]) -> float:
    """Mean time between failures for every_minutes=auto: the configured one, or the run's own observed one when
    it has failed more often. `starts`: (start time, world size) of every worker group so far, this one included.
    A restart at the same or a smaller size followed a failure; one at a larger size is a grow-back, not a failure."""
    configured = cfg.checkpoint.mtbf_minutes * 60
    failures = sum(size <= before for (_, before), (_, size) in zip(starts, starts[1:]))
    if not failures:
        return configured
    observed = (time.time() - starts[0][0]) / failures
    return min(configured, max(observed, 1.0))


def _checkpoint_interval_s(cfg: TrainConfig, last_save_s: float, step_s: float, mtbf_s: float) -> float | None:
    """Seconds between timed checkpoints (None = no timed ones); rank 0's value decides for every rank."""
    every = cfg.checkpoint.every_minutes
    if every == "auto":
        from app.costs import auto_checkpoint_interval

        return auto_checkpoint_interval(last_save_s, step_s, mtbf_s) if mtbf_s else None
    return every * 60 if every else None


def _must_wind_down(notice, step_time: float, save_s: float, margin_s: float = 1.0) -> bool:
    """True when another step and a checkpoint would no longer fit before the preemption deadline."""
    if notice.deadline_ms is None:
        return False
    return notice.deadline_ms / 1000 - time.time() < 2 * step_time + save_s + margin_s


def _await_teardown(notice, grace_s: float = 30.0) -> None:
    """Everything is saved: idle until Ray tears the group down at the deadline instead of computing steps that
    would be thrown away. If the node outlives its deadline by `grace_s` (a cancelled reclaim), carry on."""
    until = (notice.deadline_ms / 1000 if notice.deadline_ms else time.time()) + grace_s
    while time.time() < until:
        time.sleep(0.2)


def _await_resize(grace_s: float = 15.0) -> None:
    """The checkpoint the elastic policy asked for is sealed: idle until Ray restarts the group at its new size
    (a second or two: the controller's next poll) instead of computing steps the restart would throw away. If no
    restart comes within `grace_s`, carry on."""
    until = time.monotonic() + grace_s
    while time.monotonic() < until:
        time.sleep(0.1)


def _repair_universal_load(engine, decay_by_group: list[float]) -> None:
    """Undo two side effects of DeepSpeed 0.19.8's ZeRO-3 universal load (found by the 2→1→2 resize test):
    it copies param_groups[0]'s hyperparameters onto every group (weight decay on biases and norms), and it gives
    every sub-group's Adam state the same `step` tensor, which torch's AdamW then increments in place once per
    sub-group, skewing bias correction."""
    import torch

    for group, decay in zip(engine.optimizer.param_groups, decay_by_group):
        group["weight_decay"] = decay
    for state in engine.optimizer.optimizer.state.values():  # the torch AdamW inside the ZeRO optimizer
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


SYNC_INTERVAL_S = 0.2
"""How often (seconds of training) the workers agree on what to do next: one all-gather of a small table, which cost
~2 ms on two CPU workers (a tenth of a tiny step) when it was made at every step. Time-based decisions (a timed
checkpoint, the next drain-notice check, a report) are taken at that granularity; while a drain notice stands the
workers agree at every step."""
MAX_SYNC_GAP = 32


def _sync_gap(step_times: list[float], notice) -> float:
    """Steps until the workers next agree (rank 0's choice counts): as many as fit in SYNC_INTERVAL_S at the median
    step time so far, at most MAX_SYNC_GAP; one while a drain notice stands (its deadline is counted in steps)."""
    if notice is not None:
        return 1.0
    step_s = sorted(step_times)[len(step_times) // 2]
    return float(max(1, min(MAX_SYNC_GAP, int(SYNC_INTERVAL_S / max(step_s, 1e-6)))))


def _agree(decisions: list[float], steps: list[tuple[float, ...]], step_ids: list, dp_rank: int, world: int):
    """One all-gather for the steps since the workers last agreed. Returns every rank's `decisions` (a [world, k]
    table in rank order; rank 0's row decides), every rank's per-step values ([n_steps, world, m]), and for each
    step the window ids every data-parallel rank actually trained on, in dp-rank order: what makes "no sample
    skipped or repeated across a resize" a measured fact rather than an assumption. Every rank passes the same
    number of steps (they agree at the same steps). Window ids are exact in float64 up to 2**53."""
    import numpy as np
    import torch
    import torch.distributed as dist

    n, k, m = len(steps), len(decisions), len(steps[0])
    mine = torch.from_numpy(np.concatenate([decisions, [dp_rank], np.ravel(steps), np.ravel(step_ids)]))
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    table = torch.stack(gathered).numpy()  # [world, k + 1 + n*m + n*ids]
    per_step = table[:, k + 1:k + 1 + n * m].reshape(world, n, m).transpose(1, 0, 2)
    ids = table[:, k + 1 + n * m:].reshape(world, n, -1)
    by_rank = {int(r): ids[i] for i, r in enumerate(table[:, k])}  # pipeline stages of one dp rank agree
    sample_ids = [[int(i) for r in sorted(by_rank) for i in by_rank[r][s]] for s in range(n)]
    return table[:, :k], per_step, sample_ids


def _reshard(local: str, remote_path: str, fs, rank: int) -> float:
    """Rank 0 converts the checkpoint to universal format once (kept beside it for later resizes); the others
    wait, then read it. Returns the conversion's seconds (0 on ranks that did not convert)."""
    import pyarrow.fs as pafs
    import ray.train
    import torch.distributed as dist

    seconds = 0.0
    if rank == 0:
        t0 = time.perf_counter()
        universal = convert_to_universal(local)
        if not isinstance(fs, pafs.LocalFileSystem):
            pafs.copy_files(str(universal), f"{remote_path}/{UNIVERSAL_TAG}", destination_filesystem=fs)
        seconds = time.perf_counter() - t0
    dist.barrier()
    if rank != 0 and not isinstance(fs, pafs.LocalFileSystem):
        ray.train.Checkpoint(f"{remote_path}/{UNIVERSAL_TAG}", fs).to_directory(f"{local}/{UNIVERSAL_TAG}")
    return seconds


FINAL_SAVE_TRIES = 6  # the last checkpoint waits up to 1 + 2 + 4 + 8 + 16 + 30 s for unwritable storage


def _all_ranks_agree(ok: bool) -> bool:
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _storage_writable(fs, path: str, rank: int) -> bool:
    """Every rank probes the folder its shards go to, and all agree, before DeepSpeed's collective save starts:
    a rank that raised inside it would leave the others waiting at its barriers."""
    probe = f"{path}/.write-probe-rank{rank}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
        ok = True
    except OSError as err:
        print(f"checkpoint storage unwritable on rank {rank}: {err}", flush=True)
        ok = False
    return _all_ranks_agree(ok)


def _already_in_place(checkpoint, _dir_name: str):
    """Ray Train's upload step for a checkpoint written straight into the run folder: nothing to copy."""
    return checkpoint


def _save_checkpoint(engine, cfg: TrainConfig, plan, done: int, config: dict, metrics: dict, fs, run_path: str,
                     rank: int, register: bool = True) -> bool:
    """Every rank writes its shards (and, if `register`, reports them to Ray Train), then rank 0 seals the folder and
    prunes old ones. Returns False (on every rank alike) when the storage could not be written; the caller retries
    later. Resuming reads the seals, not Ray Train's list; on remote storage Ray Train's report is the upload, so
    there every checkpoint is registered."""
    import pyarrow.fs as pafs
    import ray.train
    import torch.distributed as dist
    from ray.train import CheckpointUploadMode

    name = checkpoint_name(done)
    state = {"step": done, "samples_consumed": done * plan.global_batch, "world_size": plan.world_size,
             "dp": plan.dp, "config_hash": config["config_hash"], "zero_stage": cfg.parallel.zero_stage,
             "pipeline_stages": cfg.parallel.pipeline_stages}
    path = f"{run_path}/{name}"
    if not _storage_writable(fs, path, rank):
        return False
    if isinstance(fs, pafs.LocalFileSystem):  # write in place: no second copy of every shard
        engine.save_checkpoint(path, tag=TAG, client_state=state)
        # Registered with Ray Train from a background thread: the hand-over waits until the controller took the
        # previous report (it polls once per health-check interval), up to a second that training need not wait.
        if register:
            _report(metrics, checkpoint=ray.train.Checkpoint(path),
                    checkpoint_upload_mode=CheckpointUploadMode.ASYNC, checkpoint_upload_fn=_already_in_place,
                    delete_local_checkpoint_after_upload=False)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=TAG, client_state=state)
            _report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    dist.barrier()  # every rank's files are in storage before the marker says so
    sealed = True
    if rank == 0:
        try:
            write_marker(fs, path, state)  # without it the folder is torn: never taken as the latest
        except OSError as err:
            print(f"could not seal checkpoint {path}: {err}", flush=True)
            sealed = False
        if sealed:
            try:
                prune(fs, run_path, cfg.checkpoint.keep)
            except OSError as err:  # old checkpoints stay a while longer; the next save prunes again
                print(f"could not prune old checkpoints of {run_path}: {err}", flush=True)
    return _all_ranks_agree(sealed)


# --------------------------------------------------------------------------------------------------------------
# Driver side


RESERVED_RUN_NAMES = ("registry", "data")  # folders of their own under the default storage


def validate(cfg: TrainConfig) -> list[int]:
    """Everything that can be refused before a worker starts; returns the accepted world sizes."""
    if cfg.name in RESERVED_RUN_NAMES:
        raise ConfigError(f"run name '{cfg.name}' is reserved (storage/{cfg.name} holds the {cfg.name}); "
                          "pass another --run-name")
    p = cfg.parallel
    check_parallel_settings(p.zero_stage, p.pipeline_stages, cfg.model.n_layer, p.offload_optimizer)
    lo, hi = parse_workers(p.workers)
    sizes = check_worker_range(p.global_batch, p.micro_batch, p.pipeline_stages, lo, hi)
    batch_plan(p.global_batch, p.micro_batch, hi if hi in sizes else sizes[-1], p.pipeline_stages)
    return sizes


def board_name(run_name: str) -> str:
    return f"scalestack-progress-{run_name}"


def _check_resume(fs, run_path: str, cfg: TrainConfig):
    """A run name with checkpoints resumes; refuse one whose checkpoints come from different settings."""
    found = latest_complete(fs, run_path)
    if found and found.state["config_hash"] != cfg.config_hash():
        raise ConfigError(
            f"run '{cfg.name}' already has checkpoints made with different settings (model, optim, data, steps or "
            "global batch); pass another --run-name to start a new run"
        )
    if found and found.state["step"] >= cfg.steps:
        raise ConfigError(f"run '{cfg.name}' already finished all {cfg.steps} steps; pass another --run-name")
    stages = cfg.parallel.pipeline_stages
    if found and stages > 1 and found.state["dp"] != parse_workers(cfg.parallel.workers)[1] // stages:
        raise ConfigError(f"run '{cfg.name}' was checkpointed with {found.state['world_size']} workers; pipeline runs "
                          f"resume at the same size (set parallel.workers={found.state['world_size']})")
    if found and cfg.stop_at and found.step >= cfg.stop_at:
        raise ConfigError(f"run '{cfg.name}' is already at step {found.step}; raise stop_at above it or drop it")
    return found


def _ensure_data(cfg: TrainConfig, data_dir: Path, num_cpus: int | None) -> None:
    try:
        manifest = read_manifest(data_dir)
    except DataError:
        from pipelines import prepare_data

        prepare_data.run(cfg.data.sources, data_dir, vocab_size=cfg.model.vocab_size,
                         val_fraction=cfg.data.val_fraction, seed=cfg.data.seed, max_documents=cfg.data.max_documents,
                         shard_tokens=cfg.data.shard_tokens, num_cpus=num_cpus)
        manifest = read_manifest(data_dir)
    if manifest.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"data in {data_dir} uses a {manifest.vocab_size}-token vocabulary but model.vocab_size="
            f"{cfg.model.vocab_size}; set model.vocab_size >= {manifest.vocab_size} or prepare the data again"
        )
    domains = cfg.data.domains
    unknown = sorted(set(domains or ()) - set(manifest.domains))
    if unknown:
        raise DataError(f"data.domains has {unknown}, which {data_dir} does not hold; choose from {manifest.domains}")
    need = cfg.model.seq_len * cfg.parallel.global_batch + 1
    have = sum(manifest.tokens("train", d) for d in domains) if domains else manifest.tokens("train")
    if have < need:
        raise DataError(f"{data_dir} has {have} training tokens{' in ' + '+'.join(domains) if domains else ''}, "
                        f"fewer than one global batch ({need}); prepare more data or lower parallel.global_batch")
    if domains and not all(manifest.tokens("val", d) for d in domains):
        raise DataError(f"{data_dir} has no validation tokens for one of data.domains={domains}; prepare the data "
                        "with a larger data.val_fraction")


def _locate(name: str | None) -> tuple[str | None, dict | None]:
    """A model the run reads (teacher, starting weights): (absolute location, so every worker finds it, and card);
    (None, None) when `name` is not set. An unknown name fails here, in one line."""
    if not name:
        return None, None
    from app.registry import locate

    return locate(name)


def _check_models(cfg: TrainConfig, data_dir: Path, teacher_card: dict | None, init_card: dict | None) -> None:
    """The teacher can teach this run and the starting weights can start it (against the prepared data's
    tokenizer, so after the data exists)."""
    from app.distill import check_teacher

    tokenizer_sha256 = read_manifest(data_dir).tokenizer_sha256
    if teacher_card is not None:
        check_teacher(teacher_card, cfg.model, tokenizer_sha256, cfg.distill.teacher)
    if init_card is not None:
        check_init_from(init_card, cfg.model, tokenizer_sha256, cfg.init_from)


SHAPE_FIELDS = ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "mlp_ratio", "bias")
"""The ModelConfig fields a model's weights depend on (dropout does not)."""


def check_init_from(card: dict[str, Any], model: ModelConfig, data_tokenizer_sha256: str, name: str) -> None:
    """Refuse, in one line, weights that cannot start this run: quantized, another tokenizer, another shape."""
    if card.get("quantization"):
        raise ConfigError(f"init_from={name} is quantized ({card['quantization']}); start from the fp32 model it "
                          "was made from")
    if card.get("tokenizer_sha256") and card["tokenizer_sha256"] != data_tokenizer_sha256:
        raise ConfigError(f"init_from={name} was trained with another tokenizer than the data in data.dir; point "
                          "data.dir at the data it was trained on (its card's 'data' field)")
    theirs = card["model_config"]
    differ = [f"model.{k}={theirs[k]}" for k in SHAPE_FIELDS if theirs.get(k) != getattr(model, k)]
    if differ:
        raise ConfigError(f"init_from={name} has another shape than this run's model; set {' '.join(differ)} "
                          "(or start from a model of this shape)")


def _use_gpu(cfg: TrainConfig) -> bool:
    import ray

    if cfg.parallel.device == "cpu":
        return False
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if cfg.parallel.device == "cuda" and not has_gpu:
        raise ConfigError("parallel.device=cuda but the Ray cluster has no GPUs; use parallel.device=auto or cpu")
    return has_gpu


def _single_process_group_env() -> None:
    """torch.distributed's env:// variables for a world of one, so that Ray Train's local mode creates the
    process group the loop's collectives (and DeepSpeed) expect."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def _storage_root(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).resolve())


def run(cfg: TrainConfig, *, num_cpus: int | None = None, progress: bool = True,
        in_process: bool = False) -> TrainResult:
    """Train `cfg` on Ray (embedded, or the cluster at RAY_ADDRESS); resume if the run already has checkpoints.

    `in_process=True` runs a one-worker run's loop in this process (Ray Train's local mode, `num_workers=0`):
    no controller, no worker actor: a small sweep trial takes a fifth of the wall time here. It is for a process
    that owns its resources and ends with the run — a Ray Tune trial (`pipelines.sweep`) — since it sets
    torch.distributed's variables here and no FailureConfig restarts it.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from app.console import progress_bar
    from app.model import GPT
    from pipelines import standby
    from pipelines.elastic import ElasticTorchTrainer, apply_recovery_env
    from pipelines.ray_session import ray_session

    accepted = validate(cfg)
    data_dir = Path(cfg.data.dir).resolve()
    storage = _storage_root(cfg.storage)
    fs, storage_path = storage_fs(storage)
    run_path = f"{storage_path}/{cfg.name}"
    lo, hi = parse_workers(cfg.parallel.workers)
    if in_process and hi != 1:
        raise ConfigError(f"parallel.workers={cfg.parallel.workers}: an in-process run has exactly one worker; "
                          "set parallel.workers=1 or run it on Ray Train workers")
    _check_resume(fs, run_path, cfg)
    teacher, teacher_card = _locate(cfg.distill.teacher)  # before Ray starts; their checks need the data, below
    init_from, init_card = _locate(cfg.init_from)

    with ray_session(num_cpus or max(hi * cfg.parallel.cpus_per_worker, 1)):
        _ensure_data(cfg, data_dir, num_cpus)
        _check_models(cfg, data_dir, teacher_card, init_card)
        use_gpu = _use_gpu(cfg)
        import torch

        with torch.device("meta"):
            model = GPT(cfg.model)
            flops_per_token = model.flops_per_token()
            # a sweep's two parameter columns, so a planner fitted on either can place this run's tokens/s
            sizes = {"n_params": model.num_params(non_embedding=True),
                     "n_params_total": model.num_params(non_embedding=False)}
            del model
        # Named so that tools beside the driver (the chaos harness, a notebook) can follow the run.
        # Pinned to the driver's node (the on-demand head on a cluster): it must outlive any worker node.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        board = _progress_board_cls().options(
            name=board_name(cfg.name), scheduling_strategy=NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False)).remote()
        resources = {"CPU": cfg.parallel.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        apply_recovery_env(cfg.elastic.model_dump())
        warm_standby = cfg.elastic.warm_standby and not in_process
        if in_process:
            _single_process_group_env()
        trainer = ElasticTorchTrainer(
            train_loop_per_worker,
            accepted_sizes=accepted, board=board,
            train_loop_config={"cfg": cfg.model_dump(), "board": board, "data_dir": str(data_dir),
                               "config_hash": cfg.config_hash(), "flops_per_token": flops_per_token,
                               "teacher": teacher, "init_from": init_from, "storage": storage,
                               "warm_standby": warm_standby},
            scaling_config=ScalingConfig(num_workers=0, use_gpu=use_gpu) if in_process else ScalingConfig(
                num_workers=hi if lo == hi else (lo, hi), use_gpu=use_gpu, resources_per_worker=resources,
                elastic_resize_monitor_interval_s=cfg.elastic.resize_monitor_interval_s),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name=cfg.name, storage_path=storage, failure_config=FailureConfig(
                max_failures=cfg.max_failures, max_preemption_failures=cfg.elastic.max_preemption_failures),
                worker_runtime_env=standby.worker_runtime_env(
                    ray.get_runtime_context().namespace, board_name(cfg.name), use_gpu) if warm_standby else {}),
        )
        if warm_standby:
            standby.request_for_first_group(trainer.run_config.worker_runtime_env, resources, hi)
        outcome: dict[str, Any] = {}
        t_start = time.perf_counter()

        def fit() -> None:
            try:
                outcome["result"] = trainer.fit()
            except BaseException as err:  # surfaced on the driver thread below
                outcome["error"] = err

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        records: list[dict] = []
        with progress_bar(f"training {cfg.name}", total=min(cfg.steps, cfg.stop_at or cfg.steps)) as bar:
            while thread.is_alive():
                thread.join(timeout=0.5)
                new, _, _ = ray.get(board.snapshot.remote(len(records)))
                records.extend(new)
                if new:
                    r = new[-1]
                    bar.update(completed=r["step"], status=f"loss {r['loss']:.3f} · {r['tokens_per_s']:,.0f} tok/s")
        wall_s = time.perf_counter() - t_start
        new, attempts, ledger_s = ray.get(board.snapshot.remote(len(records)))
        records.extend(new)
        ray.kill(board)  # frees its name at once for a re-run of this run name
    if "error" in outcome:
        raise outcome["error"]

    history, lost_s, lost_steps = _history(records)
    ledger = GoodputLedger({**GoodputLedger().seconds, **ledger_s})
    ledger.seconds["productive"] -= lost_s  # steps computed twice count once
    ledger.add("lost", lost_s)
    artifact = _export(fs, run_path, cfg, data_dir, history, teacher_card, storage, init_card)
    summary = _summary(cfg, history, attempts, ledger, wall_s, flops_per_token, sizes, lost_steps)
    _write_run_files(fs, run_path, summary, history)
    return TrainResult(run_dir=f"{storage}/{cfg.name}" if "://" in storage else run_path, summary=summary,
                       artifact=artifact, history=history, records=records, attempts=attempts)


def _history(records: list[dict]):
    """One row per optimizer step (the last time it was computed), and the seconds and number of step
    computations thrown away by failures (steps done after the last checkpoint, recomputed after a restart)."""
    import pandas as pd

    df = pd.DataFrame(records)
    if df.empty:
        return df, 0.0, 0
    lost = df[df.duplicated("step", keep="last")]
    kept = df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    return kept, float(lost["step_time_s"].sum()), len(lost)


def _summary(cfg: TrainConfig, history, attempts: list[dict], ledger: GoodputLedger, wall_s: float,
             flops_per_token: int, sizes: dict[str, int], lost_steps: int) -> dict[str, Any]:
    tokens = int(len(history) * cfg.parallel.global_batch * cfg.model.seq_len)
    productive = ledger.seconds["productive"]
    tokens_per_s = tokens / productive if productive > 0 else 0.0
    val = history["val_loss"].dropna() if "val_loss" in history else []
    world_sizes = [a["world_size"] for a in attempts]
    return {
        "run": cfg.name,
        "init_from": cfg.init_from,
        "final_loss": float(history["loss"].iloc[-1]),
        "final_val_loss": float(val.iloc[-1]) if len(val) else None,
        **_distill_summary(cfg, history),
        "first_loss": float(history["loss"].iloc[0]),
        "steps": int(history["step"].iloc[-1]),
        "tokens": tokens,
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(float(history["mfu"].median()), 4),
        "straggler_ratio_p50": round(float(history["straggler_ratio"].median()), 3),
        "max_rss_mb_per_worker": round(float(history["max_rss_mb"].max()), 1),
        "wall_s": round(wall_s, 2),
        "world_sizes": world_sizes,
        "restarts": max(0, len(attempts) - 1),
        "lost_steps": lost_steps,
        "storage_failures": int(history["storage_failures"].max()) if "storage_failures" in history
        and history["storage_failures"].notna().any() else 0,
        "resumed_from_step": attempts[0]["start_step"] if attempts else 0,
        "universal_conversion_s": round(sum(a["universal_conversion_s"] for a in attempts), 3),
        "goodput": round(ledger.goodput(wall_s), 4),
        "ledger": ledger.summary(wall_s),
        **sizes,
        "flops_per_token": flops_per_token,
        "zero_stage": cfg.parallel.zero_stage,
        "pipeline_stages": cfg.parallel.pipeline_stages,
    }


def _distill_summary(cfg: TrainConfig, history) -> dict[str, Any]:
    """A distillation run's summary also says who taught it and how close the student got (KL on validation)."""
    if not cfg.distill.teacher:
        return {}
    val_kl = history["val_kl"].dropna() if "val_kl" in history else []
    return {"teacher": cfg.distill.teacher, "alpha": cfg.distill.alpha, "temperature": cfg.distill.temperature,
            "first_val_kl": float(val_kl.iloc[0]) if len(val_kl) else None,
            "final_val_kl": float(val_kl.iloc[-1]) if len(val_kl) else None, "domains": cfg.data.domains}


def _export(fs, run_path: str, cfg: TrainConfig, data_dir: Path, history, teacher_card: dict | None = None,
            storage: str | None = None, init_card: dict | None = None) -> str | None:
    """Consolidate the final checkpoint into fp32 weights, measure the model card's fields (validation loss per
    domain, tokens/s at batch 1 and 16 on this machine), write the artifact next to the checkpoints and publish it
    in the registry ($SCALESTACK_REGISTRY, else STORAGE/registry) under the run's name."""
    import os

    import pyarrow.fs as pafs
    import ray.train

    from app.evaluate import card_metrics
    from app.model import GPT
    from app.registry import ROOT_ENV, TIED_NAME, Registry, save_artifact
    from app.tokenizer import Tokenizer

    found = latest_complete(fs, run_path)
    if found is None:
        return None
    val = history["val_loss"].dropna() if "val_loss" in history else []
    lineage = {"teacher": None, "source_run": cfg.name, "config_hash": cfg.config_hash()}
    if teacher_card is not None:
        from app.distill import teacher_lineage

        lineage.update(teacher_lineage(teacher_card, cfg.distill.teacher),
                       alpha=cfg.distill.alpha, temperature=cfg.distill.temperature)
    if init_card is not None:
        lineage.update(init_from=cfg.init_from, init_source_run=init_card.get("source_run"),
                       init_config_hash=init_card.get("config_hash"), init_val_loss=init_card.get("val_loss"))
    card = {"source_run": cfg.name, "config_hash": cfg.config_hash(), "step": found.step,
            "val_loss": float(val.iloc[-1]) if len(val) else None, "data": str(data_dir),
            "domains": cfg.data.domains, "quantization": None, "lineage": lineage}
    with ray.train.Checkpoint(found.path, fs).as_directory() as local:
        state = consolidated_state_dict(local, found.state["zero_stage"], found.state["pipeline_stages"],
                                        cfg.model.n_layer)
    tokenizer = Tokenizer.load(data_dir)
    model = GPT(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {TIED_NAME} and not unexpected, (missing, unexpected)
    card.update(card_metrics(model, tokenizer, data_dir, batches=4))
    target = f"{run_path}/artifact"
    with tempfile.TemporaryDirectory() as tmp:
        local_artifact = save_artifact(f"{tmp}/artifact", state, cfg.model, tokenizer, card)
        if isinstance(fs, pafs.LocalFileSystem):
            import shutil

            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(local_artifact, target)
        else:
            pafs.copy_files(str(local_artifact), target, destination_filesystem=fs)
        if storage is not None:
            Registry(os.environ.get(ROOT_ENV) or f"{storage}/registry").publish(cfg.name, local_artifact,
                                                                                overwrite=True)
    return target


def _write_run_files(fs, run_path: str, summary: dict, history) -> None:
    import json

    with fs.open_output_stream(f"{run_path}/summary.json") as f:
        f.write(json.dumps(summary, indent=2).encode())
    with fs.open_output_stream(f"{run_path}/history.csv") as f:
        f.write(history.to_csv(index=False).encode())


def main(argv=None) -> int:
    import sys

    from app.__main__ import main as app_main

    return app_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
