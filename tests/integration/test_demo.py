"""The end-to-end demo, reduced (`python -m app demo --fast`): every stage runs and every report section holds
plausible figures.

The demo starts and stops Ray itself (an embedded Ray, then the chaos harness's local cluster, then embedded Ray
again), so it runs in a subprocess: the session's `ray_local` fixture stays untouched.
"""

import json
import math

import pytest

from app.demo import REPORT_SECTIONS, SAMPLE_PROMPTS, policies
from tests.conftest import run_cli

POLICIES = list(policies({"teacher": "t", "code": "c", "docs": "d"}))


def _strict(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"report.json holds {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "args,env,code,match",
    [
        (["--fsat"], {}, 2, "unrecognized arguments: --fsat"),
        (["--out", "README.md"], {}, 1, "--out README.md: already exists and is not an empty folder; pass a new folder"),
        (["--out", "/proc/scalestack-demo"], {}, 1, "cannot write there"),
        (["--port", "70000"], {}, 1, "--port 70000: pick a port in 1..65535"),
        ([], {"RAY_ADDRESS": "127.0.0.1:6379"}, 1, "unset RAY_ADDRESS"),
    ],
)
def test_demo_mistakes_are_one_line_before_anything_starts(args, env, code, match):
    proc = run_cli("demo", *args, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and match in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = run_cli("demo", "--fast", "--out", str(out), timeout=850)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "stdout": proc.stdout, "report": _strict((out / "report.json").read_text()),
            "html": (out / "report.html").read_text()}


@pytest.mark.slow
def test_every_section_is_printed_and_written(demo):
    for section in REPORT_SECTIONS:
        assert section in demo["stdout"], section
        assert f"<h2>{section}" in demo["html"], section
    assert demo["html"].count("data:image/png;base64,") >= 2  # the loss curves and at least one fit plot
    for name in ("loss_curve.png", "report.json", "registry", "sweep/fit/fit.json", "teacher/summary.json"):
        assert (demo["out"] / name).exists(), name
    assert [s["stage"] for s in demo["report"]["stages"]][0] == "prepare both corpora"
    assert len(demo["report"]["stages"]) == 5


@pytest.mark.slow
def test_teacher_survives_the_spot_reclaim(demo):
    teacher = next(r for r in demo["report"]["training"] if r["role"] == "teacher")
    assert teacher["final_loss"] < teacher["first_loss"] - 0.3, teacher
    assert teacher["zero_stage"] == 2 and teacher["world_sizes"][0] == 2
    assert teacher["restarts"] >= 1 and teacher["lost_steps"] == 0
    assert 0 < teacher["goodput"] < 1 and teacher["tokens_per_s"] > 0
    rc = demo["report"]["reclaim"]
    assert rc["recovery_s"] is not None and rc["recovery_s"] > 0
    # the notice was acted on before the node went: a checkpoint on the notice and one right before the deadline,
    # or, when Ray's poll delivered the notice too late for two, the one before the deadline alone
    assert rc["checkpoints"].get("just-in-time", 0) + rc["checkpoints"].get("final-before-deadline", 0) >= 1
    assert rc["resumed_from_steps"][0] == 0 and rc["resumed_from_steps"][-1] > rc["notice_at_step"]


@pytest.mark.slow
def test_fit_and_plan_are_finite(demo):
    fit, plan = demo["report"]["fit"], demo["report"]["plan"]
    assert fit["n_points"] == 6 and len(demo["report"]["sweep"]["trials"]) == 6
    assert set(fit["params"]) == {"E", "A", "B", "alpha", "beta"}
    assert all(math.isfinite(v) for v in fit["params"].values()), fit["params"]
    assert math.isclose(fit["a"] + fit["b"], 1.0, abs_tol=1e-6)
    if fit["params"]["alpha"] > 0 and fit["params"]["beta"] > 0:
        assert plan["n_params"] > 0 and plan["n_tokens"] > 0 and math.isfinite(plan["loss"])
        assert 0 < plan["spot"]["cost_usd"] < plan["on_demand"]["cost_usd"]
        # 1,000x past the largest trial: the plan says so, besides whatever the fit's own diagnostics say
        assert any("1,000x the largest fitted run's compute" in w for w in plan["warnings"]), plan["warnings"]
        assert "not to be trusted" in demo["stdout"]
    else:  # six tiny runs can fit a law whose loss grows with N or D: no optimum, and the report says why
        assert "no compute-optimal size" in plan["error"] and "no plan" in demo["stdout"], plan
    # six runs for five parameters: the demo's fit always carries that warning, in report.json and report.html
    assert any(w.startswith("6 runs for 5 parameters") for w in fit["warnings"]), fit["warnings"]
    assert "6 runs for 5 parameters" in demo["html"]


@pytest.mark.slow
def test_specialists_are_distilled_and_quantized(demo):
    r = demo["report"]
    for domain in ("code", "docs"):
        run = next(t for t in r["training"] if t["role"] == f"{domain} specialist")
        assert run["final_val_kl"] < run["first_val_kl"], run  # the student moved towards its teacher
        assert run["final_loss"] < run["first_loss"], run
        q = r["quantized"][domain]
        assert q["bytes_int8"] < q["bytes_fp32"]
        assert abs(q["val_loss_int8"][domain] - q["val_loss_fp32"][domain]) < 0.05 * q["val_loss_fp32"][domain]
    cards = {row[0] for row in r["models"]["rows"]}
    assert cards == {"teacher", "code-specialist", "docs-specialist", "code-specialist-int8", "docs-specialist-int8"}


@pytest.mark.slow
def test_each_policy_answers_every_sample_request(demo):
    routing = demo["report"]["routing"]["policies"]
    assert list(routing) == POLICIES
    n = 2 * len(SAMPLE_PROMPTS)
    for name, p in routing.items():
        assert p["requests"] == p["answered"] == n, (name, p)
        assert sum(p["answered_by"].values()) + p["cache_hits"] == n, (name, p)
        assert p["cache_hits"] == len(SAMPLE_PROMPTS), (name, p)  # the second pass comes from the exact cache
        lat = p["latency_ms"]
        assert 0 < lat["hit_p50"] < lat["miss_p50"] and lat["all_p50"] <= lat["all_p95"], (name, lat)
    assert routing["fixed"]["answered_by"] == {"teacher": len(SAMPLE_PROMPTS)}
    assert routing["domain"]["answered_by"] == {"code-int8": 3, "docs-int8": 3}  # the classifier gets all six right
    assert routing["cascade"]["escalations"] == routing["cascade"]["answered_by"].get("teacher", 0)
    stats = demo["report"]["routing"]["router_stats"]["cache_exact"]
    assert stats["hits"] == len(POLICIES) * len(SAMPLE_PROMPTS)
