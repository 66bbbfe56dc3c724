"""Pure parallelism planning: the batch plan for a world size, accepted world sizes, per-worker memory.

The global batch is a constant of the run, not of the cluster: for each data-parallel size the plan recomputes
gradient accumulation so that micro_batch × grad_accum × dp == global_batch (DeepSpeed 0.19.8 has no
`elasticity` section any more; this is ours).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # samples per optimizer step
    micro_batch: int  # samples per forward/backward on one data-parallel rank
    dp: int  # data-parallel size = world size / pipeline stages
    grad_accum: int  # micro-batches per optimizer step on each data-parallel rank
    pipeline_stages: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.pipeline_stages


def _plan_problem(global_batch: int, micro_batch: int, world_size: int, pipeline_stages: int) -> str | None:
    if world_size % pipeline_stages:
        return f"world size {world_size} is not a multiple of parallel.pipeline_stages={pipeline_stages}"
    dp = world_size // pipeline_stages
    if global_batch % (micro_batch * dp):
        return (
            f"parallel.global_batch={global_batch} is not divisible by "
            f"parallel.micro_batch={micro_batch} × data-parallel size {dp}"
        )
    return None


def batch_plan(global_batch: int, micro_batch: int, world_size: int, pipeline_stages: int = 1) -> BatchPlan:
    """The plan for one world size, or a ConfigError naming the sizes that would work."""
    problem = _plan_problem(global_batch, micro_batch, world_size, pipeline_stages)
    if problem:
        ok = accepted_world_sizes(global_batch, micro_batch, pipeline_stages, 1, max(world_size, 8) * 4)
        raise ConfigError(f"{problem}; world sizes this run accepts: {ok or 'none — change micro_batch'}")
    dp = world_size // pipeline_stages
    return BatchPlan(global_batch, micro_batch, dp, global_batch // (micro_batch * dp), pipeline_stages)


def accepted_world_sizes(global_batch: int, micro_batch: int, pipeline_stages: int, lo: int, hi: int) -> list[int]:
    """World sizes in [lo, hi] for which the global batch splits exactly."""
    return [w for w in range(lo, hi + 1) if _plan_problem(global_batch, micro_batch, w, pipeline_stages) is None]


def check_worker_range(global_batch: int, micro_batch: int, pipeline_stages: int, lo: int, hi: int) -> list[int]:
    """Accepted sizes within parallel.workers=lo:hi; a ConfigError before any worker starts if there are none."""
    if global_batch % micro_batch:
        raise ConfigError(
            f"parallel.micro_batch={micro_batch} does not divide parallel.global_batch={global_batch}; "
            "pick a micro-batch that divides the global batch"
        )
    sizes = accepted_world_sizes(global_batch, micro_batch, pipeline_stages, lo, hi)
    if not sizes:
        wider = accepted_world_sizes(global_batch, micro_batch, pipeline_stages, 1, max(hi, 8) * 4)
        raise ConfigError(
            f"parallel.workers={lo}:{hi} contains no world size that splits parallel.global_batch={global_batch} "
            f"into micro-batches of {micro_batch} over {pipeline_stages} pipeline stage(s); accepted sizes: {wider}"
        )
    return sizes


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per worker for mixed-precision Adam training, split by what holds them (ZeRO paper accounting)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    offloaded: int  # optimizer bytes moved to CPU memory by offload_optimizer

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


def memory_estimate(
    n_params: int,
    zero_stage: int,
    dp: int,
    offload_optimizer: bool,
    micro_batch: int,
    seq_len: int,
    n_layer: int,
    d_model: int,
    n_head: int,
    param_bytes: int = 4,
    activation_checkpointing: bool = False,
) -> MemoryEstimate:
    """Per-worker training memory. Params and grads take `param_bytes` each; Adam keeps fp32 master weights
    (only when training below fp32), momentum and variance. ZeRO-1 shards optimizer state, ZeRO-2 also grads,
    ZeRO-3 also params, each over `dp` ranks. Activations per layer ≈ s·b·d·(34 + 5·a·s/d) bytes at 16 bits
    (Korthikanti et al. 2022), scaled to `param_bytes`; with checkpointing only each block's input is kept."""
    optim_bytes = 8 + (4 if param_bytes < 4 else 0)
    params = n_params * param_bytes
    grads = n_params * param_bytes
    optimizer = n_params * optim_bytes
    if zero_stage >= 1:
        optimizer //= dp
    if zero_stage >= 2:
        grads //= dp
    if zero_stage >= 3:
        params //= dp
    offloaded = optimizer if offload_optimizer else 0
    per_layer = seq_len * micro_batch * d_model * (34 + 5 * n_head * seq_len / d_model) * param_bytes / 2
    if activation_checkpointing:
        per_layer = seq_len * micro_batch * d_model * param_bytes
    return MemoryEstimate(params, grads, optimizer - offloaded, int(per_layer * n_layer), offloaded)



def resolve_precision(precision: str, device_type: str, bf16_supported: bool) -> str:
    """'auto' → bf16 on GPUs that support it, fp32 otherwise; an explicit half precision on CPU is refused."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" and bf16_supported else "fp32"
    if precision in ("bf16", "fp16") and device_type != "cuda":
        raise ConfigError(f"parallel.precision={precision} needs a GPU; use parallel.precision=fp32 (or auto) on CPU")
    if precision == "bf16" and not bf16_supported:
        raise ConfigError("parallel.precision=bf16 is not supported by this GPU; use parallel.precision=fp16 or auto")
    return precision


def check_parallel_settings(zero_stage: int, pipeline_stages: int, n_layer: int, offload_optimizer: bool) -> None:
    """Combinations DeepSpeed cannot run, refused before any worker starts."""
    if pipeline_stages > 1 and zero_stage > 1:
        raise ConfigError(
            f"parallel.zero_stage={zero_stage} cannot be combined with parallel.pipeline_stages={pipeline_stages}: "
            "DeepSpeed pipelines support ZeRO 0 or 1; set parallel.zero_stage=1"
        )
    if pipeline_stages > n_layer + 2:
        raise ConfigError(
            f"parallel.pipeline_stages={pipeline_stages} exceeds the model's {n_layer + 2} pipeline layers "
            "(embedding, blocks, head); use fewer stages"
        )
    if offload_optimizer and zero_stage == 0:
        raise ConfigError("parallel.offload_optimizer needs ZeRO; set parallel.zero_stage to 1, 2 or 3")


def deepspeed_config(
    plan: BatchPlan,
    zero_stage: int,
    offload_optimizer: bool,
    precision: str,
    grad_clip: float,
    load_universal: bool = False,
) -> dict:
    """The DeepSpeed config dict for one world size. The optimizer and LR schedule are ours (passed to
    `deepspeed.initialize` as objects), so DeepSpeed saves and restores their state but does not build them."""
    zero: dict = {"stage": zero_stage}
    if zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=5e7)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    config = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        # Our AdamW is torch's; DeepSpeed would otherwise insist on its compiled CPU Adam when offloading.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # progress is reported by us
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config
