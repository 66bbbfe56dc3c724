"""The end-to-end demo: every stage of scalestack, one after another, on this machine, into one folder.

    python -m app demo [--fast] [--out DIR]        # app.demo.run(out, fast=...) from Python

1. prepare both built-in corpora (stdlib = code, pydoc = docs)
2. train a teacher with 2 workers (DeepSpeed ZeRO-2) on a local two-node Ray cluster while one node is reclaimed
   like a spot instance (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` with a deadline, then removed —
   the chaos harness's `spot` fault); the elastic group checkpoints in time, shrinks, and grows back
3. a small scaling sweep (tune_configs/demo.yaml) with Ray Tune → fit → a compute-optimal plan
4. distil a code and a docs specialist from the teacher and quantize both to int8 (into the demo's registry)
5. serve teacher and specialists behind the router, switch through its routing policies and send the same sample
   requests through each
6. report: tables on stdout, report.json and a self-contained report.html (tables and plots)

Every stage composes the SDK functions (app.sdk) and pipelines the CLI uses; this module only sequences them.
Each stage stops the Ray it used before the next starts one: an embedded Ray for data preparation, the chaos
harness's multi-node cluster for the teacher, and one embedded Ray for the sweep, distillation and serving.
Everything lands under `out` (default runs/demo/<timestamp>): data/, registry/, one folder per training run,
sweep/ (with fit/), loss_curve.png, report.json and report.html.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from app.errors import ConfigError, FitError, UserError
from app.jsonsafe import finite
from pipelines.ray_session import environ, free_port

SWEEP_CONFIG = Path(__file__).resolve().parents[1] / "tune_configs" / "demo.yaml"
DOMAINS = ("code", "docs")
# Fixed sample requests, labelled by the corpus they resemble; each is sent twice per policy (the second time the
# router's exact cache answers), as user-<index> (split and canary are sticky per user).
SAMPLE_PROMPTS: tuple[tuple[str, str], ...] = (
    ("code", "def fibonacci(n):"),
    ("code", "import os\nfor name in sorted(os.listdir(path)):"),
    ("code", "class Stack:\n    def __init__(self):"),
    ("docs", "The import statement finds a module, loads and initialises it"),
    ("docs", "A list comprehension consists of brackets containing an expression"),
    ("docs", "Exceptions are raised when an error is detected during execution"),
)
# Traffic the cascade's thresholds are calibrated on (POST /v1/admin/calibrate) before the samples go through it.
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "def read_config(path):", "while True:\n    line = stream.readline()", "return sorted(items, key=len)",
    "The for statement is used to iterate over the elements of a sequence",
    "Names refer to objects. Names are introduced by name binding operations",
    "The with statement is used to wrap the execution of a block",
)
CASCADE_ESCALATION_TARGET = 0.5
REPORT_SECTIONS = ("Training goodput and throughput", "Spot reclaim", "Scaling fit", "Plan", "Model cards",
                   "Routing mix", "Cache hits", "Latency")


@dataclass(frozen=True)
class DemoSizes:
    """How big each stage is. `FULL` measured 5 min 10 s on 2 CPU cores (goal: 10); `FAST` (CI) about 3.5 min, nearly
    all of it fixed start-up of Ray Train worker groups and Serve replicas."""

    preset: str  # data and teacher preset
    data_overrides: tuple[str, ...]
    teacher_steps: int
    teacher_overrides: tuple[str, ...]
    reclaim_at_step: int  # the drain notice goes out once training passes this step
    notice_s: int  # seconds between the notice and the node's removal
    rejoin_after_s: float | None  # a fresh node joins this long after the removal (None: never)
    sweep_tokens: tuple[int, ...] | None  # None: tune_configs/demo.yaml's budgets
    student: tuple[str, ...]  # specialist shape
    distill_steps: int
    distill_overrides: tuple[str, ...]
    bootstrap: int  # fit intervals
    max_tokens: int  # per sample request


FULL = DemoSizes(
    preset="demo", data_overrides=(), teacher_steps=150,
    teacher_overrides=("eval_every=25", "checkpoint.every_steps=25", "log_every=10"),
    reclaim_at_step=50, notice_s=6, rejoin_after_s=4.0, sweep_tokens=None,
    student=("model.n_layer=2", "model.d_model=64", "model.n_head=4"), distill_steps=60,
    distill_overrides=("eval_every=20", "checkpoint.every_steps=30"), bootstrap=200, max_tokens=16,
)
FAST = DemoSizes(
    preset="tiny", data_overrides=("data.max_documents=120",), teacher_steps=150,
    teacher_overrides=("eval_every=25", "checkpoint.every_steps=25", "log_every=10"),
    reclaim_at_step=20, notice_s=5, rejoin_after_s=4.0, sweep_tokens=(4096, 12288),
    student=("model.n_layer=1", "model.d_model=32", "model.n_head=2"), distill_steps=16,
    distill_overrides=("eval_every=8", "checkpoint.every_steps=8"), bootstrap=50, max_tokens=8,
)


def policies(models: dict[str, str]) -> dict[str, Any]:
    """The router policy trees the demo switches through (serve_deployments/policies.py), given the deployed
    model per role: {"teacher": ..., "code": code specialist, "docs": docs specialist}. The cascades' thresholds
    are calibrated on live traffic before use (CASCADE_ESCALATION_TARGET)."""
    t, c, d = models["teacher"], models["code"], models["docs"]
    domain = {"kind": "domain", "routes": {"code": c, "docs": d}, "default": t}
    return {
        "fixed": t,
        "domain": domain,
        "cascade": {"kind": "domain", "default": t, "routes": {
            "code": {"kind": "cascade", "student": c, "teacher": t, "threshold": -2.0},
            "docs": {"kind": "cascade", "student": d, "teacher": t, "threshold": -2.0}}},
        "split": {"kind": "split", "weights": {t: 1, c: 1, d: 1}},
        "canary": {"kind": "canary", "baseline": t, "canary": c, "percent": 25},
        "bandit": {"kind": "bandit", "models": [t, c, d]},
        "shadow": {"kind": "shadow", "route": domain, "shadow": t},
    }


@dataclass
class DemoResult:
    """A finished demo: the report (also in report.json) and where everything is."""

    out: Path
    report: dict[str, Any]
    report_json: Path
    report_html: Path
    wall_s: float


# --------------------------------------------------------------------------------------------------------------
# Stages


@dataclass
class _Run:
    """The demo in progress: settings, the folder, and the report as it fills up."""

    out: Path
    sizes: DemoSizes
    fast: bool
    port: int
    report: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def registry(self) -> Path:
        return self.out / "registry"

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[dict[str, str]]:
        """A stage header on stderr, then the stage's one-line result (set `line["result"]`) on stdout."""
        from app.console import err_console, out_console

        n = len(self.stages) + 1
        err_console.rule(f"[bold]{n}/5 {title}", align="left")
        line: dict[str, str] = {"result": ""}
        start = time.perf_counter()
        yield line
        seconds = time.perf_counter() - start
        self.stages.append({"stage": title, "seconds": round(seconds, 1), "result": line["result"]})
        out_console.print(f"[green]✓[/green] {title} ({seconds:,.0f} s): {line['result']}", highlight=False)

    def common(self) -> list[str]:
        return [f"storage={self.out}", f"data.dir={self.data_dir}", "data.sources=[stdlib,pydoc]"]


def _prepare(run: _Run) -> None:
    from app import sdk
    from app.console import short_path

    with run.stage("prepare both corpora") as line:
        result = sdk.prepare_data(["stdlib", "pydoc"], run.data_dir, preset=run.sizes.preset,
                                  overrides=list(run.sizes.data_overrides), num_cpus=os.cpu_count() or 2)
        m = result.manifest
        run.report["data"] = {
            "directory": str(m.directory), "vocab_size": m.vocab_size, "tokens_train": m.tokens("train"),
            "tokens_val": m.tokens("val"),
            "domains": {d: {"documents": m.documents("train", d), "tokens": m.tokens("train", d)} for d in m.domains}}
        line["result"] = (f"{m.tokens('train'):,} training tokens ("
                          + ", ".join(f"{d} {m.tokens('train', d):,}" for d in m.domains)
                          + f"), vocab {m.vocab_size} → {short_path(m.directory)}")


def _teacher(run: _Run):
    """Train the teacher with 2 workers (ZeRO-2) through a spot reclaim of one of their nodes."""
    from app.config import load_config
    from app.console import err_console, short_path

    s = run.sizes
    cfg = load_config(s.preset, [*run.common(), *s.data_overrides, *s.teacher_overrides, "name=teacher",
                                 f"steps={s.teacher_steps}", "parallel.workers=1:2", "parallel.zero_stage=2"])
    with run.stage("train the teacher through a spot reclaim") as line:
        # Ray prints the removed node's raylet log ("Raylet is terminated. Termination is unexpected ...") to the
        # driver's stdout: expected here, it is the simulated reclaim, so it goes to a log file instead.
        log = run.out / "logs" / "teacher-driver.log"
        log.parent.mkdir(exist_ok=True)
        err_console.print("local cluster: a head without CPUs + 2 worker nodes; Ray's driver messages → "
                          f"{short_path(log)}")
        with open(log, "w") as sink, contextlib.redirect_stdout(sink):
            result, times = _train_through_reclaim(cfg, s)
        reclaim = _reclaim_report(result, times, s)
        run.report["reclaim"] = reclaim
        line["result"] = (f"loss {result.summary['first_loss']:.2f} → {result.summary['final_loss']:.2f}, "
                          f"world sizes {result.summary['world_sizes']}, {result.summary['restarts']} restart(s), "
                          f"{result.summary['lost_steps']} lost steps, recovery {reclaim['recovery_s']} s, "
                          f"goodput {result.summary['goodput']:.2f}")
    return result


def _train_through_reclaim(cfg, s: DemoSizes):
    """Train `cfg` (an elastic 1:2 group) on the chaos harness's local cluster — a head without CPUs plus one
    node per worker — and reclaim one node like a spot instance once training passes `s.reclaim_at_step`.
    Returns (TrainResult, {"notice": t, "death": t}); the cluster is shut down before it returns."""
    from app.console import err_console
    from pipelines.chaos import local_cluster, train_with_fault  # the harness's own cluster and fault

    err_console.print(f"step {s.reclaim_at_step}: a spot reclaim will drain a worker node "
                      f"(DRAIN_NODE_REASON_PREEMPTION, {s.notice_s} s deadline)")
    with local_cluster(2, cfg.parallel.cpus_per_worker) as cluster:
        result, times = train_with_fault(cfg, "spot", cluster, s.reclaim_at_step, s.notice_s, s.rejoin_after_s)
    if times is None:
        raise UserError(f"the teacher finished before step {s.reclaim_at_step}, where the spot reclaim was due")
    return result, times


def _reclaim_report(result, times: dict[str, float], s: DemoSizes) -> dict[str, Any]:
    """What the reclaim cost (the chaos harness's measures that need no reference run)."""
    from pipelines.chaos import recovery_s

    death, notice = times["death"], times["notice"]
    recovery = recovery_s(result.records, death, notice)
    during = [r for r in result.records if notice <= r["time"] <= death]
    checkpoints = [r["checkpoint"] for r in result.records if r.get("checkpoint")]
    return {
        "notice_at_step": s.reclaim_at_step,
        "notice_s": round(death - notice, 2),
        "steps_during_notice": len(during),
        "checkpoints": {k: checkpoints.count(k) for k in sorted(set(checkpoints))},
        "recovery_s": round(recovery, 1) if recovery is not None else None,
        "resumed_from_steps": [a["start_step"] for a in result.attempts],
        "world_sizes": result.summary["world_sizes"],
        "restarts": result.summary["restarts"],
        "lost_steps": result.summary["lost_steps"],
        "node_rejoined_after_s": s.rejoin_after_s,
    }


def _sweep_fit_plan(run: _Run, teacher) -> None:
    from app import sdk
    from app.sweep_config import load_sweep

    s = run.sizes
    with run.stage("scaling sweep, fit and plan") as line:
        sweep = load_sweep(SWEEP_CONFIG)
        if s.sweep_tokens:
            sweep = sweep.model_copy(update={"grid": sweep.grid.model_copy(update={"tokens": list(s.sweep_tokens)})})
        vocab = run.report["data"]["vocab_size"]
        result = sdk.sweep(sweep, run.out / "sweep", overrides=[f"data.dir={run.data_dir}", f"model.vocab_size={vocab}"])
        if len(result.failed):
            first = result.failed.iloc[0]
            raise UserError(f"{len(result.failed)} sweep trial(s) failed (first: {first['trial']}: {first['error']}); "
                            f"see {result.sweep_dir / 'tune'}")
        compute = float(result.df["compute"].max()) * 1e3  # three orders of magnitude past the largest trial
        ledger = teacher.summary["ledger"]
        saves = sum(1 for r in teacher.records if r.get("checkpoint"))
        # Some bootstrap resamples of six runs overflow; numpy warns, the fit drops them: keep the screen clean.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fit = sdk.fit_report(result.results_parquet, out=result.sweep_dir / "fit", bootstrap=s.bootstrap)
            law = fit.law
            # Priced as the CPU instance closest to this machine, with the teacher's measured tokens/s, its
            # checkpoint time and the recovery time the reclaim just cost.
            try:
                plan = sdk.plan(flops=compute, fit=law, instance="m7i.2xlarge", spot=True,
                                summary=Path(teacher.run_dir) / "summary.json", workers=2, preemptions_per_hour=1.0,
                                save_seconds=max(0.1, ledger["checkpoint_s"] / max(1, saves)),
                                restart_seconds=max(1.0, run.report["reclaim"]["recovery_s"] or 60.0))
            except FitError as err:  # six tiny runs can fit a law with no optimum: say so, and go on
                plan = err
            exps = law.frontier_exponents()
        run.report["sweep"] = {"dir": str(result.sweep_dir), "wall_s": round(result.wall_s, 1),
                               "trials": [dict(zip(("trial", "N", "D", "C", "val_loss", "wall_s", "status"), r))
                                          for r in result.rows()]}
        run.report["fit"] = {
            "n_points": law.n_points, "params": law.params,
            "ci": {k: list(v) for k, v in law.ci.items()}, "ci_level": law.ci_level,
            "a": exps["a"], "b": exps["b"], "files": [str(f) for f in fit.files],
            "kaplan_n": fit.kaplan_n.to_json() if fit.kaplan_n else None, "not_fitted": fit.notes,
            "warnings": law.warnings}
        if isinstance(plan, FitError):
            run.report["plan"] = {"compute_flops": compute, "error": str(plan)}
            planned = f"no plan for {compute:.2g} FLOPs: {plan}"
        else:
            run.report["plan"] = {**plan.to_dict(), "priced_as": "m7i.2xlarge (throughput measured on this machine "
                                                                 "by the teacher run)"}
            planned = (f"plan for {compute:.2g} FLOPs: N_opt {plan.n_params:.3g}, D_opt {plan.n_tokens:.3g}, "
                       f"${plan.cost_usd:,.2f} on spot")
        cautions = len(law.warnings if isinstance(plan, FitError) else plan.warnings)  # the plan's include the fit's
        line["result"] = (f"{len(result.df)} trials in {result.wall_s:.0f} s; L = {law.params['E']:.3g} + "
                          f"{law.params['A']:.3g}/N^{law.params['alpha']:.3g} + {law.params['B']:.3g}/"
                          f"D^{law.params['beta']:.3g}; {planned}"
                          + (f" — not to be trusted: {cautions} warning(s) in the report" if cautions else ""))


def _specialists(run: _Run, teacher) -> dict[str, Any]:
    """A distilled specialist per domain, each quantized to int8; all published in the demo's registry."""
    from app import sdk

    s = run.sizes
    out: dict[str, Any] = {}
    with run.stage("distil two specialists and quantize them") as line:
        for domain in DOMAINS:
            out[domain] = sdk.distill(
                teacher.artifact, s.preset,
                [*run.common(), *s.data_overrides, *s.student, *s.distill_overrides, f"steps={s.distill_steps}",
                 "parallel.workers=2", "parallel.zero_stage=2"],
                domains=[domain], run_name=f"{domain}-specialist")
        quantized = {}
        for domain in DOMAINS:
            quantized[domain] = sdk.quantize(out[domain].artifact, "int8", name=f"{domain}-specialist-int8",
                                             registry=str(run.registry), data=run.data_dir, batches=2)
        run.report["quantized"] = {
            d: {"name": q.name, "backend": q.backend, "bytes_fp32": q.before.bytes, "bytes_int8": q.after.bytes,
                "val_loss_fp32": q.before.val_loss, "val_loss_int8": q.after.val_loss}
            for d, q in quantized.items()}
        line["result"] = "; ".join(
            f"{d}: KL to teacher {r.summary['first_val_kl']:.3f} → {r.summary['final_val_kl']:.3f}, int8 "
            f"{quantized[d].after.bytes / quantized[d].before.bytes:.2f}× the bytes" for d, r in out.items())
    return out


def _serve_and_route(run: _Run) -> None:
    """Deploy teacher + int8 specialists behind the router, then each policy in turn over the sample prompts."""
    import secrets

    from app import sdk
    from app.console import err_console, progress_bar
    from serve_deployments.app import ServeClient

    names = {"teacher": "teacher", "code": "code-int8", "docs": "docs-int8"}
    artifacts = {"teacher": "teacher", "code-int8": "code-specialist-int8", "docs-int8": "docs-specialist-int8"}
    admin_key = secrets.token_hex(16)  # the admin endpoint (policy switches) always needs a key
    config = {
        "models": [{"name": n, "artifact": str(run.registry / a), "max_batch_size": 8,
                    "ray_actor_options": {"num_cpus": 0.5}} for n, a in artifacts.items()],
        "router_ray_actor_options": {"num_cpus": 0.25},
        "router": {"policy": names["teacher"], "guard": {"api_keys": [admin_key], "rate_per_s": 0}},
        "port": run.port,
    }
    table = policies(names)
    with run.stage("serve behind the router and send sample requests") as line:
        with err_console.status(f"starting Ray Serve: {', '.join(artifacts)} and the router"):
            client = sdk.deploy(config)
        try:
            admin = ServeClient(client.base_url, api_key=admin_key)
            for name in artifacts:  # first calls load lazily; keep them out of the latency figures
                client.complete("warm-up", model=name, max_tokens=run.sizes.max_tokens, temperature=0)
            samples: list[dict[str, Any]] = []
            calibration: dict[str, Any] = {}
            total = len(table) * len(SAMPLE_PROMPTS) * 2
            with progress_bar("sample requests", total) as bar:
                for policy, spec in table.items():
                    admin.request("POST", "/v1/admin/policy", {"policy": spec})
                    bar.update(status=policy)
                    if policy == "cascade":
                        calibration = _calibrate(client, admin, run.sizes.max_tokens)
                    for repeat in range(2):
                        for i, (domain, prompt) in enumerate(SAMPLE_PROMPTS):
                            samples.append(_ask(client, policy, domain, prompt, i, repeat, run.sizes.max_tokens,
                                                names, feedback=policy == "bandit"))
                            bar.advance()
                    samples[-1]["policy_state"] = admin.request("GET", "/v1/admin/policy")["state"]
            stats = client.request("GET", "/v1/stats")
        finally:
            client.shutdown()
        run.report["serving"] = {"base_url": client.base_url, "models": artifacts, "policies": table}
        run.report["routing"] = {**_routing_report(samples, table, stats), "cascade_calibration": calibration}
        ok = sum(r["ok"] for r in samples)
        line["result"] = (f"{ok}/{len(samples)} requests answered through {len(table)} policies "
                          f"({', '.join(table)}); {sum(r['cache'] == 'exact' for r in samples)} exact cache hits")


def _calibrate(client, admin, max_tokens: int) -> dict[str, Any]:
    """Send the calibration prompts through the cascade, then set each cascade's threshold so that
    CASCADE_ESCALATION_TARGET of those judged answers would have escalated (POST /v1/admin/calibrate)."""
    for prompt in CALIBRATION_PROMPTS:
        client.complete(prompt, max_tokens=max_tokens, temperature=0, user="calibration")
    out = admin.request("POST", "/v1/admin/calibrate", {"target_escalation_rate": CASCADE_ESCALATION_TARGET})
    return {"prompts": len(CALIBRATION_PROMPTS), **out}


def _ask(client, policy: str, domain: str, prompt: str, index: int, repeat: int, max_tokens: int,
         names: dict[str, str], feedback: bool) -> dict[str, Any]:
    """One greedy completion through the router: who answered, by which route, from the cache or not, how fast.
    For the bandit, feedback rewards the specialist of the prompt's domain (1), the teacher 0.5, the other 0."""
    start = time.perf_counter()
    try:
        body = client.complete(prompt, max_tokens=max_tokens, temperature=0, user=f"user-{index}")
    except UserError as err:
        return {"policy": policy, "domain": domain, "prompt": index, "repeat": repeat, "ok": False,
                "error": str(err), "model": None, "route": None, "cache": None, "escalated": False,
                "latency_s": time.perf_counter() - start}
    latency = time.perf_counter() - start
    meta = body["scalestack"]
    if feedback and meta["cache"] != "exact":
        reward = 1.0 if meta["model"] == names[domain] else 0.5 if meta["model"] == names["teacher"] else 0.0
        client.request("POST", "/v1/feedback", {"id": body["id"], "reward": reward})
    return {"policy": policy, "domain": domain, "prompt": index, "repeat": repeat, "ok": True,
            "model": meta["model"], "route": meta["route"], "cache": meta["cache"], "escalated": meta["escalated"],
            "latency_s": latency, "text": body["choices"][0]["text"]}


def _percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def _routing_report(samples: list[dict], table: dict[str, Any], stats: dict) -> dict[str, Any]:
    per_policy = {}
    for policy in table:
        rows = [r for r in samples if r["policy"] == policy]
        misses = [r for r in rows if r["ok"] and r["cache"] != "exact"]
        hits = [r for r in rows if r["ok"] and r["cache"] == "exact"]
        by_model: dict[str, int] = {}
        for r in misses:
            by_model[r["model"]] = by_model.get(r["model"], 0) + 1
        per_policy[policy] = {
            "requests": len(rows), "answered": sum(r["ok"] for r in rows), "answered_by": by_model,
            "escalations": sum(r["escalated"] for r in misses),
            "cache_hits": len(hits), "cache_hit_rate": round(len(hits) / len(rows), 3) if rows else 0.0,
            "latency_ms": {"all_p50": _percentile([r["latency_s"] for r in rows if r["ok"]], 50),
                           "all_p95": _percentile([r["latency_s"] for r in rows if r["ok"]], 95),
                           "miss_p50": _percentile([r["latency_s"] for r in misses], 50),
                           "miss_p95": _percentile([r["latency_s"] for r in misses], 95),
                           "hit_p50": _percentile([r["latency_s"] for r in hits], 50),
                           "hit_p95": _percentile([r["latency_s"] for r in hits], 95)},
            "state": next((r.get("policy_state") for r in reversed(rows) if "policy_state" in r), {}),
        }
    return {"policies": per_policy, "router_stats": stats,
            "samples": [{k: v for k, v in r.items() if k != "policy_state"} for r in samples]}


# --------------------------------------------------------------------------------------------------------------
# The report


def _training_rows(runs: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for role, r in runs.items():
        s = r.summary
        rows.append({"run": s["run"], "role": role, "world_sizes": s["world_sizes"], "zero_stage": s["zero_stage"],
                     "steps": s["steps"], "tokens": s["tokens"], "tokens_per_s": s["tokens_per_s"], "mfu": s["mfu"],
                     "goodput": s["goodput"], "restarts": s["restarts"], "lost_steps": s["lost_steps"],
                     "wall_s": s["wall_s"], "first_loss": s["first_loss"], "final_loss": s["final_loss"],
                     "final_val_loss": s["final_val_loss"], "first_val_kl": s.get("first_val_kl"),
                     "final_val_kl": s.get("final_val_kl"),
                     "ledger": s["ledger"]})
    return rows


def _loss_plot(runs: dict[str, Any], reclaim: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    teacher = runs["teacher"].history
    ax = axes[0]
    ax.plot(teacher["step"], teacher["loss"], label="train loss", lw=1.2)
    val = teacher.dropna(subset=["val_loss"])
    ax.plot(val["step"], val["val_loss"], "o-", label="validation loss", ms=4)
    ax.axvline(reclaim["notice_at_step"], color="tab:red", ls="--", lw=1, label="spot reclaim notice")
    for step in reclaim["resumed_from_steps"][1:]:
        ax.axvline(step, color="tab:green", ls=":", lw=1.2, label=f"resumed at step {step}")
    ax.set(title=f"teacher (world sizes {reclaim['world_sizes']})", xlabel="optimizer step", ylabel="loss (nats/token)")
    ax.legend(fontsize=8)
    ax, kl_ax = axes[1], axes[1].twinx()
    for i, (role, r) in enumerate((role, r) for role, r in runs.items() if role != "teacher"):
        color = f"C{i}"
        ax.plot(r.history["step"], r.history["loss"], color=color, lw=1.2, label=f"{role}: train loss")
        if "val_kl" in r.history:
            kl = r.history.dropna(subset=["val_kl"])
            kl_ax.plot(kl["step"], kl["val_kl"], "o--", color=color, ms=4, label=f"{role}: val KL to teacher")
    ax.set(title="distilled specialists", xlabel="optimizer step", ylabel="train loss (1-α)·CE + α·T²·KL")
    kl_ax.set_ylabel("validation KL to the teacher (nats/token)")
    lines = ax.get_legend_handles_labels()
    kl_lines = kl_ax.get_legend_handles_labels()
    ax.legend(lines[0] + kl_lines[0], lines[1] + kl_lines[1], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[tuple]]]:
    """The report as (section title, columns, rows), in order: printed as rich tables, written as HTML tables."""
    out = []
    train = report["training"]
    out.append(("Training goodput and throughput",
                ["run", "world sizes", "steps", "tokens", "tokens/s", "MFU", "goodput", "restarts", "lost steps",
                 "first loss", "final loss", "val loss", "wall s"],
                [(r["run"], json.dumps(r["world_sizes"]), r["steps"], r["tokens"], r["tokens_per_s"], r["mfu"],
                  r["goodput"], r["restarts"], r["lost_steps"], round(r["first_loss"], 3), round(r["final_loss"], 3),
                  round(r["final_val_loss"], 3) if r["final_val_loss"] is not None else "", r["wall_s"])
                 for r in train]))
    ledger = train[0]["ledger"]
    rc = report["reclaim"]
    out.append(("Spot reclaim",
                ["measure", "value"],
                [("notice at step", rc["notice_at_step"]), ("notice → node removed (s)", rc["notice_s"]),
                 ("steps trained during the notice", rc["steps_during_notice"]),
                 ("checkpoints by kind", ", ".join(f"{k} {v}" for k, v in rc["checkpoints"].items())),
                 ("recovery: training stopped → first step of the new group (s)", rc["recovery_s"]),
                 ("resumed from steps", json.dumps(rc["resumed_from_steps"])),
                 ("world sizes", json.dumps(rc["world_sizes"])), ("restarts", rc["restarts"]),
                 ("lost steps", rc["lost_steps"]),
                 ("teacher time: productive / checkpoint / restore / startup / lost (s)",
                  " / ".join(f"{ledger.get(k + '_s', 0):.1f}" for k in ("productive", "checkpoint", "restore",
                                                                          "startup", "lost")))]))
    fit = report["fit"]
    level = f"{fit['ci_level']:.0%}"
    out.append((f"Scaling fit: L(N, D) = E + A/N^alpha + B/D^beta over {fit['n_points']} sweep runs",
                ["parameter", "estimate", f"{level} interval"],
                [(k, v, _interval(fit["ci"].get(k))) for k, v in fit["params"].items()]
                + [("a (N_opt ∝ C^a)", fit["a"], ""), ("b (D_opt ∝ C^b)", fit["b"], "")]))
    p = report["plan"]
    if "error" in p:
        out.append((f"Plan: {p['compute_flops']:.3g} FLOPs", ["field", "value"], [("no plan", p["error"])]))
    else:
        both = [("N_opt (parameters)", "n_params"), ("D_opt (tokens)", "n_tokens"), ("predicted loss", "loss"),
                ("tokens/s per worker", "tokens_per_second_per_worker")]
        priced = [("checkpoint every (s)", "checkpoint_interval_s"), ("goodput", "goodput"),
                  ("wall hours", "wall_hours"), ("USD", "cost_usd")]
        out.append((f"Plan: {p['compute_flops']:.3g} FLOPs on {p['instance']} × {p['instances']} "
                    f"({p['workers']} workers)", ["field", "on-demand", "spot"],
                    [(label, p[k], p[k]) for label, k in both]
                    + [(label, p["on_demand"][k], p["spot"][k]) for label, k in priced]))
    cautions = [("fit", w) for w in fit.get("warnings", [])] + [
        ("plan", w) for w in p.get("warnings", []) if w not in fit.get("warnings", [])]
    if cautions:  # what the fit's and the planner's diagnostics say about trusting them (app/scaling.py)
        out.append(("Warnings about the fit and the plan", ["from", "warning"], cautions))
    models = report["models"]
    out.append(("Model cards", models["columns"], [tuple(r) for r in models["rows"]]))
    routing = report["routing"]["policies"]
    answerers = sorted({m for r in routing.values() for m in r["answered_by"]})
    thresholds = (report["routing"].get("cascade_calibration") or {}).get("thresholds", {})
    label = {"cascade": "cascade (threshold " + ", ".join(f"{v:.2f}" for v in thresholds.values()) + ")"} \
        if thresholds else {}
    out.append(("Routing mix (model that answered each cache miss)",
                ["policy", "answered", *answerers, "escalations"],
                [(label.get(name, name), f"{r['answered']}/{r['requests']}",
                  *(r["answered_by"].get(m, 0) for m in answerers), r["escalations"]) for name, r in routing.items()]))
    stats = report["routing"]["router_stats"].get("cache_exact", {})
    out.append((f"Cache hits (router's exact cache: {stats.get('hits', 0)} hits, {stats.get('misses', 0)} misses)",
                ["policy", "requests", "exact hits", "hit rate"],
                [(name, r["requests"], r["cache_hits"], r["cache_hit_rate"]) for name, r in routing.items()]))
    out.append(("Latency (ms, measured by the client over HTTP on 127.0.0.1)",
                ["policy", "p50", "p95", "miss p50", "miss p95", "hit p50", "hit p95"],
                [(name, *(r["latency_ms"][k] for k in ("all_p50", "all_p95", "miss_p50", "miss_p95", "hit_p50",
                                                        "hit_p95"))) for name, r in routing.items()]))
    out.append(("Stages", ["stage", "seconds", "result"],
                [(s["stage"], s["seconds"], s["result"]) for s in report["stages"]]))
    return out


def _interval(ci) -> str:
    if not ci or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return ""
    return f"[{ci[0]:,.4g}, {ci[1]:,.4g}]"


def print_report(report: dict[str, Any]) -> None:
    from app.console import print_table

    for title, columns, rows in tables(report):
        print_table(title, columns, rows)


def _html(report: dict[str, Any], images: dict[str, Path]) -> str:
    from html import escape

    from app.console import html_table

    parts = [f"<h1>scalestack demo{' (--fast)' if report['fast'] else ''}</h1>",
             f"<p>{escape(report['date'])} · {escape(report['machine']['cpu'])}, {report['machine']['cpu_count']} "
             f"CPUs · {report['wall_s']:,.0f} s in all · {escape(report['out'])}</p>"]
    for title, columns, rows in tables(report):
        parts.append(f"<h2>{escape(title)}</h2>")
        parts.append(html_table(columns, rows))
        if title.startswith("Training goodput"):
            parts.append(_img(images.get("loss_curve"), "training loss"))
        if title.startswith("Scaling fit"):
            for name in ("loss_vs_compute", "isoflop", "residuals"):
                parts.append(_img(images.get(name), name))
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%;display:block;margin:.5em 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>scalestack demo</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img alt='{alt}' src='data:image/png;base64,{data}'>"


# --------------------------------------------------------------------------------------------------------------
# Entry point


def default_out() -> Path:
    return Path("runs/demo") / time.strftime("%Y%m%d-%H%M%S")


def _check_out(out: Path) -> Path:
    """A new or empty, writable folder; one error line naming the fix otherwise."""
    out = out.expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: already exists and is not an empty folder; pass a new folder "
                          "(the default runs/demo/<timestamp> is always new)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write there ({err.strerror or err}); pass a writable folder") from None
    return out.resolve()


@contextlib.contextmanager
def _own_registry() -> Iterator[None]:
    """Training publishes to $SCALESTACK_REGISTRY when set; the demo's models belong in the demo's folder."""
    from app.registry import ROOT_ENV

    saved = os.environ.pop(ROOT_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[ROOT_ENV] = saved


def run(out: str | Path | None = None, *, fast: bool = False, port: int | None = None) -> DemoResult:
    """Run the whole demo into `out` (default runs/demo/<timestamp>; must be new or empty). Returns a
    `DemoResult`; the report is also written to out/report.json and out/report.html."""
    import ray

    from app import sdk
    from app.registry import machine
    from serve_deployments.app import serving_env

    if os.environ.get("RAY_ADDRESS"):
        raise ConfigError("the demo runs on embedded Ray and a local cluster it starts itself; unset RAY_ADDRESS "
                          f"(it is {os.environ['RAY_ADDRESS']})")
    if ray.is_initialized():
        raise ConfigError("the demo starts and stops Ray itself; call it from a process without Ray "
                          "(ray.shutdown() first)")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--port {port}: pick a port in 1..65535")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t_start = time.perf_counter()
    demo = _Run(_check_out(Path(out) if out is not None else default_out()), FAST if fast else FULL, fast,
                port or free_port())
    with _own_registry():
        _prepare(demo)
        teacher = _teacher(demo)
        with environ(serving_env(demo.port, "auto")):  # the Ray it serves on, as `python -m app serve` starts one
            ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False,
                     log_to_driver=os.environ.get("SCALESTACK_VERBOSE") == "1")
        try:
            _sweep_fit_plan(demo, teacher)
            specialists = _specialists(demo, teacher)
            _serve_and_route(demo)
        finally:
            ray.shutdown()
        runs = {"teacher": teacher, **{f"{d} specialist": r for d, r in specialists.items()}}
        models = sdk.models(str(demo.registry))
    report = demo.report
    report.update({
        "fast": fast, "out": str(demo.out), "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
        "training": _training_rows(runs),
        "models": {"registry": str(demo.registry), "columns": models.columns(), "rows": models.rows(),
                   "cards": models.cards},
        "stages": demo.stages,
    })
    images = {"loss_curve": _loss_plot(runs, report["reclaim"], demo.out / "loss_curve.png")}
    images.update({Path(f).stem: Path(f) for f in report["fit"]["files"] if str(f).endswith(".png")})
    report["images"] = {k: str(v) for k, v in images.items()}
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    report_json, report_html = demo.out / "report.json", demo.out / "report.html"
    report_json.write_text(json.dumps(finite(report), indent=2, default=_json_default))
    report_html.write_text(_html(report, images))
    return DemoResult(demo.out, report, report_json, report_html, report["wall_s"])


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
