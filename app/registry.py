"""Model artifacts and the registry that names them: an artifact is a folder of weights (model.safetensors),
tokenizer.json and model_card.json; a registry is a root (local folder or pyarrow filesystem URI) holding one
artifact folder per model name.

    artifact = load_artifact("runs/tiny/artifact")        # a folder ...
    artifact = load_artifact("tiny-int8")                  # ... or a name in the registry
    reg = Registry("file:///data/registry")                # default: $SCALESTACK_REGISTRY, else runs/registry
    reg.publish("tiny", "runs/tiny/artifact"); reg.list(); reg.card("tiny")

A quantized artifact stores its integer weights and scales as plain tensors (see app/quantize.py) and its card's
``quantization_config`` says how to rebuild the modules; loading gives back the quantized model, bit for bit.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from app.config import NAME_PATTERN, NAME_RULE, ModelConfig
from app.console import html_table
from app.errors import UserError
from app.model import GPT
from app.tokenizer import TOKENIZER_FILE, Tokenizer

WEIGHTS = "model.safetensors"
CARD = "model_card.json"
TIED_NAME = "head.lm_head.weight"  # the same tensor as embed.wte.weight: stored once
DEFAULT_ROOT = "runs/registry"
ROOT_ENV = "SCALESTACK_REGISTRY"


class ModelNotFound(UserError):
    """A model name the registry does not hold, or a folder that is not an artifact."""


@dataclass
class Artifact:
    path: Path | str  # the folder it was loaded from (a URI string for a remote registry)
    model: GPT
    tokenizer: Tokenizer
    card: dict[str, Any]


def save_artifact(out_dir: str | Path, state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig,
                  tokenizer: Tokenizer, card: dict[str, Any]) -> Path:
    """Write weights, tokenizer and card; the card gains parameters (of the fp32 model, tied matrix once), bytes
    on disk, config and creation time (keys given in `card` win)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k != TIED_NAME}
    save_file(weights, str(out / WEIGHTS))
    tokenizer.save(out)
    with torch.device("meta"):  # shapes only: a quantized model stores more tensors than it has parameters
        parameters = GPT(model_cfg).num_params(non_embedding=False)
    full_card = {
        "model_config": model_cfg.model_dump(),
        "parameters": parameters,
        "bytes": (out / WEIGHTS).stat().st_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer_sha256": tokenizer.sha256,
        **card,
    }
    (out / CARD).write_text(json.dumps(full_card, indent=2, sort_keys=True))
    return out


def _load_folder(path: Path) -> Artifact:
    from safetensors.torch import load_file

    card = json.loads((path / CARD).read_text())
    model = GPT(ModelConfig(**card["model_config"]))
    tensors = load_file(str(path / WEIGHTS))
    if card.get("quantization"):
        from app.quantize import QuantSpec, restore

        model = restore(model, tensors, QuantSpec.from_card(card["quantization_config"]))
    else:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        assert set(missing) <= {TIED_NAME} and not unexpected, (missing, unexpected)
    model.eval()
    return Artifact(path, model, Tokenizer.load(path), card)


def load_artifact(path_or_name: str | Path, registry: str | None = None) -> Artifact:
    """Load an artifact from a folder (written by training, distillation or quantization) or by its registry
    name (in `registry`, default $SCALESTACK_REGISTRY or runs/registry)."""
    path = Path(path_or_name)
    if (path / CARD).is_file():
        return _load_folder(path)
    if NAME_PATTERN.match(str(path_or_name)):
        return Registry(registry).load(str(path_or_name))  # an unknown name fails with the closest known ones
    raise ModelNotFound(f"no model artifact at {path} (missing {CARD}); pass a folder written by training "
                        "or a registry name (`python -m app models list`)")


def locate(path_or_name: str | Path, registry: str | None = None) -> tuple[str, dict[str, Any]]:
    """An artifact folder or registry name → (absolute location every Ray worker can read, its card), without
    loading the weights."""
    folder = Path(path_or_name)
    if (folder / CARD).is_file():
        return str(folder.resolve()), json.loads((folder / CARD).read_text())
    reg = Registry(registry)
    return reg.path(str(path_or_name)), reg.card(str(path_or_name))  # an unknown name fails naming the closest


def machine() -> dict[str, Any]:
    """The machine a measurement ran on: platform, CPU model, CPU count and torch's thread count."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__.split("+")[0]}


# ---- the registry --------------------------------------------------------------------------------------------


class Registry:
    """Named artifacts under one root: ROOT/NAME/{model.safetensors, tokenizer.json, model_card.json}.

    root: a local folder or any pyarrow filesystem URI (file://, s3://, gs://); default $SCALESTACK_REGISTRY,
    else runs/registry.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = str(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)
        try:
            if "://" in self.root:
                self.fs, self._base = pafs.FileSystem.from_uri(self.root)
            else:
                self.fs, self._base = pafs.LocalFileSystem(), str(Path(self.root).resolve())
        except (pa.ArrowInvalid, OSError) as err:
            raise UserError(f"registry {self.root}: cannot open ({err}); pass a folder or a pyarrow URI") from None
        self._local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Registry({self.root!r})"

    def path(self, name: str) -> str:
        """Where model `name` lives: a local folder, or ROOT_URI/NAME for a remote registry."""
        return self._dir(name) if self._local else f"{self.root.rstrip('/')}/{name}"

    def _dir(self, name: str) -> str:
        """Model `name`'s folder inside the registry's filesystem."""
        if not NAME_PATTERN.match(name):
            raise UserError(f"model name '{name}' is not valid; {NAME_RULE}")
        return f"{self._base}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(f"{self._dir(name)}/{CARD}").type == pafs.FileType.File

    def names(self) -> list[str]:
        """Every model name in the registry, sorted."""
        if self.fs.get_file_info(self._base).type != pafs.FileType.Directory:
            return []
        entries = self.fs.get_file_info(pafs.FileSelector(self._base))
        return sorted(e.base_name for e in entries
                      if e.type == pafs.FileType.Directory and NAME_PATTERN.match(e.base_name)
                      and self.exists(e.base_name))

    def card(self, name: str) -> dict[str, Any]:
        """Model `name`'s card (JSON)."""
        self._require(name)
        with self.fs.open_input_stream(f"{self._dir(name)}/{CARD}") as f:
            return json.loads(f.read().decode())

    def list(self) -> list[dict[str, Any]]:
        """Every model's card, with its name under "name", sorted by name."""
        return [{**self.card(name), "name": name} for name in self.names()]

    def load(self, name: str) -> Artifact:
        """Model `name` with its tokenizer and card, ready for generate()."""
        self._require(name)
        if self._local:
            return _load_folder(Path(self._dir(name)))
        with tempfile.TemporaryDirectory() as tmp:
            pafs.copy_files(self._dir(name), tmp, source_filesystem=self.fs)
            artifact = _load_folder(Path(tmp))  # everything is in memory once loaded
        artifact.path = self.path(name)
        return artifact

    def publish(self, name: str, artifact: str | Path | dict[str, torch.Tensor], *, overwrite: bool = False,
                model_cfg: ModelConfig | None = None, tokenizer: Tokenizer | None = None,
                card: dict[str, Any] | None = None) -> str:
        """Put an artifact into the registry as `name`; returns its path there.

        `artifact` is a folder written by `save_artifact` (copied; `card` entries are merged into its card), or a
        state dict saved directly (then `model_cfg`, `tokenizer` and `card` are required). An existing name is
        refused unless overwrite=True. The copy lands under a temporary name first, so a reader never sees half
        a model.
        """
        target = self._dir(name)
        if self.exists(name) and not overwrite:
            raise UserError(f"model '{name}' already exists in registry {self.root}; pick another --name or pass "
                            "--overwrite")
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / name
            if isinstance(artifact, dict):
                if model_cfg is None or tokenizer is None or card is None:
                    raise TypeError("publishing a state dict needs model_cfg, tokenizer and card")
                save_artifact(staged, artifact, model_cfg, tokenizer, card)
            else:
                source = Path(artifact)
                if not (source / CARD).is_file():
                    raise ModelNotFound(f"no model artifact at {source} (missing {CARD}); pass a folder written "
                                        "by training")
                staged.mkdir()
                for fname in (WEIGHTS, TOKENIZER_FILE):
                    (staged / fname).write_bytes((source / fname).read_bytes())
                (staged / CARD).write_text(json.dumps({**json.loads((source / CARD).read_text()), **(card or {})},
                                                      indent=2, sort_keys=True))
            body = json.loads((staged / CARD).read_text())
            (staged / CARD).write_text(json.dumps({**body, "name": name}, indent=2, sort_keys=True))
            self.fs.create_dir(self._base, recursive=True)
            partial = f"{self._base}/.{name}.{uuid.uuid4().hex[:8]}.partial"
            self.fs.create_dir(partial, recursive=True)
            pafs.copy_files(str(staged), partial, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
            if self.exists(name):
                self.fs.delete_dir(target)
            self.fs.move(partial, target)
        return self.path(name)

    def _require(self, name: str) -> None:
        if self.exists(name):
            return
        known = self.names()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = (f"did you mean {', '.join(repr(c) for c in close)}? " if close
                else f"it holds {', '.join(known[:5])}{' …' if len(known) > 5 else ''}; " if known
                else "it is empty; ")
        raise ModelNotFound(f"unknown model '{name}' in registry {self.root}; {hint}list them with "
                            "`python -m app models list`")


# ---- listing -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelList:
    """The registry's models, one card each (as `app.models()` returns them)."""

    root: str
    cards: list[dict[str, Any]]

    @property
    def domains(self) -> list[str]:
        """Every domain some card has a validation loss for."""
        return sorted({d for c in self.cards for d in (c.get("val_loss_per_domain") or {})})

    def columns(self) -> list[str]:
        return ["name", "params", "MiB", "quantization", *(f"loss {d}" for d in self.domains), "tok/s b1",
                "tok/s b16", "created"]

    def rows(self) -> list[tuple]:
        """One row per model; val losses per domain (blank where the card has none: e.g. a training export)."""
        rows = []
        for c in self.cards:
            q = c.get("quantization")
            backend = (c.get("quantization_config") or {}).get("backend")
            losses = c.get("val_loss_per_domain") or {}
            tps = c.get("tokens_per_s") or {}
            rows.append((c["name"], c.get("parameters"), round(c["bytes"] / 2**20, 2) if c.get("bytes") else "",
                         f"{q} {backend}" if q else "fp32", *(losses.get(d, "") for d in self.domains),
                         *(round(tps[b]) if b in tps else "" for b in ("batch_1", "batch_16")),
                         str(c.get("created", ""))[5:16]
                         .replace("T", " ")))
        return rows

    def _repr_html_(self) -> str:
        return html_table(self.columns(), self.rows())
