"""Typed functions a notebook calls; each returns a result object. The CLI is a thin shell over these.

    import app
    data = app.prepare_data(["stdlib"], out="runs/data/code", preset="tiny")
    app.info("bench")

Pipelines are imported inside functions so that `import app` stays fast and starts no Ray.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from app.config import TrainConfig, load_config, parse_workers
from app.console import html_table
from app.parallel import memory_estimate

__all__ = ["load_config", "prepare_data", "info", "train", "ModelInfo"]


def prepare_data(
    sources: Sequence[str] | None = None,
    out: str | Path | None = None,
    *,
    preset: str = "base",
    overrides: Sequence[str] = (),
    vocab_size: int | None = None,
    max_documents: int | None = None,
    force: bool = False,
    num_cpus: int | None = None,
):
    """Tokenise `sources` into Parquet shards under `out` (defaults from the preset's `data` and `model`
    sections). Returns a `PrepareResult` with the manifest; an identical prepared folder is reused."""
    from pipelines import prepare_data as pipeline

    cfg = load_config(preset, list(overrides))
    return pipeline.run(
        sources=list(sources or cfg.data.sources),
        out=out or cfg.data.dir,
        vocab_size=vocab_size or cfg.model.vocab_size,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.data.seed,
        max_documents=max_documents if max_documents is not None else cfg.data.max_documents,
        shard_tokens=cfg.data.shard_tokens,
        force=force,
        num_cpus=num_cpus,
    )


@dataclass(frozen=True)
class ModelInfo:
    """Size and cost of one preset's model: parameters, training FLOPs per token, memory per worker."""

    preset: str
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    vocab_size: int
    params_total: int
    params_non_embedding: int
    flops_per_token: int  # training (forward + backward) FLOPs per token
    workers: int
    zero_stage: int
    memory_per_worker_bytes: int  # params + grads + optimizer state + activations of one micro-batch
    optimizer_offloaded_bytes: int

    def rows(self) -> list[tuple[str, object]]:
        return [(k, v) for k, v in asdict(self).items()]

    def _repr_html_(self) -> str:
        return html_table(["field", "value"], self.rows())


def info(preset: str = "base", overrides: Sequence[str] = ()) -> ModelInfo:
    """Parameters, FLOPs per token and an estimate of training memory per worker for a preset."""
    import torch

    from app.model import GPT

    cfg: TrainConfig = load_config(preset, list(overrides))
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = GPT(cfg.model)
    m, p = cfg.model, cfg.parallel
    workers = parse_workers(p.workers)[1]
    dp = max(1, workers // p.pipeline_stages)
    n_params = model.num_params(non_embedding=False)
    mem = memory_estimate(
        n_params=n_params,
        zero_stage=p.zero_stage,
        dp=dp,
        offload_optimizer=p.offload_optimizer,
        micro_batch=p.micro_batch,
        seq_len=m.seq_len,
        n_layer=m.n_layer,
        d_model=m.d_model,
        n_head=m.n_head,
        param_bytes=2 if p.precision in ("bf16", "fp16") else 4,
        activation_checkpointing=p.activation_checkpointing,
    )
    return ModelInfo(
        preset=preset,
        n_layer=m.n_layer,
        n_head=m.n_head,
        d_model=m.d_model,
        seq_len=m.seq_len,
        vocab_size=m.vocab_size,
        params_total=n_params,
        params_non_embedding=model.num_params(non_embedding=True),
        flops_per_token=model.flops_per_token(),
        workers=workers,
        zero_stage=p.zero_stage,
        memory_per_worker_bytes=mem.total,
        optimizer_offloaded_bytes=mem.offloaded,
    )


def train(preset: str | TrainConfig = "tiny", overrides: Sequence[str] = (), *, num_cpus: int | None = None):
    """Train with Ray Train + DeepSpeed on embedded Ray (or the cluster at RAY_ADDRESS). Returns a `TrainResult`
    (summary metrics, run folder, exported artifact, loss history as a DataFrame). A run name that already has
    checkpoints resumes from the newest intact one."""
    from pipelines import train as pipeline

    cfg = preset if isinstance(preset, TrainConfig) else load_config(preset, list(overrides))
    return pipeline.run(cfg, num_cpus=num_cpus)
