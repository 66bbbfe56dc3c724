"""The distillation loss and the checks that a teacher can teach a student (no Ray)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from app.config import ModelConfig, load_config
from app.distill import check_teacher, kd_loss
from app.errors import ConfigError
from app.model import GPT, IGNORE_INDEX

V = 50


def _logits(seed: int, shape=(2, 5, V)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_alpha_zero_is_plain_cross_entropy():
    student, teacher = _logits(0), _logits(1)
    targets = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    total, ce, _ = kd_loss(student, teacher, targets, alpha=0.0, temperature=2.0)
    expected = F.cross_entropy(student.reshape(-1, V), targets.reshape(-1))
    assert torch.allclose(total, expected) and torch.allclose(ce, expected)


def test_kl_term_is_zero_when_student_matches_teacher_and_positive_otherwise():
    logits = _logits(3)
    targets = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(4))
    _, ce, kl = kd_loss(logits, logits.clone(), targets, alpha=1.0, temperature=3.0)
    assert abs(float(kl)) < 1e-6
    total, _, kl = kd_loss(logits, _logits(5), targets, alpha=1.0, temperature=3.0)
    assert float(kl) > 0.1 and torch.allclose(total, 9.0 * kl)  # alpha = 1: only T² · KL remains


def test_kl_matches_its_definition_and_ignores_padding():
    student, teacher = _logits(6), _logits(7)
    targets = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(8))
    targets[1, 3:] = IGNORE_INDEX
    T = 2.0
    _, _, kl = kd_loss(student, teacher, targets, alpha=0.5, temperature=T)
    keep = targets.reshape(-1) != IGNORE_INDEX
    p_t = F.softmax(teacher.reshape(-1, V)[keep] / T, -1)
    log_p_s = F.log_softmax(student.reshape(-1, V)[keep] / T, -1)
    expected = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    assert torch.allclose(kl, expected, atol=1e-6)


def test_gradients_reach_only_the_student():
    cfg = ModelConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=16, mlp_ratio=4, dropout=0.0, bias=True)
    torch.manual_seed(0)
    student, teacher = GPT(cfg), GPT(cfg)
    teacher.requires_grad_(False)
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    s_logits, _ = student(x)
    with torch.no_grad():
        t_logits, _ = teacher(x)
    total, _, _ = kd_loss(s_logits, t_logits, y, alpha=0.7, temperature=2.0)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.dim() >= 2)
    assert all(p.grad is None for p in teacher.parameters())


def _card(**changes) -> dict:
    cfg = {"vocab_size": 512, "seq_len": 64, "n_layer": 2, "n_head": 4, "d_model": 64, "mlp_ratio": 4,
           "dropout": 0.0, "bias": True}
    card = {"model_config": cfg, "tokenizer_sha256": "abc", "quantization": None}
    for k, v in changes.items():
        (card["model_config"] if k in cfg else card)[k] = v
    return card


def test_teacher_checks_name_the_field_and_the_fix():
    student = load_config("tiny").model  # vocab 512, seq_len 64
    check_teacher(_card(), student, "abc", "t")  # compatible: no error
    with pytest.raises(ConfigError, match="model.seq_len=64 is longer than the teacher's context"):
        check_teacher(_card(seq_len=32), student, "abc", "t")
    with pytest.raises(ConfigError, match="set model.vocab_size=1024"):
        check_teacher(_card(vocab_size=1024), student, "abc", "t")
    with pytest.raises(ConfigError, match="another tokenizer"):
        check_teacher(_card(), student, "different", "t")
    with pytest.raises(ConfigError, match="quantized"):
        check_teacher(_card(quantization="int8-dynamic"), student, "abc", "t")


def test_starting_weights_checks_name_the_field_and_the_fix():
    from pipelines.train import check_init_from

    model = load_config("tiny").model  # 2 layers, 4 heads, width 64, vocab 512, seq_len 64
    check_init_from(_card(), model, "abc", "m")  # same shape: no error
    check_init_from(_card(dropout=0.1), model, "abc", "m")  # dropout is not part of the weights
    with pytest.raises(ConfigError, match=r"set model.n_layer=1 model.d_model=32 \(or start"):
        check_init_from(_card(n_layer=1, d_model=32), model, "abc", "m")
    with pytest.raises(ConfigError, match="set model.seq_len=128"):
        check_init_from(_card(seq_len=128), model, "abc", "m")
    with pytest.raises(ConfigError, match="init_from=m was trained with another tokenizer"):
        check_init_from(_card(), model, "different", "m")
    with pytest.raises(ConfigError, match="init_from=m is quantized"):
        check_init_from(_card(quantization="int8-dynamic"), model, "abc", "m")


def test_starting_weights_change_the_config_hash():
    base = load_config("tiny")
    warm = load_config("tiny", ["init_from=some-model"])
    assert warm.init_from == "some-model" and base.init_from is None
    assert warm.config_hash() != base.config_hash()  # a resumed run cannot silently switch its starting point


def test_distillation_refuses_pipeline_stages():
    with pytest.raises(ConfigError, match="parallel.pipeline_stages=1"):
        load_config("tiny", ["distill.teacher=t", "parallel.pipeline_stages=2"])


def test_domains_and_teacher_change_the_config_hash_only_when_set():
    base = load_config("tiny")
    assert load_config("tiny", ["data.domains=[code]"]).config_hash() != base.config_hash()
    assert load_config("tiny", ["distill.teacher=t"]).config_hash() != base.config_hash()
    assert load_config("tiny", ["distill.alpha=0.9"]).config_hash() == base.config_hash()  # no teacher: plain run


def test_sdk_applies_its_arguments_to_a_config_object_too(monkeypatch):
    """app.distill(teacher, cfg) with a TrainConfig: the teacher, domains, α and starting weights still apply (they
    used to be dropped, which silently trained without a teacher), as do app.train's overrides."""
    import app.sdk as sdk
    from pipelines import distill as distill_pipeline
    from pipelines import train as train_pipeline

    ran = []
    monkeypatch.setattr(distill_pipeline, "run", lambda cfg, num_cpus=None: ran.append(cfg))
    monkeypatch.setattr(train_pipeline, "run", lambda cfg, num_cpus=None: ran.append(cfg))
    base = load_config("tiny", ["name=mine"])
    sdk.distill("/models/teacher", base, ["steps=7"], domains=["code"], alpha=0.25, init_from="/models/student")
    sdk.train(base, ["steps=9"])
    sdk.train(base)
    got, trained, untouched = ran
    assert (got.distill.teacher, got.data.domains, got.distill.alpha, got.init_from, got.steps, got.name) == (
        "/models/teacher", ["code"], 0.25, "/models/student", 7, "mine")
    assert trained.steps == 9 and trained.distill.teacher is None and untouched is base


def test_an_unknown_teacher_or_starting_model_fails_before_ray_starts(monkeypatch, tmp_path):
    import pipelines.ray_session
    from app.errors import UserError
    from pipelines import train

    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray started before the models were checked")

    monkeypatch.setattr(pipelines.ray_session, "ray_session", no_ray)
    monkeypatch.setenv("SCALESTACK_REGISTRY", str(tmp_path / "registry"))
    for field in ("distill.teacher", "init_from"):
        cfg = load_config("tiny", [f"{field}=no-such-model", f"storage={tmp_path / 'runs'}"])
        with pytest.raises(UserError, match="unknown model 'no-such-model'"):
            train.run(cfg)
