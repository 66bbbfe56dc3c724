"""Compression: one teacher → a student trained without and with distillation, per-domain specialists, and int8 /
int4 versions — quality, size and speed of every model measured side by side in one run.

    python benchmarks/compress.py                                    # teacher = the small preset (hours on 2 cores)
    python benchmarks/compress.py --teacher-preset demo --steps 300  # what the README reports for this machine

Every model trains with the project's own trainer (Ray Train + DeepSpeed, `--workers` workers, ZeRO-2) on the
teacher preset's data; the student gets the teacher's data, steps and global batch, so (a) and (b) see the same
tokens. Each specialist is distilled on one domain's data starting from the distilled student (`init_from`); the
same shape distilled on that domain from scratch, in as many steps, is measured beside it (unless
--no-scratch-specialists). Trained models are kept under --out and reused when the script runs again (they are
deterministic); the measurements at the end are always taken afresh, all in this process: validation loss per domain on the same
windows, quality retention exp(L_teacher − L_model), and KV-cached greedy decoding tokens/s at batch 1 and 16
(--speed-rounds interleaved rounds over all models, the best round of each kept).
Speed depends on shapes, not on what the weights learned, so the speed goals are also measured at the shapes of
--speed-preset (default `small`: its teacher, its student and the int8 student, random weights) when the teacher
preset trained here is smaller. Prints a table and the goals, and writes benchmarks/results/compress.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

GOALS = {
    "distillation beats the same student without it (val loss, every domain)": None,
    "specialist keeps >= 95% of the teacher's quality on its own domain": 0.95,
    "int8 raises the student's loss by <= 2% relative": 0.02,
    "int8 student >= 1.5x the fp32 student in tokens/s (batch 1 and 16)": 1.5,
    "int8 student >= 3x the fp32 teacher in tokens/s (batch 1 and 16)": 3.0,
}


def _student_shape(teacher) -> list[str]:
    """Half the layers, half the width, half the heads: ~1/8 of the teacher's non-embedding parameters."""
    m = teacher.model
    heads = max(1, m.n_head // 2)
    width = max(heads, (m.d_model // 2) // heads * heads)
    return [f"model.n_layer={max(1, m.n_layer // 2)}", f"model.d_model={width}", f"model.n_head={heads}"]


def fastest(speeds: dict[str, dict[str, float]], names) -> tuple[str, dict[str, float]]:
    """The fastest of `names` (those measured) by its worst batch, with its tokens/s per batch."""
    name = max((n for n in names if n in speeds), key=lambda n: min(speeds[n].values()))
    return name, speeds[name]


def speed_ratio(fast: dict[str, float], slow: dict[str, float]) -> float:
    """Worst-batch ratio of two {batch: tokens/s}: what a goal asking "x times at batch 1 and 16" compares."""
    return min(fast[b] / slow[b] for b in slow)


def _interleaved_speeds(models: dict, rounds: int, label: str) -> dict[str, dict[str, float]]:
    """Best tokens/s of each model at each decoding batch over `rounds` rounds, every model once per round (a
    noisy neighbour slows one round of every model rather than every round of one)."""
    from app.console import progress_bar
    from app.evaluate import SPEED_BATCHES, tokens_per_second

    best = {name: {str(b): 0.0 for b in SPEED_BATCHES} for name in models}
    with progress_bar(label, rounds * len(models) * len(SPEED_BATCHES)) as bar:
        for _ in range(rounds):
            for name, model in models.items():
                for b in SPEED_BATCHES:
                    bar.update(status=f"{name} batch {b}")
                    best[name][str(b)] = max(best[name][str(b)], tokens_per_second(model, b))
                    bar.advance()
    return best


def _speed_at_shape(preset: str, rounds: int, compiled: bool) -> dict[str, dict]:
    """Decoding speed of the preset's teacher shape, its student shape and the int8 student, with random weights:
    speed depends on shapes, not on what the weights learned, so this measures the speed goals at a scale this
    machine cannot train in a benchmark run. compiled: also each through GPT.compile_decoding (int8 on torchao's
    weights, whose activation quantization inductor fuses around the int8 matmuls)."""
    import copy

    import torch

    from app.config import load_config
    from app.errors import UserError
    from app.model import GPT
    from app.quantize import quantize

    teacher_cfg = load_config(preset)
    torch.manual_seed(0)
    teacher = GPT(teacher_cfg.model).eval()
    student = GPT(load_config(preset, _student_shape(teacher_cfg)).model).eval()
    student_int8, _ = quantize(student, "int8")
    models = {"teacher": teacher, "student": student, "student int8": student_int8.eval()}
    try:
        models["student int4"] = quantize(student, "int4")[0].eval()
    except UserError:  # no int4 kernel at all here: the main table says why
        pass
    if compiled:  # copies (they decode eagerly) compiled for decoding
        models["teacher (compiled)"] = copy.deepcopy(teacher).compile_decoding()
        models["student (compiled)"] = copy.deepcopy(student).compile_decoding()
        models["student int8 torchao (compiled)"] = quantize(student, "int8", "torchao")[0].compile_decoding()
    speeds = _interleaved_speeds(models, rounds, f"tokens/s at {preset} shapes")
    params = {"teacher": teacher.num_params(non_embedding=False), "student": student.num_params(non_embedding=False)}
    params["teacher (compiled)"] = params["teacher"]
    for name in models:  # the student's weights, quantized (no longer nn.Parameters) or compiled
        params.setdefault(name, params["student"])
    return {name: {"parameters": params[name], "tokens_per_s": speeds[name]} for name in models}


def _trained(storage: Path, cfg, make) -> str:
    """The artifact of run `cfg.name`, training it with `make(cfg)` first unless a finished run with the same settings
    (config hash) already left one. A finished run with other settings (another --steps, say) is refused rather
    than reported under the new ones."""
    from app.errors import UserError

    artifact = storage / cfg.name / "artifact"
    card = artifact / "model_card.json"
    if card.is_file() and (storage / cfg.name / "summary.json").is_file():
        if json.loads(card.read_text()).get("config_hash") != cfg.config_hash():
            raise UserError(f"{storage / cfg.name} was trained with other settings than this benchmark run asks for; "
                            "pass --out NEW_FOLDER, or delete that run folder to retrain it")
        print(f"reusing {artifact}")
        return str(artifact)
    return make(cfg).artifact


def main(argv=None) -> int:
    import torch

    from app import sdk
    from app.config import load_config
    from app.data import load_tokens, read_manifest
    from app.errors import UserError
    from app.evaluate import SPEED_BATCHES, evaluate, val_loss
    from app.model import GPT
    from app.registry import Registry, load_artifact, machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-preset", default="small")
    ap.add_argument("--steps", type=int, help="optimizer steps of every run (default: the teacher preset's)")
    ap.add_argument("--student", nargs="*", help="student overrides (default: half layers, width and heads)")
    ap.add_argument("--specialist-steps", type=int,
                    help="optimizer steps of each specialist's one-domain distillation (default: --steps)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--workers", default="2")
    ap.add_argument("--eval-batches", type=int, default=16, help="validation batches of 8 windows per domain")
    ap.add_argument("--speed-rounds", type=int, default=5, help="interleaved tokens/s rounds (best one kept)")
    ap.add_argument("--speed-preset", default="small",
                    help="also time teacher/student/int8-student shapes of this preset with random weights "
                         "('' to skip)")
    ap.add_argument("--no-compiled", dest="compiled", action="store_false",
                    help="skip the torch.compile'd decoding rows (GPT.compile_decoding; they add minutes of compiling)")
    ap.add_argument("--no-scratch-specialists", dest="scratch", action="store_false",
                    help="skip the specialists distilled from scratch (the rows the specialists are compared with; "
                         "half the specialist training)")
    ap.add_argument("--out", default="runs/bench-compress")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    storage, registry = out / "runs", Registry(str(out / "registry"))
    teacher_cfg = load_config(args.teacher_preset)
    steps = args.steps or teacher_cfg.steps
    common = [f"storage={storage}", f"steps={steps}", f"parallel.workers={args.workers}", "parallel.zero_stage=2",
              f"eval_every={max(1, steps // 4)}", f"checkpoint.every_steps={max(1, steps // 4)}"]
    student = args.student or _student_shape(teacher_cfg)
    data_dir = Path(teacher_cfg.data.dir).resolve()
    t_start = time.perf_counter()

    # ---- train ------------------------------------------------------------------------------------------------
    def config(*overrides: str):
        return load_config(args.teacher_preset, [*common, *overrides])

    def distilled(teacher_path: str, *overrides: str):
        return config(*overrides, f"distill.teacher={teacher_path}", f"distill.alpha={args.alpha}",
                      f"distill.temperature={args.temperature}")

    teacher = _trained(storage, config("name=teacher"), sdk.train)
    plain = _trained(storage, config(*student, "name=student-plain"), sdk.train)
    kd = _trained(storage, distilled(teacher, *student, "name=student-kd"), lambda cfg: sdk.distill(teacher, cfg))
    domains = read_manifest(data_dir).domains
    # A specialist is distilled on one domain, starting from the distilled general student (init_from); the same
    # student shape distilled on that domain from scratch, in the same steps, is the row it has to beat.
    spec = [*student, f"steps={args.specialist_steps or steps}"]
    scratch = {d: _trained(storage, distilled(teacher, *spec, f"data.domains=[{d}]", f"name=specialist-{d}"),
                           lambda cfg: sdk.distill(teacher, cfg)) for d in domains if args.scratch}
    specialists = {d: _trained(storage, distilled(teacher, *spec, f"data.domains=[{d}]", f"init_from={kd}",
                                                  f"name=specialist-{d}-from-kd"),
                               lambda cfg: sdk.distill(teacher, cfg)) for d in domains}
    models = {"teacher": teacher, "student (no KD)": plain, "student (KD)": kd,
              **{f"specialist {d}": path for d, path in specialists.items()},
              **{f"specialist {d} (scratch)": path for d, path in scratch.items()}}
    for label, path in models.items():
        registry.publish(label.replace(" ", "-").replace("(", "").replace(")", ""), path, overwrite=True)

    # ---- quantize the distilled student -------------------------------------------------------------------------
    unsupported, backends = {}, {}
    for method, backend, label in (("int8", "auto", "int8"), ("int4", "auto", "int4"),
                                   ("int8", "torchao", "int8 torchao")):
        name = f"student-kd-{label.replace(' ', '-')}"
        try:
            q = sdk.quantize(kd, method, name=name, registry=registry.root, data=data_dir, backend=backend,
                             overwrite=True)
            models[f"student (KD) {label}"] = registry.path(name)
            backends[label] = q.backend
            del q
        except UserError as err:
            unsupported[label] = str(err)
            print(f"{label}: {err}")
    train_s = time.perf_counter() - t_start

    # ---- measure, all in this process -----------------------------------------------------------------------------
    torch.set_num_threads(os.cpu_count() or 1)
    rows, loaded = {}, {}
    for label, path in models.items():
        artifact = load_artifact(path)
        r = evaluate(artifact, data_dir, batches=args.eval_batches, speed=False)
        loaded[label] = artifact.model.eval()
        rows[label] = {"parameters": r.parameters, "bytes": r.bytes, "quantization": r.quantization,
                       "val_loss": r.val_loss, "tokens_per_s": {str(b): 0.0 for b in SPEED_BATCHES}}
    for label, best in _interleaved_speeds(loaded, args.speed_rounds, "tokens/s rounds").items():
        rows[label]["tokens_per_s"] = best
    compiled_rows = {}
    if args.compiled:
        trio = {k: load_artifact(models[k]).model.eval().compile_decoding()
                for k in ("teacher", "student (KD)", "student (KD) int8 torchao") if k in models}
        compiled_rows = _interleaved_speeds(trio, args.speed_rounds, "compiled tokens/s rounds")
    shape_rows = _speed_at_shape(args.speed_preset, args.speed_rounds, args.compiled) if args.speed_preset else {}
    t = rows["teacher"]
    for row in rows.values():
        row["retention"] = {d: math.exp(t["val_loss"][d] - row["val_loss"][d]) for d in domains}
    student_params = GPT(load_config(args.teacher_preset, student).model).num_params(non_embedding=False)

    # ---- report -----------------------------------------------------------------------------------------------
    from app.console import print_table

    header = ["model", "params", "MB", *[f"loss {d}" for d in domains], *[f"retain {d}" for d in domains],
              "tok/s b1", "tok/s b16"]
    table = [[label, f"{r['parameters']:,}", f"{(r['bytes'] or 0) / 2**20:.2f}",
              *[f"{r['val_loss'][d]:.4f}" for d in domains], *[f"{r['retention'][d]:.1%}" for d in domains],
              f"{r['tokens_per_s']['1']:,.0f}", f"{r['tokens_per_s']['16']:,.0f}"] for label, r in rows.items()]
    print_table(f"compression: teacher preset {args.teacher_preset}, {steps} steps per run", header, table)

    kd_r, plain_r = rows["student (KD)"], rows["student (no KD)"]
    checks = {}
    checks[list(GOALS)[0]] = all(kd_r["val_loss"][d] < plain_r["val_loss"][d] for d in domains)
    checks[list(GOALS)[1]] = all(rows[f"specialist {d}"]["retention"][d] >= 0.95 for d in domains)
    if compiled_rows:
        print_table("compiled decoding (GPT.compile_decoding), same run", ["model", "tok/s b1", "tok/s b16",
                                                                           "x eager b1", "x eager b16"],
                    [[k, f"{v['1']:,.0f}", f"{v['16']:,.0f}", *(f"x{v[b] / rows[k]['tokens_per_s'][b]:.2f}"
                                                                for b in ("1", "16"))]
                     for k, v in compiled_rows.items()])
        if "student (KD) int8 torchao" in compiled_rows:  # the compiled kernels' own numerics
            model = trio["student (KD) int8 torchao"]
            rows["student (KD) int8 torchao"]["val_loss_compiled"] = {
                d: val_loss(model, load_tokens(data_dir, "val", domains=[d]), batches=args.eval_batches)[0]
                for d in domains}
    # Every way of running a model is a candidate: each goal compares the fastest int8 student with the fastest
    # fp32 baseline, eager or compiled, at the worse of batch 1 and 16.
    speeds = {k: r["tokens_per_s"] for k, r in rows.items()}
    speeds.update({f"{k} (compiled)": v for k, v in compiled_rows.items()})
    int8_names = ["student (KD) int8", "student (KD) int8 torchao", "student (KD) int8 torchao (compiled)"]
    if any(n in speeds for n in int8_names):
        q_name, q_speed = fastest(speeds, int8_names)
        q_row = rows[q_name.removesuffix(" (compiled)")]
        q_loss = q_row.get("val_loss_compiled") if q_name.endswith("(compiled)") else q_row["val_loss"]
        rel = max(q_loss[d] / kd_r["val_loss"][d] - 1 for d in domains)
        s_name, s_speed = fastest(speeds, ["student (KD)", "student (KD) (compiled)"])
        t_name, t_speed = fastest(speeds, ["teacher", "teacher (compiled)"])
        vs_student, vs_teacher = speed_ratio(q_speed, s_speed), speed_ratio(q_speed, t_speed)
        checks[list(GOALS)[2]] = rel <= 0.02
        checks[list(GOALS)[3]] = vs_student >= 1.5
        checks[list(GOALS)[4]] = vs_teacher >= 3.0
        eager_q = rows.get("student (KD) int8")
        if eager_q:
            print(f"eager int8 (torch.ao) vs eager fp32 student: speed "
                  f"x{speed_ratio(eager_q['tokens_per_s'], kd_r['tokens_per_s']):.2f} (worst batch)")
        print(f"fastest int8 = {q_name}: loss +{rel:.2%} (worst domain); speed x{vs_student:.2f} the fastest fp32 "
              f"student ({s_name}), x{vs_teacher:.2f} the fastest fp32 teacher ({t_name}) (worst batch)")
    q4 = rows.get("student (KD) int4")
    if q4:
        rel4 = max(q4["val_loss"][d] / kd_r["val_loss"][d] - 1 for d in domains)
        speed4 = min(q4["tokens_per_s"][b] / kd_r["tokens_per_s"][b] for b in ("1", "16"))
        print(f"int4 ({backends['int4']} backend) vs fp32 student: loss +{rel4:.2%} (worst domain), speed "
              f"x{speed4:.2f} (worst batch), bytes x{q4['bytes'] / kd_r['bytes']:.2f}")
    print(f"student = {student_params / rows['teacher']['parameters']:.1%} of the teacher's parameters "
          f"({' '.join(student)})")
    if shape_rows:
        sp = {k: v["tokens_per_s"] for k, v in shape_rows.items()}
        print_table(f"decoding speed at the {args.speed_preset} preset's shapes (random weights, same run)",
                    ["model", "params", "tok/s b1", "tok/s b16"],
                    [[k, f"{v['parameters']:,}", f"{v['tokens_per_s']['1']:,.0f}", f"{v['tokens_per_s']['16']:,.0f}"]
                     for k, v in shape_rows.items()])
        q_name, q_speed = fastest(sp, ["student int8", "student int8 torchao (compiled)"])
        s_name, s_speed = fastest(sp, ["student", "student (compiled)"])
        t_name, t_speed = fastest(sp, ["teacher", "teacher (compiled)"])
        vs_student, vs_teacher = speed_ratio(q_speed, s_speed), speed_ratio(q_speed, t_speed)
        print(f"at {args.speed_preset} shapes: eager int8 x{speed_ratio(sp['student int8'], sp['student']):.2f} the "
              f"eager fp32 student; fastest int8 ({q_name}) x{vs_student:.2f} the fastest fp32 student ({s_name}), "
              f"x{vs_teacher:.2f} the fastest fp32 teacher ({t_name}) (worst batch); student = "
              f"{shape_rows['student']['parameters'] / shape_rows['teacher']['parameters']:.1%} of the teacher")
        checks[f"{list(GOALS)[3]} at {args.speed_preset} shapes"] = vs_student >= 1.5
        checks[f"{list(GOALS)[4]} at {args.speed_preset} shapes"] = vs_teacher >= 3.0
    for goal, ok in checks.items():
        print(f"  {'met ' if ok else 'MISS'}  {goal}")
    for method, why in unsupported.items():
        print(f"  n/a   {method}: {why}")

    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    body = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "platform": platform.platform(),
            "teacher_preset": args.teacher_preset, "steps": steps, "student_overrides": student,
            "specialist_steps": args.specialist_steps or steps, "specialist_init": "student (KD)",
            "alpha": args.alpha, "temperature": args.temperature, "models": rows, "goals": checks,
            "unsupported": unsupported, "quantization_backends": backends, "train_and_quantize_s": round(train_s, 1),
            "speed_preset": args.speed_preset, "speed_at_shapes": shape_rows, "compiled": compiled_rows}
    (results / "compress.json").write_text(json.dumps(body, indent=2))
    print(f"wrote {results / 'compress.json'}")
    return 0


if __name__ == "__main__":
    from app.errors import UserError

    try:
        raise SystemExit(main())
    except UserError as err:  # bad arguments or a clash with earlier runs: one line, no traceback
        raise SystemExit(f"error: {err}") from None
