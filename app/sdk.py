"""Typed functions a notebook calls; each returns a result object. The CLI is a thin shell over these.

    import app
    data = app.prepare_data(["stdlib"], out="runs/data/code", preset="tiny")
    app.info("bench")
    result = app.sweep("tune_configs/smoke.yaml")     # SweepResult; result.df has one row per trial
    law = app.fit(result.results_parquet)             # ScalingFit: .predict(N, D), .frontier(C), .plot(dir)
    app.plan(flops=1e21, fit=law, instance="g6e.xlarge", spot=True)   # TrainingPlan

Pipelines are imported inside functions so that `import app` stays fast and starts no Ray.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from app.config import TrainConfig, apply_overrides, config_from_dict, load_config, parse_workers
from app.console import html_table
from app.parallel import memory_estimate

__all__ = ["load_config", "prepare_data", "info", "train", "ModelInfo", "sweep", "fit", "fit_report", "load_fit",
           "plan", "chaos", "quantize", "evaluate", "models", "deploy", "demo"]


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
    checkpoints resumes from the newest intact one. The override `init_from=MODEL` (a registry name or artifact
    folder of the same shape) starts from that model's weights instead of a random initialisation."""
    from pipelines import train as pipeline

    return pipeline.run(_config(preset, list(overrides)), num_cpus=num_cpus)


def _config(preset: str | TrainConfig, overrides: list[str]) -> TrainConfig:
    """A preset (name or YAML path) or a TrainConfig, with dotted overrides applied (validated like the CLI's)."""
    if isinstance(preset, TrainConfig):
        return config_from_dict(apply_overrides(preset.model_dump(), overrides)) if overrides else preset
    return load_config(preset, overrides)


def distill(teacher: str, preset: str | TrainConfig = "tiny", overrides: Sequence[str] = (), *,
            domains: Sequence[str] | None = None, alpha: float | None = None, temperature: float | None = None,
            run_name: str | None = None, init_from: str | None = None, num_cpus: int | None = None):
    """Distil `teacher` (a registry name or artifact folder) into the student `preset` with Ray Train + DeepSpeed:
    loss (1 − α)·CE + α·T²·KL(teacher ‖ student). `domains=["code"]` makes a specialist trained on that domain only.
    The run name defaults to `<preset>-student` (`<preset>-<domain>-specialist` with one domain). Returns a
    `TrainResult` whose summary holds the validation KL to the teacher before and after. `init_from` (a registry
    name or artifact folder of the student's shape) starts from those weights instead of random ones: a
    specialist distilled on from a general student keeps far more of the teacher's quality on its domain than
    one distilled from scratch in the same steps (README, compression benchmark)."""
    from pipelines import distill as pipeline

    extra = [f"distill.teacher={teacher}"]
    if alpha is not None:
        extra.append(f"distill.alpha={alpha}")
    if temperature is not None:
        extra.append(f"distill.temperature={temperature}")
    if domains:
        extra.append("data.domains=[" + ",".join(domains) + "]")
    if init_from:
        extra.append(f"init_from={init_from}")
    if run_name:
        extra.append(f"name={run_name}")
    cfg = _config(preset, extra + list(overrides))
    if not isinstance(preset, TrainConfig) and not run_name and not any(o.startswith("name=") for o in overrides):
        suffix = f"{domains[0]}-specialist" if domains and len(domains) == 1 else "student"
        cfg = cfg.model_copy(update={"name": f"{cfg.name}-{suffix}"})
    return pipeline.run(cfg, num_cpus=num_cpus)


# ---- scaling laws: sweep → fit → plan ------------------------------------------------------------------------


def sweep(config, out: str | Path | None = None, *, overrides: Sequence[str] = (), num_cpus: int | None = None,
          reseed: Sequence[int] = (), reseed_from: str | Path | None = None):
    """Run (or resume) the sweep in `config` (a tune_configs/*.yaml path or a SweepConfig) with Ray Tune; each
    trial trains one model to the end of its schedule with Ray Train. Results land in `out` (default
    runs/sweeps/NAME). Returns a `SweepResult` whose `.df` has one row per trial: N, D, C = 6ND, val_loss, ...
    Running it again on the same `out` resumes: finished trials are not redone. With `reseed=[1, 2]`, the points
    of the finished sweep (at `reseed_from`, default runs/sweeps/NAME) train again at those seeds, each at the lr
    factor the sweep chose, into runs/sweeps/NAME-seeds: `fit_report([A, A_seeds], seed_spread=True)` reads both."""
    from pipelines import sweep as pipeline

    return pipeline.run(config, out, overrides=list(overrides), num_cpus=num_cpus, reseed=list(reseed),
                        reseed_from=reseed_from)


def fit_report(results, *, out: str | Path | None = None, bootstrap: int = 1000, seed: int = 0,
               predict: Sequence[tuple[float, float]] = (), grid: str = "full", drop_highest_loss: int = 0,
               plots: bool = True, n_column: str | None = None, rerun_noise: float | None = None,
               reruns: int = 200, seed_spread: bool = False):
    """Fit a results table (a sweep's results.parquet/.csv, a CSV of runs, or a DataFrame; or a list of them,
    fitted together): approach 3 with a `bootstrap`-resample interval, plus Kaplan L(N), L(C) and approach 2
    where the runs allow. With `out`, writes fit.json and loss_vs_compute.png, isoflop.png, residuals.png there.
    `n_column` picks the parameter count (a sweep's "n_params_total" counts the embeddings too; default: its
    non-embedding "n_params"). With `rerun_noise` (a run's loss spread between seeds, e.g. 0.007),
    `.rerun_checks` says how far each prediction would move if the sweep were run again
    (`ScalingFit.rerun_check`); with `seed_spread` (runs at several seeds per point), `.seed_spreads` says how far
    apart one-seed sweeps predict them (`ScalingFit.seed_spread`). Returns a `FitReport`."""
    from pipelines import fit_scaling

    return fit_scaling.run(results, out=out, bootstrap=bootstrap, seed=seed, predict=predict, grid=grid,
                           drop_highest_loss=drop_highest_loss, plots=plots, n_column=n_column,
                           rerun_noise=rerun_noise, reruns=reruns, seed_spread=seed_spread)


def fit(results, *, out: str | Path | None = None, bootstrap: int = 1000, seed: int = 0,
        predict: Sequence[tuple[float, float]] = (), grid: str = "full", drop_highest_loss: int = 0,
        n_column: str | None = None):
    """`fit_report(...)`'s approach-3 law: a `ScalingFit` with `.predict(N, D)`, `.frontier(C)`, `.plot(dir)`."""
    return fit_report(results, out=out, bootstrap=bootstrap, seed=seed, predict=predict, grid=grid,
                      drop_highest_loss=drop_highest_loss, n_column=n_column).law


def load_fit(path: str | Path):
    """A `ScalingFit` from a fit.json written by `fit` / `python -m app fit`."""
    import json

    from app.errors import DataError, FitError
    from app.scaling import ScalingFit

    path = Path(path)
    if path.is_dir():
        path = path / "fit.json"
    if not path.is_file():
        raise DataError(f"fit file {path} does not exist; write one with `python -m app fit RESULTS --out DIR`")
    try:
        obj = json.loads(path.read_text())
        return ScalingFit.from_json(obj)
    except (ValueError, KeyError, TypeError):
        raise FitError(f"{path} is not a fit.json from `python -m app fit` (needs form, params, n_points)") from None


def measured_throughput(summary: str | Path, n_column: str | None = None, *,
                        strict: bool = False) -> tuple[float, float]:
    """(tokens/s per worker, N the throughput was measured at) from a training run's summary.json.

    The planner rescales throughput at constant FLOP/s from this N to N_opt, so N must be counted as the law
    counts N_opt: the summary's `n_column` ("n_params", non-embedding, or "n_params_total", the columns of a sweep
    and of a law fitted on one). Without it (the published law, or a summary older than those keys) N is
    flops_per_token / 6, the model's whole training cost per token (output head and attention included);
    `strict` makes a missing `n_column` an error instead."""
    import json

    from app.errors import DataError

    path = Path(summary)
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise DataError(f"summary {path} does not exist; pass runs/<run>/summary.json of a finished training run")
    s = json.loads(path.read_text())
    try:
        world = int((s.get("world_sizes") or [1])[-1]) or 1
        tokens_per_s, flops_per_token = float(s["tokens_per_s"]), float(s["flops_per_token"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path} lacks tokens_per_s / flops_per_token; is it a training run's summary.json?") from None
    if not tokens_per_s > 0:
        raise DataError(f"{path} reports tokens_per_s={tokens_per_s}; the run trained no steps")
    n = s.get(n_column) if n_column else None
    if not (isinstance(n, (int, float)) and n > 0):
        if strict:
            raise DataError(f"{path} has no {n_column!r} (runs trained before 2026-12-07 lack it); leave n_column "
                            "out to place its tokens/s at flops_per_token / 6")
        n = flops_per_token / 6.0
    return tokens_per_s / world, float(n)


def plan(*, flops: float | None = None, usd: float | None = None, instance: str | None = None, spot: bool = False,
         fit=None, summary: str | Path | None = None, throughput_from: str | Path | None = None,
         n_column: str | None = None, workers: int = 1, preemptions_per_hour: float = 0.0,
         mfu: float = 0.4, save_seconds: float = 60.0, restart_seconds: float = 300.0,
         prices: str | Path | None = None):
    """A compute-optimal run for `flops` (FLOPs) or `usd` (USD on `instance`): N_opt, D_opt, predicted loss,
    wall hours and cost on-demand vs spot with expected goodput and the Young–Daly checkpoint interval.

    `fit`: a ScalingFit or a fit.json path (default: Besiroglu et al.'s refit of Chinchilla). `summary`: a
    training run's summary.json for measured tokens/s (then `instance` must name the machine it ran on);
    `throughput_from`: a sweep's results table instead, whose trials' FLOP/s is interpolated to N_opt. Either is
    placed at the N in `n_column` (default: the column the fit was fitted on; a summary without it, or with the
    published law, at flops_per_token / 6: `measured_throughput`); without either, tokens/s is estimated from
    the instance's peak FLOP/s × `mfu`. With `flops` and no `instance`, the instance type that makes the run
    cheapest is chosen. Returns a `TrainingPlan`."""
    from app import costs
    from app.errors import FitError, PlanError
    from app.scaling import ScalingFit, published_fit
    from pipelines.fit_scaling import read_throughputs

    if (flops is None) == (usd is None):
        raise PlanError("give exactly one budget: --flops C (FLOPs) or --usd X (with --instance)")
    if usd is not None and instance is None:
        raise PlanError("--usd needs --instance TYPE: the budget buys hours of one machine type")
    if summary is not None and throughput_from is not None:
        raise PlanError("give --summary (one run's tokens/s) or --throughput-from (a sweep's), not both")
    for flag, value in (("--summary", summary), ("--throughput-from", throughput_from)):
        if value is not None and instance is None:
            raise PlanError(f"{flag} gives the throughput of one machine type; name it with --instance TYPE")
    law = fit if isinstance(fit, ScalingFit) else load_fit(fit) if fit is not None else published_fit()
    try:
        table = costs.load_prices(prices)
    except ValueError as err:
        raise PlanError(str(err)) from None
    tps, at_params = (measured_throughput(summary, n_column or law.n_column, strict=n_column is not None)
                      if summary is not None else (None, None))
    by_params = (read_throughputs(throughput_from, n_column or law.n_column)
                 if throughput_from is not None else None)

    def one(name: str):
        return costs.plan_training(
            law, instance=name, compute_flops=flops, budget_usd=usd, spot=spot, workers=workers,
            tokens_per_second_per_worker=tps, throughput_measured_at_params=at_params,
            throughput_by_params=by_params, mfu=mfu,
            preemptions_per_hour=preemptions_per_hour, save_seconds=save_seconds, restart_seconds=restart_seconds,
            prices=table)

    try:
        if instance is not None:
            return one(instance)
        return min((one(name) for name in table), key=lambda p: p.cost_usd)
    except FitError:  # the law has no compute-optimal size: a fact about the fit, not about the plan's inputs
        raise
    except ValueError as err:
        raise PlanError(str(err)) from None


def chaos(preset: str | TrainConfig = "tiny", scenario: str = "spot", overrides: Sequence[str] = (), *,
          out: str | Path = "runs/chaos", inject_at_step: int | None = None, notice_s: int = 8,
          rejoin_after_s: float | None = 4.0):
    """Train on a local multi-node Ray cluster, inject `scenario`, compare with an undisturbed run. Returns a
    `ChaosResult` whose report holds recovery_s, lost_steps, duplicated/skipped samples, loss difference,
    goodput and world sizes (also written to chaos.json)."""
    from pipelines import chaos as pipeline

    cfg = preset if isinstance(preset, TrainConfig) else load_config(preset, list(overrides))
    return pipeline.run(cfg, scenario, out=out, inject_at_step=inject_at_step, notice_s=notice_s,
                        rejoin_after_s=rejoin_after_s)


# ---- models: quantize, evaluate, registry --------------------------------------------------------------------


def quantize(model: str | Path, method: str = "int8", *, name: str | None = None, registry: str | None = None,
             data: str | Path | None = None, backend: str = "auto", steps: int = 50, lr: float = 1e-4,
             batch_size: int = 8, batches: int = 8, overwrite: bool = False):
    """Quantize `model` (a registry name or artifact folder) and publish the result in the registry as `name`
    (default PARENT-METHOD). method: "int8" (dynamic activations + int8 weights), "int8-weight-only", "int4"
    (int4 weight-only: torchao's kernel, else torch's own CPU one), "qat" (`steps` of quantization-aware
    fine-tuning on `data`'s training split, then int8). Returns a `QuantizeResult`: fp32 vs quantized size, val loss per domain and
    tokens/s, the backend that ran and the published card."""
    from pipelines import quantize as pipeline

    return pipeline.run(str(model), method, name=name, registry=registry, data=data, backend=backend, steps=steps,
                        lr=lr, batch_size=batch_size, batches=batches, overwrite=overwrite)


def evaluate(model, data: str | Path | None = None, *, domains="all", batches: int = 8,
             registry: str | None = None, compile: bool = False):
    """Validation loss and perplexity per domain (`domains`: "all", "code", "docs" or a list), generation
    tokens/s at batch 1 and 16, and size of `model` (a registry name, an artifact folder or a loaded Artifact) on
    `data` (default: the folder in its card). compile=True decodes through torch.compile
    (`GPT.compile_decoding`). Returns an `EvalResult`."""
    from app.evaluate import evaluate as run_eval

    return run_eval(model, data, domains=domains, batches=batches, registry=registry, compile=compile)


def models(registry: str | None = None):
    """Every model in the registry (default $SCALESTACK_REGISTRY, else runs/registry) as a `ModelList`: `.cards`
    and `.rows()` (name, parameters, bytes, quantization, val loss per domain, tokens/s, created)."""
    from app.registry import ModelList, Registry

    reg = Registry(registry)
    return ModelList(reg.root, reg.list())


# ---- serving -------------------------------------------------------------------------------------------------


def deploy(config=None, *, models=None, host: str | None = None, port: int | None = None,
           num_cpus: int | None = None, wait_s: float = 120.0, ingress: str = "auto",
           start_timeout_s: float | None = 600.0):
    """Serve models behind the router on embedded Ray (or the cluster at RAY_ADDRESS) and return a `ServeClient`
    (`.base_url`, `.complete(prompt, **kw)`, `.chat(messages, **kw)`, `.models()`, `.shutdown()`).

    `config`: a YAML file (serve_deployments/serve_config.yaml or plain ServeArgs fields), a dict or a ServeArgs;
    `models`: {name: artifact folder or registry name} (or NAME=ARTIFACT strings) added on top. HTTP listens on
    `host` (default 127.0.0.1; anything else requires API keys) and `port` (default 8000): HAProxy forwarding to
    the router replicas' own servers (`ingress="haproxy"`: one actor hop fewer than Serve's proxy, balanced over
    replicas), Serve's HTTP proxy (`ingress="proxy"`) or the router replica itself (`ingress="direct"`, one hop
    fewer, one replica per port). Ray started here gets the flags; a running cluster must have them
    (serve_deployments.app.haproxy_env / direct_ingress_env). The default, `"auto"`, is HAProxy on a Ray started
    here and whichever of HAProxy and Serve's proxy a running cluster runs; `client.ingress` says which. Replicas
    still not running after `start_timeout_s` (waiting for resources or an autoscaler; None waits for ever) end it
    with a UserError naming what they wait for, and the application is deleted."""
    import os

    import ray

    from pipelines.ray_session import environ
    from serve_deployments import app as serving

    args = serving.load_serve_args(config, models, host, port)
    serving.check_ingress(ingress)
    serving.check_keys_off_loopback(args)
    application = serving.build_app(args)  # config and artifact mistakes fail here, before Ray starts
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"])
        else:
            # inherited by the raylet and so by every Serve actor; not kept in this process
            with environ(serving.serving_env(args.port, ingress)):
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                         log_to_driver=os.environ.get("SCALESTACK_VERBOSE") == "1")
    try:
        if started and not os.environ.get("RAY_ADDRESS"):  # a cluster's autoscaler may add nodes; this Ray won't
            serving.check_cpus(args, ray.cluster_resources().get("CPU", 0))
        client = serving.start(args, application, wait_s=wait_s, ingress=ingress, start_timeout_s=start_timeout_s)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    client.stop_ray = started
    return client


# ---- the end-to-end demo -------------------------------------------------------------------------------------


def demo(out: str | Path | None = None, *, fast: bool = False, port: int | None = None):
    """The whole pipeline on this machine into `out` (default runs/demo/<timestamp>): both corpora, a teacher
    trained through a spot reclaim, sweep → fit → plan, two distilled specialists quantized to int8, serving through
    each routing policy. `fast=True` is the reduced CI version. Starts and stops Ray itself (call it without Ray
    running). Returns a `DemoResult` (`.report`, `.report_html`, `.report_json`)."""
    from app import demo as pipeline

    return pipeline.run(out, fast=fast, port=port)
