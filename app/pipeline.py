"""Pipeline-parallel layout of the GPT for DeepSpeed's PipelineModule: layer specs with the tied embedding,
initialisation from a GPT (so a pipelined run starts from the very weights a plain run would), and the saved
layer files mapped back to GPT parameter names.

Layers: 0 embedding (tied) · 1…L blocks · L+1 final LayerNorm · L+2 the embedding again, projecting to the
vocabulary. The two ends share `wte.weight` through TiedLayerSpec: DeepSpeed keeps a copy on the first and last
stage and all-reduces their gradients, which is what tying means once the ends live in different processes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from app.config import ModelConfig
from app.model import GPT, Block, Embedding, pipeline_loss

TIED_KEY = "embed"


def _project_to_vocab(embedding: Embedding, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, embedding.wte.weight)  # [B, T, D] -> [B, T, V], the tied output head


def pipeline_specs(cfg: ModelConfig) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    return [
        TiedLayerSpec(TIED_KEY, Embedding, cfg, tied_weight_attr=["wte.weight"]),
        *[LayerSpec(Block, cfg) for _ in range(cfg.n_layer)],
        LayerSpec(nn.LayerNorm, cfg.d_model, bias=cfg.bias),
        TiedLayerSpec(TIED_KEY, Embedding, cfg, forward_fn=_project_to_vocab, tied_weight_attr=["wte.weight"]),
    ]


def build_pipeline_module(cfg: ModelConfig, stages: int, activation_checkpointing: bool, init_from: GPT):
    """A PipelineModule over `stages` whose local layers hold `init_from`'s weights."""
    from deepspeed.pipe import PipelineModule

    pipe = PipelineModule(
        layers=pipeline_specs(cfg),
        num_stages=stages,
        loss_fn=pipeline_loss,
        partition_method="parameters",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
    )
    with torch.no_grad():
        for name, module in pipe.named_children():
            if name == "tied_modules":
                for tied in module.values():
                    tied.load_state_dict(init_from.embed.state_dict())
            elif name.isdigit():
                module.load_state_dict(_gpt_layer(init_from, int(name)).state_dict())
    return pipe


def _gpt_layer(gpt: GPT, index: int) -> nn.Module:
    n_layer = gpt.cfg.n_layer
    if 1 <= index <= n_layer:
        return gpt.blocks[index - 1]
    if index == n_layer + 1:
        return gpt.head.ln_f
    raise AssertionError(f"layer {index} is a tied layer")


def gpt_name(layer_index: int, key: str, n_layer: int) -> str | None:
    """GPT parameter name of `key` in pipeline layer `layer_index` (None for the duplicate tied head)."""
    if layer_index == 0:
        return f"embed.{key}"
    if layer_index <= n_layer:
        return f"blocks.{layer_index - 1}.{key}"
    if layer_index == n_layer + 1:
        return f"head.ln_f.{key}"
    return None


def state_dict_from_layer_files(tag_dir: str | Path, n_layer: int) -> dict[str, torch.Tensor]:
    """Reassemble GPT weights (fp32) from DeepSpeed's per-layer files `layer_XX-model_states.pt`. The tied head
    (layer n_layer + 2) has no file of its own: DeepSpeed saves the shared module once, with layer 0."""
    files = sorted(Path(tag_dir).glob("layer_*-model_states.pt"))
    assert len(files) == n_layer + 2, f"expected {n_layer + 2} pipeline layer files in {tag_dir}, found {len(files)}"
    state = {}
    for path in files:
        index = int(path.name[6:8])
        for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
            name = gpt_name(index, key, n_layer)
            if name is not None:
                state[name] = value.float()
    return state
