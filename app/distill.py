"""Knowledge distillation: the loss, and the checks that a teacher can teach a given student.

    total, ce, kl = kd_loss(student_logits, teacher_logits, targets, alpha=0.5, temperature=2.0)

The loss is Hinton et al.'s: (1 − α)·CE(student, targets) + α·T²·KL(p_teacher/T ‖ p_student/T). The T² keeps the
soft term's gradient on the same scale as CE's when T changes. The training loop (pipelines/train.py) calls it
per micro-batch with the frozen teacher's logits computed under no_grad, so gradients reach only the student.
Imports only torch and app modules: usable from tests and notebooks without Ray or DeepSpeed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from app.config import ModelConfig
from app.errors import ConfigError
from app.model import IGNORE_INDEX


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, kl) for logits [B, T, V] and targets [B, T]; positions whose target is IGNORE_INDEX count in
    neither term. `kl` is KL(teacher ‖ student) at temperature T, summed over the vocabulary and averaged over
    positions (before the T² factor)."""
    vocab = student_logits.size(-1)
    student = student_logits.reshape(-1, vocab).float()
    teacher = teacher_logits.detach().reshape(-1, vocab).float()
    flat_targets = targets.reshape(-1)
    keep = flat_targets != IGNORE_INDEX
    ce = F.cross_entropy(student, flat_targets, ignore_index=IGNORE_INDEX)
    log_p_student = F.log_softmax(student[keep] / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher[keep] / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    total = (1.0 - alpha) * ce + alpha * temperature**2 * kl
    return total, ce, kl


def check_teacher(teacher_card: dict[str, Any], student: ModelConfig, data_tokenizer_sha256: str,
                  teacher_name: str) -> None:
    """Refuse, in one line each, a teacher that cannot teach this student on this data: a different tokenizer,
    a different vocabulary size, or a context shorter than the student's."""
    t = ModelConfig(**teacher_card["model_config"])
    if teacher_card.get("quantization"):
        raise ConfigError(
            f"distill.teacher={teacher_name} is quantized ({teacher_card['quantization']}); distil from the fp32 "
            "model it was made from"
        )
    if teacher_card.get("tokenizer_sha256") and teacher_card["tokenizer_sha256"] != data_tokenizer_sha256:
        raise ConfigError(
            f"distill.teacher={teacher_name} was trained with another tokenizer than the data in data.dir; "
            "point data.dir at the data the teacher was trained on (its card's 'data' field)"
        )
    if t.vocab_size != student.vocab_size:
        raise ConfigError(
            f"distill.teacher={teacher_name} has vocab_size {t.vocab_size} but the student has model.vocab_size="
            f"{student.vocab_size}; set model.vocab_size={t.vocab_size}"
        )
    if student.seq_len > t.seq_len:
        raise ConfigError(
            f"the student's model.seq_len={student.seq_len} is longer than the teacher's context ({t.seq_len}); "
            f"set model.seq_len<={t.seq_len}"
        )


def teacher_lineage(teacher_card: dict[str, Any], teacher_name: str) -> dict[str, Any]:
    """What a distilled model's card records about its teacher."""
    return {
        "teacher": teacher_name,
        "teacher_source_run": teacher_card.get("source_run"),
        "teacher_config_hash": teacher_card.get("config_hash"),
        "teacher_val_loss": teacher_card.get("val_loss"),
        "teacher_parameters": teacher_card.get("parameters"),
    }
