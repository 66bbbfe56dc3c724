"""Model artifacts: a folder of weights (safetensors) + tokenizer.json + model_card.json, saved and loaded.

    artifact = load_artifact("runs/tiny/artifact")
    artifact.model.generate(...)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.config import ModelConfig
from app.errors import UserError
from app.model import GPT
from app.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CARD = "model_card.json"
TIED_NAME = "head.lm_head.weight"  # the same tensor as embed.wte.weight: stored once


@dataclass
class Artifact:
    path: Path
    model: GPT
    tokenizer: Tokenizer
    card: dict[str, Any]


def save_artifact(out_dir: str | Path, state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig,
                  tokenizer: Tokenizer, card: dict[str, Any]) -> Path:
    """Write weights, tokenizer and card; the card gains parameters, bytes on disk, config and creation time."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k != TIED_NAME}
    save_file(weights, str(out / WEIGHTS))
    tokenizer.save(out)
    full_card = {
        "model_config": model_cfg.model_dump(),
        "parameters": sum(v.numel() for v in weights.values()),
        "bytes": (out / WEIGHTS).stat().st_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer_sha256": tokenizer.sha256,
        **card,
    }
    (out / CARD).write_text(json.dumps(full_card, indent=2, sort_keys=True))
    return out


def load_artifact(path: str | Path) -> Artifact:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CARD).is_file():
        raise UserError(f"no model artifact at {path} (missing {CARD}); pass a folder written by training")
    card = json.loads((path / CARD).read_text())
    model = GPT(ModelConfig(**card["model_config"]))
    missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS)), strict=False)
    assert set(missing) <= {TIED_NAME} and not unexpected, (missing, unexpected)
    model.eval()
    return Artifact(path, model, Tokenizer.load(path), card)
