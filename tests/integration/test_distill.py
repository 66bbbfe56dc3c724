"""Distillation on embedded Ray: a tiny teacher teaches a smaller student, and a one-domain specialist.

Two corpora (stdlib = "code", pydoc = "docs") so that a specialist has something to leave out.
"""

import json
from pathlib import Path

import pytest

from app import sdk
from app.config import load_config
from app.data import read_manifest
from app.errors import ConfigError, DataError
from app.model import GPT


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory, ray_local):
    from pipelines import prepare_data

    out = tmp_path_factory.mktemp("data") / "mixed"
    prepare_data.run(["stdlib", "pydoc"], out, vocab_size=512, max_documents=120, shard_tokens=200_000,
                     val_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def _common(data, storage):
    return [f"data.dir={data}", f"storage={storage}", "parallel.workers=1", "parallel.zero_stage=0"]


@pytest.fixture(scope="module")
def teacher(mixed_data, storage):
    return sdk.train("tiny", [*_common(mixed_data, storage), "name=teacher", "steps=40", "eval_every=0",
                              "checkpoint.every_steps=0"])


STUDENT = ["model.n_layer=1", "model.d_model=32", "model.n_head=2"]  # ~40% of the tiny teacher's block params


@pytest.fixture(scope="module")
def specialist(teacher, mixed_data, storage):
    return sdk.distill(teacher.artifact, "tiny", [f"data.dir={mixed_data}", f"storage={storage}", *STUDENT,
                                                  "steps=24", "eval_every=4", "checkpoint.every_steps=12",
                                                  "parallel.workers=2", "parallel.zero_stage=2"],
                       domains=["code"], alpha=0.9, temperature=2.0)


@pytest.mark.slow
def test_distillation_lowers_the_students_kl_to_the_teacher(specialist):
    s = specialist.summary
    assert s["teacher"].endswith("artifact") and s["alpha"] == 0.9 and s["domains"] == ["code"]
    assert s["world_sizes"] == [2] and s["steps"] == 24
    kl = specialist.history["val_kl"].dropna().to_numpy()
    assert len(kl) == 6 and kl[-1] < 0.8 * kl[0], kl  # measured at steps 4, 8, ..., 24
    assert specialist.summary["final_val_kl"] == pytest.approx(kl[-1])


@pytest.mark.slow
def test_specialist_reads_only_its_domain(specialist, mixed_data):
    manifest = read_manifest(mixed_data)
    code, everything = manifest.tokens("train", "code"), manifest.tokens("train")
    assert 0 < code < everything
    assert [a["train_tokens"] for a in specialist.attempts] == [code]
    assert specialist.run_dir.endswith("tiny-code-specialist")


@pytest.mark.slow
def test_distilled_artifact_records_its_lineage(specialist, teacher):
    card = json.loads((specialist.artifact and open(f"{specialist.artifact}/model_card.json").read()))
    assert card["lineage"]["teacher"] == teacher.artifact
    assert card["lineage"]["teacher_source_run"] == "teacher"
    assert card["lineage"]["alpha"] == 0.9 and card["domains"] == ["code"]
    # measured on export, and published in the registry beside the runs under the run's name
    assert set(card["val_loss_per_domain"]) == {"code", "docs"} and card["tokens_per_s"]["batch_16"] > 0
    from app.registry import Registry

    registry = Registry(f"{Path(specialist.run_dir).parent}/registry")
    assert {"teacher", "tiny-code-specialist"} <= set(registry.names())
    assert registry.card("tiny-code-specialist")["lineage"]["teacher"] == teacher.artifact
    student_params = GPT(load_config("tiny", STUDENT).model).num_params(non_embedding=True)
    teacher_params = GPT(load_config("tiny").model).num_params(non_embedding=True)
    assert student_params < 0.25 * teacher_params


@pytest.fixture(scope="module")
def warm_specialist(teacher, specialist, mixed_data, storage):
    """A specialist distilled on from the first one's weights, with ZeRO-3 (whose parameters are partitioned when
    the engine is built: the starting weights must already be in place)."""
    return sdk.distill(teacher.artifact, "tiny", [f"data.dir={mixed_data}", f"storage={storage}", *STUDENT,
                                                  "steps=3", "optim.warmup_steps=1", "eval_every=0",
                                                  "checkpoint.every_steps=0",
                                                  "parallel.workers=2", "parallel.zero_stage=3"],
                       domains=["code"], alpha=0.9, temperature=2.0, init_from=specialist.artifact,
                       run_name="warm-specialist")


@pytest.mark.slow
def test_a_run_starts_from_the_given_weights(warm_specialist, specialist, teacher, mixed_data):
    import torch

    from app.data import GlobalOrder, load_tokens, windows
    from app.distill import kd_loss
    from app.registry import load_artifact

    # The first step's loss is the one the starting weights give on that step's samples, computed here.
    cfg = load_config("tiny", [f"data.dir={mixed_data}", *STUDENT, "data.domains=[code]"])
    stream = load_tokens(mixed_data, "train", domains=["code"])
    ids = GlobalOrder.for_stream(cfg.data.seed, len(stream), cfg.model.seq_len).sample_ids(0, 8)
    start, tutor = load_artifact(specialist.artifact).model, load_artifact(teacher.artifact).model
    halves = []
    with torch.no_grad():
        for rank_ids in (ids[:4], ids[4:]):  # 2 workers x one micro-batch of 4: the step's loss is their mean
            x, y = (torch.from_numpy(a).long() for a in windows(stream, rank_ids, cfg.model.seq_len))
            halves.append(kd_loss(start(x)[0], tutor(x)[0], y, 0.9, 2.0)[0].item())
    first = warm_specialist.history["loss"].iloc[0]
    assert first == pytest.approx(sum(halves) / 2, rel=1e-4)
    assert warm_specialist.summary["init_from"] == specialist.artifact
    lineage = json.loads(Path(warm_specialist.artifact, "model_card.json").read_text())["lineage"]
    assert lineage["init_from"] == specialist.artifact and lineage["init_source_run"] == "tiny-code-specialist"


@pytest.mark.slow
def test_bad_distillation_inputs_fail_in_one_line(teacher, mixed_data, storage):
    base = [f"data.dir={mixed_data}", f"storage={storage}", "name=bad"]
    with pytest.raises(ConfigError, match="longer than the teacher's context"):
        sdk.distill(teacher.artifact, "tiny", [*base, "model.seq_len=128"])
    with pytest.raises(ConfigError, match="init_from=.* has another shape than this run's model; set model.n_layer=2"):
        sdk.distill(teacher.artifact, "tiny", [*base, *STUDENT], init_from=teacher.artifact)
    with pytest.raises(DataError, match="choose from \\['code', 'docs'\\]"):
        sdk.distill(teacher.artifact, "tiny", base, domains=["poetry"])
    with pytest.raises(ConfigError, match="distill.teacher is not set"):
        from pipelines import distill

        distill.run(load_config("tiny", base))
