"""Typed run configuration: pydantic models, YAML presets, dotted overrides, one-line errors.

Defaults for runs live in ``app/presets/*.yaml`` only: ``base.yaml`` holds every field, and a preset such as
``tiny.yaml`` changes a few of them. Fields here carry no defaults of their own, so there is exactly one place
to look for a value.

    cfg = load_config("tiny", overrides=["optim.lr=3e-4", "parallel.zero_stage=2"])
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 integers, which would read a worker range `1:4` as 64."""


_INT = "tag:yaml.org,2002:int"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _INT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)
BASE_PRESET = "base"


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(StrictModel):
    """Shape of the GPT (see app/model.py)."""

    vocab_size: int = Field(gt=0, description="Token vocabulary size; the tokenizer is trained to this size.")
    seq_len: int = Field(gt=0, description="Context length in tokens (the training window).")
    n_layer: int = Field(gt=0, description="Number of transformer blocks.")
    n_head: int = Field(gt=0, description="Attention heads per block; must divide d_model.")
    d_model: int = Field(gt=0, description="Residual stream width.")
    mlp_ratio: int = Field(gt=0, description="MLP hidden width as a multiple of d_model.")
    dropout: float = Field(ge=0.0, lt=1.0, description="Dropout probability on attention and residual paths.")
    bias: bool = Field(description="Use bias in linear layers and LayerNorms.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                "pick n_head so that d_model / n_head is a whole head size"
            )
        return self


class DataConfig(StrictModel):
    """Where token shards come from and how they are cut into training samples."""

    sources: list[str] = Field(
        min_length=1,
        description="Corpus sources: 'stdlib', 'pydoc', a local file/folder, or a pyarrow filesystem URI.",
    )
    dir: str = Field(description="Folder holding the prepared shards, manifest.json and tokenizer.json.")
    val_fraction: float = Field(gt=0.0, lt=1.0, description="Share of documents held out for validation.")
    max_documents: int | None = Field(
        default=None, description="Keep at most this many documents per source (None = all); for quick runs."
    )
    shard_tokens: int = Field(gt=0, description="Target number of tokens per Parquet shard.")
    seed: int = Field(description="Seed for the train/validation split and the sample order.")
    domains: list[str] | None = Field(
        default=None,
        description="Train and validate on these domains of the manifest only (e.g. [code] for a specialist); "
        "None = all.",
    )


class OptimConfig(StrictModel):
    """AdamW with linear warmup then cosine decay to min_lr_ratio × lr."""

    lr: float = Field(gt=0.0, description="Peak learning rate.")
    min_lr_ratio: float = Field(ge=0.0, le=1.0, description="Final learning rate as a fraction of lr.")
    warmup_steps: int = Field(ge=0, description="Optimizer steps of linear warmup.")
    weight_decay: float = Field(ge=0.0, description="Decoupled weight decay (AdamW).")
    beta1: float = Field(ge=0.0, lt=1.0, description="AdamW beta1.")
    beta2: float = Field(ge=0.0, lt=1.0, description="AdamW beta2.")
    eps: float = Field(gt=0.0, description="AdamW epsilon.")
    grad_clip: float = Field(ge=0.0, description="Clip the global gradient norm to this value (0 = off).")


class ParallelConfig(StrictModel):
    """How the global batch is split over workers, micro-batches and pipeline stages."""

    workers: str = Field(
        description="Number of training workers: 'N' for a fixed group or 'MIN:MAX' for an elastic one."
    )
    global_batch: int = Field(gt=0, description="Samples per optimizer step; a constant of the run.")
    micro_batch: int = Field(gt=0, description="Samples per forward/backward on one worker.")
    zero_stage: Literal[0, 1, 2, 3] = Field(description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(description="Keep optimizer state on the CPU (ZeRO-Offload).")
    pipeline_stages: int = Field(ge=1, description="Pipeline-parallel stages (1 = no pipeline).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        description="Training precision; 'auto' is bf16 on GPUs that support it, fp32 on CPU."
    )
    activation_checkpointing: bool = Field(description="Recompute block activations in backward to save memory.")
    cpus_per_worker: int = Field(ge=1, description="CPU cores reserved per worker (also its torch thread count).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        description="Where workers train: 'auto' uses GPUs when the Ray cluster has them (NCCL), else CPUs (gloo)."
    )
    peak_flops_per_worker: float | None = Field(
        default=None, description="Peak FLOP/s of one worker for MFU; None = measure once with a matmul probe."
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _check_workers(self) -> "ParallelConfig":
        parse_workers(self.workers)
        return self


class CheckpointConfig(StrictModel):
    """When full-state checkpoints are written and how many are kept."""

    every_steps: int = Field(ge=0, description="Save every N optimizer steps (0 = only at the end).")
    every_minutes: Union[float, Literal["auto"]] = Field(
        description="Also save when this many minutes passed (0 = off); 'auto' = the Young–Daly interval "
        "sqrt(2 × save time × MTBF) from the measured save time and mtbf_minutes (or the observed failure rate)."
    )
    mtbf_minutes: float = Field(
        gt=0.0, description="Expected minutes between failures (spot reclaims) of the whole job, for "
        "every_minutes=auto; a run that has already restarted more often than this uses its observed rate."
    )

    @field_validator("every_minutes", mode="before")
    @classmethod
    def _minutes_or_auto(cls, value: Any) -> Any:
        if value == "auto":
            return value
        try:
            minutes = float(value)
        except (TypeError, ValueError):
            raise ValueError("use a number of minutes (0 = off) or 'auto'") from None
        if minutes < 0:
            raise ValueError("use a number of minutes >= 0 (0 = off) or 'auto'")
        return minutes
    keep: int = Field(ge=1, description="Number of most recent complete checkpoints kept on storage.")


class DistillConfig(StrictModel):
    """Knowledge distillation: a frozen teacher's logits teach the student (app/distill.py)."""

    teacher: str | None = Field(
        default=None, description="Teacher model: a registry name or artifact folder; None = plain training."
    )
    alpha: float = Field(ge=0.0, le=1.0, description="Weight of the KL term: (1 - alpha)·CE + alpha·T²·KL.")
    temperature: float = Field(gt=0.0, description="Softmax temperature T applied to both teacher and student.")


class ElasticConfig(StrictModel):
    """Preemption handling and how fast a worker group recovers (Ray's defaults wait about a minute)."""

    preemption_check_every: int = Field(
        ge=1, description="Poll ray.train.get_preemption_info() (a barrier across workers) at most every N steps, "
        "and at most once per preemption_poll_interval_s (every step while a notice stands)."
    )
    max_preemption_failures: int = Field(ge=-1, description="Spot reclaims to recover from (-1 = unlimited).")
    resize_monitor_interval_s: float = Field(
        gt=0, description="Seconds between Ray's checks for room to grow an elastic group back."
    )
    worker_group_start_timeout_s: float = Field(gt=0, description="Give up starting a worker group after this long.")
    health_check_interval_s: float = Field(gt=0, description="Seconds between Ray Train's worker health checks.")
    preemption_poll_interval_s: float = Field(gt=0, description="Seconds between Ray's polls for drain notices.")
    warm_standby: bool = Field(
        description="Keep one idle worker process per training worker (and on a node that joins) with torch, "
        "DeepSpeed and this project already imported, so the first group and every restarted one skip "
        "those imports (pipelines/standby.py); only for runs on a Ray cluster (not in-process runs)."
    )


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Run and model names: a run's folder, its Ray actors and the model it exports to the registry all carry it."""
NAME_RULE = "use letters, digits, '.', '_' and '-' (at most 128, starting with a letter or digit)"


class TrainConfig(StrictModel):
    """Everything one training run needs; handed to workers as a plain dict."""

    name: str = Field(min_length=1, description="Run name; re-running with the same name resumes.")
    storage: str = Field(description="Folder or pyarrow filesystem URI under which runs are stored.")
    seed: int = Field(description="Seed for model initialisation and dropout.")
    steps: int = Field(gt=0, description="Optimizer steps of the whole run (the LR schedule's length).")
    stop_at: int | None = Field(
        default=None, description="Stop after this step (checkpointing first), leaving the run resumable; None = run to the end."
    )
    eval_every: int = Field(ge=0, description="Compute validation loss every N steps (0 = only at the end).")
    eval_batches: int = Field(gt=0, description="Micro-batches averaged for one validation loss.")
    log_every: int = Field(
        gt=0, description="Report metrics to Ray Train at most every N steps (and at most once per two health-check "
        "intervals); every step still reaches the run's history."
    )
    max_failures: int = Field(ge=-1, description="Worker-group failures to recover from (-1 = unlimited).")
    init_from: str | None = Field(
        default=None, description="Start from this model's weights (a registry name or artifact folder) instead of "
        "a random initialisation: fine-tuning, continued pre-training, or a specialist distilled from a general "
        "student. Its shape must equal model.*; None = random initialisation.",
    )
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    parallel: ParallelConfig
    checkpoint: CheckpointConfig
    elastic: ElasticConfig
    distill: DistillConfig

    @field_validator("name")
    @classmethod
    def _registry_safe_name(cls, name: str) -> str:
        # Checked here, before any training: the end of a run publishes its model under this name.
        if not NAME_PATTERN.match(name):
            raise ValueError(f"'{name}' is not a valid run name; {NAME_RULE}")
        return name

    @model_validator(mode="after")
    def _check_schedule(self) -> "TrainConfig":
        if self.optim.warmup_steps > self.steps:
            raise ValueError(
                f"optim.warmup_steps={self.optim.warmup_steps} exceeds steps={self.steps}; "
                "lower optim.warmup_steps or raise steps"
            )
        if self.distill.teacher and self.parallel.pipeline_stages > 1:
            raise ValueError(
                "distillation runs without pipeline stages (the teacher needs the whole input at the last stage); "
                "set parallel.pipeline_stages=1 (ZeRO 0-3 and offload work)"
            )
        return self

    def config_hash(self) -> str:
        """Hash of the settings that define the optimisation trajectory (not names, paths or schedule of saves)."""
        fields = self.model_dump(include={"seed", "steps", "model", "optim", "data"})
        fields["data"] = {k: fields["data"][k] for k in ("seed",)}
        if self.data.domains:  # only when set, so hashes of runs on every domain stay what they were
            fields["data"]["domains"] = sorted(self.data.domains)
        if self.distill.teacher:
            fields["distill"] = self.distill.model_dump()
        if self.init_from:
            fields["init_from"] = self.init_from
        fields["global_batch"] = self.parallel.global_batch
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def parse_workers(spec: Union[str, int]) -> tuple[int, int]:
    """'2' -> (2, 2); '1:4' -> (1, 4). Raises ConfigError naming parallel.workers."""
    text = str(spec).strip()
    try:
        lo, _, hi = text.partition(":")
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise ConfigError(f"parallel.workers={text!r} is not 'N' or 'MIN:MAX'; use e.g. '2' or '1:4'") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise ConfigError(f"parallel.workers={text!r} needs 1 <= MIN <= MAX; use e.g. '2' or '1:4'")
    return bounds


# --------------------------------------------------------------------------------------------------------------
# Loading: preset YAML (merged over base.yaml) + dotted overrides → validated TrainConfig.


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml") if p.stem != BASE_PRESET)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = _yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    return data


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_preset(preset: str) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"preset file {preset} does not exist; pass a preset name ({', '.join(list_presets())})")
        return path
    path = PRESETS_DIR / f"{preset}.yaml"
    if not path.is_file():
        names = list_presets()
        close = difflib.get_close_matches(preset, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown preset '{preset}'; {hint}available: {', '.join(names)}")
    return path


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.extend(_known_keys(sub, prefix + name + "."))
    return keys


# Names other tools use for our fields (Hugging Face, nanoGPT, Megatron); checked before string similarity.
_ALIASES = {
    "learning_rate": "lr", "batch_size": "global_batch", "micro_batch_size": "micro_batch",
    "num_layers": "n_layer", "n_layers": "n_layer", "num_heads": "n_head", "n_heads": "n_head",
    "hidden_size": "d_model", "n_embd": "d_model", "block_size": "seq_len", "context_length": "seq_len",
    "max_steps": "steps", "num_workers": "workers", "zero": "zero_stage", "stage": "zero_stage",
}


def _unknown_key_message(dotted: str) -> str:
    keys = _known_keys(TrainConfig)
    section, _, leaf = dotted.rpartition(".")
    alias = f"{section}.{_ALIASES[leaf]}" if section and leaf in _ALIASES else _ALIASES.get(leaf)
    close = [alias] if alias in keys else difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    if not close:  # compare the last segment within the same section, e.g. model.nlayer → model.n_layer
        siblings = [k for k in keys if k.rpartition(".")[0] == section]
        leaves = difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in siblings], n=1, cutoff=0.5)
        close = [f"{section}.{leaves[0]}" if section else leaves[0]] if leaves else []
    hint = f"did you mean '{close[0]}'?" if close else "see app/presets/base.yaml for the valid keys"
    return f"unknown config key '{dotted}'; {hint}"


def format_validation_error(err: ValidationError) -> str:
    """First problem of a pydantic error as one line: the dotted field, what is wrong, and the fix."""
    first = err.errors()[0]
    dotted = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return _unknown_key_message(dotted)
    if first["type"] == "missing":
        return f"config key '{dotted}' is missing; add it to the preset or pass --set {dotted}=VALUE"
    msg = first["msg"].removeprefix("Value error, ")
    if not dotted or msg.startswith(dotted):
        return msg
    return f"config key '{dotted}': {msg} (got {first.get('input')!r})"


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=3e-4' -> ('optim.lr', 0.0003); the value is parsed as YAML so lists and bools work."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE; use e.g. --set optim.lr=3e-4")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    tree = json.loads(json.dumps(tree))  # deep copy of plain data
    known = set(_known_keys(TrainConfig))
    for text in overrides:
        key, value = parse_override(text)
        if key not in known:
            raise ConfigError(_unknown_key_message(key))
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def load_config(preset: str = "tiny", overrides: list[str] | None = None) -> TrainConfig:
    """Preset name or YAML path, merged over base.yaml, with dotted overrides applied last."""
    tree = _read_yaml(PRESETS_DIR / f"{BASE_PRESET}.yaml")
    tree = _deep_merge(tree, _read_yaml(_resolve_preset(preset)))
    tree = apply_overrides(tree, overrides or [])
    return config_from_dict(tree)


def config_from_dict(tree: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
