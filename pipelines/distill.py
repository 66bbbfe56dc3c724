"""Distillation as a Ray Train + DeepSpeed job: the training loop of pipelines/train.py with a frozen teacher.

    python -m app distill --teacher runs/teacher/artifact --preset tiny --alpha 0.5 --temperature 2
    python -m app distill --teacher teacher --preset tiny --domain code      # a code specialist

Every worker loads the teacher (a registry name or artifact folder) next to its student; each micro-batch's loss
is app.distill.kd_loss. Checkpoints, resume, elastic resizing and preemption handling are the trainer's own, so
a distillation run survives exactly what a training run survives. A specialist is a student distilled on one
domain of the manifest only (data.domains), trained and validated on that domain.
"""

from __future__ import annotations

from app.config import TrainConfig
from app.errors import ConfigError


def run(cfg: TrainConfig, *, num_cpus: int | None = None, progress: bool = True):
    """Distil `cfg.distill.teacher` into the student `cfg.model`; returns the trainer's TrainResult (its summary
    adds teacher, alpha, temperature and the validation KL to the teacher at the start and the end)."""
    from pipelines import train

    if not cfg.distill.teacher:
        raise ConfigError("distill.teacher is not set; pass --teacher NAME (a registry name or artifact folder)")
    return train.run(cfg, num_cpus=num_cpus, progress=progress)


def main(argv=None) -> int:
    import sys

    from app.__main__ import main as app_main

    return app_main(["distill", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
