"""Quantizing the GPT: post-training int8 (dynamic activations + int8 weights), int8 weight-only and int4
weight-only with torchao, quantization-aware fine-tuning (torchao QAT), and quantized weights as plain tensors so
an artifact stays safetensors and rebuilds bit-identically.

What is quantized: every ``nn.Linear`` — the attention and MLP projections and the output head. The token and
position embeddings stay fp32: a lookup costs no matmul, so int8 there would only lose accuracy. The head's weight
is tied to the token embedding; quantizing it gives the head its own int8 copy (+V·D bytes, a quarter of the
fp32 table) because on this CPU the head is a large share of decoding time.

Backends. ``int8`` runs on torch.ao's fbgemm dynamic quantization by default: on x86 CPUs torchao 0.18's int8
path is an eager ``torch._int_mm`` that decodes 2–6× *slower* than fp32 here, while fbgemm's prepacked int8 GEMM
is faster than fp32 at the `small` preset's width (README, "Models"). ``backend="torchao"`` picks torchao anyway.
``int8-weight-only`` exists only in torchao. ``int4`` uses torchao's ``Int4WeightOnlyConfig`` where one of its
kernels runs (CUDA, the mslk kernels or ARM KleidiAI); elsewhere — a plain x86 CPU — ``auto`` falls back to torch's
own CPU int4 kernel (backend ``aten``: ``_weight_int4pack_mm_for_cpu``, asymmetric int4 per group of 32 weights,
`Int4Linear`, with bf16 activations: the kernel's vectorised path) and says why (``QuantSpec.fallback``). A
torchao failure for ``int8`` on this machine falls back to torch.ao and says so.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from app.errors import UserError
from app.model import GPT

# CLI method name -> what the model card calls the result.
METHODS = {"int8": "int8-dynamic", "int8-weight-only": "int8-weight-only", "int4": "int4-weight-only",
           "qat": "int8-dynamic"}
BACKENDS = ("auto", "torchao", "torch.ao", "aten")
INT4_GROUP_SIZE = 32  # weights per int4 scale; divides every width the presets use
_PARTS = ("qdata", "scale", "zero_point")  # names of a quantized weight's stored tensors: LAYER.weight.PART
_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default  # fbgemm's dynamic int8 linear, resolved once


class QuantizeError(UserError):
    """A quantization request that cannot be met: unknown method, already quantized, no kernel on this machine."""


@dataclass(frozen=True)
class QuantSpec:
    """How a model was quantized: enough to rebuild its modules from stored tensors."""

    method: str  # "int8-dynamic" | "int8-weight-only" | "int4-weight-only"
    backend: str  # "torchao" | "torch.ao" | "aten" (int4 only)
    layers: tuple[str, ...]  # fully-qualified names of the quantized nn.Linear modules
    fallback: str | None = None  # why the requested backend did not run, when another one did
    storage: str = field(default="")  # how the weights sit in model.safetensors (for readers of the card)

    def to_card(self) -> dict:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_card(cls, raw: dict) -> "QuantSpec":
        """The spec inside a card's quantization_config (which may carry more, e.g. the QAT settings)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names and k != "layers"}, layers=tuple(raw["layers"]))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchao logs that its CUDA-only extensions did not load and torch.ao warns that it is deprecated: both are
    noise on a CPU machine, so they are kept off the user's terminal."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class Int4Linear(nn.Module):
    """A Linear with int4 weights for torch's CPU kernel: per group of INT4_GROUP_SIZE input weights, q in 0..15
    with w ≈ (q − 8)·scale + zero. Stores the plain values (two 4-bit values per byte, the first in the high
    nibble) for the artifact, and the kernel's packed copy, made from them on load."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qdata.shape[0], 2 * qdata.shape[1]
        self.register_buffer("qdata", qdata.contiguous())  # uint8 [out, in / 2]
        self.register_buffer("scale", scale.contiguous())  # fp32 [out, in / group]
        self.register_buffer("zero_point", zero_point.contiguous())  # fp32 [out, in / group]
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        values = torch.stack([qdata >> 4, qdata & 15], dim=-1).reshape(self.out_features, self.in_features)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.int(), 8),
                             persistent=False)
        # [in / group, out, 2], the kernel's layout, in bf16: with bf16 activations the kernel takes its vectorised
        # path (on this CPU ~20x faster than with fp32 ones, and faster than the fp32 GEMM)
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero_point], -1).transpose(0, 1)
                             .to(torch.bfloat16).contiguous(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        w = linear.weight.detach().float()
        out_f, in_f = w.shape
        if in_f % INT4_GROUP_SIZE or out_f % 16:
            raise QuantizeError(f"--method int4 on CPU needs layers with a multiple of {INT4_GROUP_SIZE} inputs and "
                                f"of 16 outputs (torch's kernel); one has {in_f} inputs and {out_f} outputs: use "
                                "int8, or a model whose widths and vocabulary are multiples of 32")
        groups = w.reshape(out_f, in_f // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        values = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
        values = values.reshape(out_f, in_f)
        qdata = (values[:, 0::2] << 4) | values[:, 1::2]
        return cls(qdata, scale, low + 8 * scale, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, INT4_GROUP_SIZE, self.scales_and_zeros)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={INT4_GROUP_SIZE}"


class Int8DynamicLinear(DynamicLinear):
    """torch.ao's dynamic int8 Linear with a leaner forward: the same fbgemm op on the same packed weights, called
    through its resolved overload. torch.ao's forward re-reads the packed params' dtype and goes through the op
    packet's Python dispatch checks on every call: ~11 µs a layer, ~8% of a 3-layer student's decode step at
    batch 1 (measured on this CPU, outputs identical). `quantize_dynamic` builds it (our mapping), so it is a
    DynamicLinear in every other respect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # qint8 weights, reduce_range=True (torch.ao's version-4 modules): what DynamicLinear.forward runs
        return _LINEAR_DYNAMIC(x, self._packed_params._packed_params, True)


def linear_layers(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's nn.Linear modules (attention, MLP and the output head), in module order."""
    return tuple(name for name, mod in model.named_modules() if type(mod) is nn.Linear)


def is_quantized(model: nn.Module) -> bool:
    """True when any module is a torch.ao quantized module or holds a torchao quantized weight."""
    with _quiet():
        from torchao.utils import TorchAOBaseTensor
    return any(isinstance(m, (DynamicLinear, Int4Linear)) or isinstance(getattr(m, "weight", None), TorchAOBaseTensor)
               for m in model.modules())


def _torchao_config(method: str):
    with _quiet():
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
        )
    if method == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if method == "int8-weight-only":
        return Int8WeightOnlyConfig()
    return Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE)


def _apply(model: GPT, method: str, backend: str, layers: tuple[str, ...]) -> GPT:
    """Quantize `layers` of `model` with one backend (in place for torchao; torch.ao swaps modules)."""
    wanted = set(layers)
    if backend == "aten":
        for name in layers:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Int4Linear.from_linear(getattr(parent, child)))
        return model
    with _quiet():
        if backend == "torchao":
            from torchao.quantization import quantize_

            quantize_(model, _torchao_config(method), filter_fn=lambda mod, fqn: fqn in wanted)
            return model
        # Per-channel int8 weights (one scale per output row) like torchao's PerRow; activations are quantized
        # per tensor at run time by fbgemm.
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return torch.ao.quantization.quantize_dynamic(model, {name: qconfig for name in layers}, dtype=torch.qint8,
                                                      mapping={nn.Linear: Int8DynamicLinear})


@functools.lru_cache(maxsize=None)
def _int4_unavailable() -> str | None:
    """Why torchao's int4 weight-only cannot run here (None when one of its layouts does). Probed once per
    process: check_method and quantize both ask."""
    with _quiet():
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
        from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

    reasons = []
    for fmt in Int4PackingFormat:
        probe = nn.Sequential(nn.Linear(2 * INT4_GROUP_SIZE, 8))
        try:
            with _quiet():
                quantize_(probe, Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format=fmt))
                probe(torch.zeros(1, 2 * INT4_GROUP_SIZE))
            return None
        except Exception as err:  # each layout fails in its own way: ImportError, AssertionError, NotImplementedError
            reasons.append(f"{fmt.value}: {str(err).splitlines()[0][:80]}")
    return "; ".join(reasons)


@functools.lru_cache(maxsize=None)
def _aten_int4_unavailable() -> str | None:
    """Why torch's own CPU int4 kernel cannot run here (None when it does). Probed once per process."""
    try:
        probe = Int4Linear.from_linear(nn.Linear(2 * INT4_GROUP_SIZE, 16))
        probe(torch.zeros(1, 2 * INT4_GROUP_SIZE))
        return None
    except Exception as err:  # an old torch without the op, or a build without it
        return f"aten: {str(err).splitlines()[0][:80]}"


def _int4_backend(backend: str) -> tuple[str, str | None]:
    """(the backend that runs int4 here, why it is not torchao when auto fell back) for the requested backend
    ("auto", "torchao" or "aten"); QuantizeError in one line when it cannot run."""
    torchao_why = None if backend == "aten" else _int4_unavailable()
    if torchao_why is None and backend != "aten":
        return "torchao", None
    aten_why = _aten_int4_unavailable()
    if aten_why is None and backend != "torchao":
        if backend == "aten":
            return "aten", None
        return "aten", f"torchao {_torchao_version()} has no int4 kernel here ({torchao_why})"
    why = "; ".join(w for w in (torchao_why, aten_why) if w)
    hint = "use --backend auto or aten" if aten_why is None else "methods that run here: int8, int8-weight-only, qat"
    raise QuantizeError(f"--method int4 --backend {backend}: no int4 weight-only kernel for it on this machine "
                        f"(torchao {_torchao_version()} needs CUDA, mslk or ARM KleidiAI; {why}); {hint}")


def check_method(method: str, backend: str = "auto") -> None:
    """Fail (one line) unless `method` with `backend` can run on this machine; cheap, so callers check first."""
    if method not in METHODS:
        raise QuantizeError(f"unknown quantization method '{method}'; choose one of {', '.join(METHODS)}")
    if backend not in BACKENDS:
        raise QuantizeError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if METHODS[method] != "int8-dynamic" and backend == "torch.ao":
        raise QuantizeError(f"--method {method} exists only in torchao; use --backend torchao or auto")
    if backend == "aten" and METHODS[method] != "int4-weight-only":
        raise QuantizeError(f"--backend aten is torch's CPU int4 kernel; for --method {method} use auto, torchao "
                            "or torch.ao")
    if METHODS[method] == "int4-weight-only":
        _int4_backend(backend)


def quantize(model: GPT, method: str, backend: str = "auto") -> tuple[GPT, QuantSpec]:
    """A quantized copy of fp32 `model` (left untouched) and the spec that rebuilds it.

    method: "int8" (dynamic int8 activations + int8 weights), "int8-weight-only", "int4" (int4 weight-only);
    "qat" is `qat_finetune` followed by "int8". backend: "auto" (torch.ao for int8, torchao otherwise, and for
    int4 torch's own CPU kernel where torchao has none), "torchao", "torch.ao" or "aten" (int4 only).
    """
    if method == "qat":
        raise QuantizeError("qat fine-tunes before quantizing: call qat_finetune, then quantize(model, 'int8')")
    check_method(method, backend)
    if is_quantized(model):
        raise QuantizeError("the model is already quantized; quantize its fp32 parent instead")
    card_method = METHODS[method]
    chosen = ("torch.ao" if card_method == "int8-dynamic" else "torchao") if backend == "auto" else backend
    fallback = None
    if card_method == "int4-weight-only":
        chosen, fallback = _int4_backend(backend)
    layers = linear_layers(model)
    try:
        qmodel = _apply(copy.deepcopy(model), card_method, chosen, layers)
        with torch.no_grad():
            qmodel(torch.zeros(1, 2, dtype=torch.long))  # a kernel that cannot run here fails now, not later
    except Exception as err:
        if chosen != "torchao" or card_method != "int8-dynamic":
            raise
        fallback = f"torchao failed on this machine ({type(err).__name__}: {str(err).splitlines()[0][:100]})"
        chosen = "torch.ao"
        qmodel = _apply(copy.deepcopy(model), card_method, chosen, layers)
    qmodel.eval()
    return qmodel, QuantSpec(card_method, chosen, layers, fallback, _storage(qmodel, chosen, layers[0]))


def _torchao_version() -> str:
    from importlib.metadata import version

    return version("torchao")


def _storage(qmodel: GPT, backend: str, layer: str) -> str:
    """How the quantized weights sit in model.safetensors, in words, for the card."""
    if backend == "torch.ao":
        return ("LAYER.weight.qdata (int8) + .scale + .zero_point (per output channel) in model.safetensors; "
                "rebuilt as torch.ao dynamic quantized Linear modules")
    if backend == "aten":
        return (f"LAYER.weight.qdata (uint8, two int4 values per byte) + .scale + .zero_point (fp32, per group of "
                f"{INT4_GROUP_SIZE} inputs) in model.safetensors; rebuilt as Int4Linear for torch's CPU int4 kernel")
    module = dict(qmodel.named_modules())[layer]
    weight, parts = module.weight, ", ".join(sorted(_weight_parts(module, backend)))
    return (f"LAYER.weight.{{{parts}}} (the data tensors of torchao's {type(weight).__name__}, qdata {weight.qdata.dtype}"
            f") in model.safetensors; rebuilt by quantize_ then filled with the stored values")


# ---- quantized weights <-> plain tensors ---------------------------------------------------------------------


def _weight_parts(mod: nn.Module, backend: str) -> dict[str, torch.Tensor]:
    if backend == "aten":
        return {"qdata": mod.qdata, "scale": mod.scale, "zero_point": mod.zero_point}
    if backend == "torch.ao":
        w = mod.weight()  # a per-channel quantized tensor
        return {"qdata": w.int_repr(), "scale": w.q_per_channel_scales(),
                "zero_point": w.q_per_channel_zero_points()}
    w = mod.weight  # a torchao tensor subclass: its data tensors are plain tensors
    names = [*w.tensor_data_names, *getattr(w, "optional_tensor_data_names", [])]
    assert set(names) <= {*_PARTS, "act_quant_scale", "act_quant_zero_point", "act_pre_scale"}, names
    return {n: getattr(w, n) for n in names if getattr(w, n, None) is not None}


def quantized_state_dict(model: GPT, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Plain tensors for safetensors: fp32 parameters under their usual names, and for each quantized layer
    LAYER.weight.qdata / .scale (/ .zero_point) and LAYER.bias."""
    layers = set(spec.layers)
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if name in layers:
            out.update({f"{name}.weight.{k}": v.detach() for k, v in _weight_parts(mod, spec.backend).items()})
            bias = mod.bias() if spec.backend == "torch.ao" else mod.bias
            if bias is not None:
                out[f"{name}.bias"] = bias.detach()
        elif not any(name.startswith(layer + ".") for layer in layers):  # torch.ao's packed-params child
            out.update({f"{name}.{k}" if name else k: p.detach() for k, p in mod.named_parameters(recurse=False)})
    return out


def restore(model: GPT, tensors: dict[str, torch.Tensor], spec: QuantSpec) -> GPT:
    """Rebuild the quantized model from a fresh fp32 `model` of the right shape and `quantized_state_dict`'s
    tensors. The quantized modules get exactly the stored integers and scales, so outputs are identical."""
    from app.registry import TIED_NAME

    is_part = tuple(f".weight.{p}" for p in _PARTS)
    fp32 = {k: v for k, v in tensors.items() if not k.endswith(is_part)}
    missing, unexpected = model.load_state_dict(fp32, strict=False)
    assert not unexpected and set(missing) <= {f"{n}.weight" for n in spec.layers} | {TIED_NAME}, (missing,
                                                                                                    unexpected)
    if spec.backend == "aten":  # built straight from the stored values
        for name in spec.layers:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Int4Linear(*(tensors[f"{name}.weight.{p}"] for p in _PARTS),
                                              tensors.get(f"{name}.bias")))
        return model.eval()
    model = _apply(model, spec.method, spec.backend, spec.layers)
    modules = dict(model.named_modules())
    for name in spec.layers:
        mod = modules[name]
        stored = {p: tensors[f"{name}.weight.{p}"] for p in _PARTS if f"{name}.weight.{p}" in tensors}
        if spec.backend == "torch.ao":
            qweight = torch._make_per_channel_quantized_tensor(stored["qdata"], stored["scale"],
                                                               stored["zero_point"], 0)
            mod.set_weight_bias(qweight, mod.bias())
        else:
            current = _weight_parts(mod, spec.backend)
            assert current.keys() == stored.keys(), (name, current.keys(), stored.keys())
            with torch.no_grad():
                for part, value in stored.items():
                    current[part].copy_(value)
    return model.eval()


# ---- quantization-aware fine-tuning --------------------------------------------------------------------------


def check_qat_steps(steps: int) -> None:
    """QAT fine-tunes: refuse zero or negative steps (the CLI's --steps) in one line."""
    if steps < 1:
        raise QuantizeError(f"--steps {steps}: QAT needs at least one training step")


def qat_finetune(model: GPT, tokens: np.ndarray, *, steps: int, lr: float = 1e-4, batch_size: int = 8,
                 seed: int = 0, fake_quant: bool = True,
                 on_step: Callable[[int, float], None] | None = None) -> tuple[GPT, list[float]]:
    """Fine-tune a copy of fp32 `model` for `steps` AdamW steps on `tokens` (a training token stream) with torchao
    fake quantization in every Linear: int8 per-token activations and int8 per-channel weights, the numerics of
    the int8 dynamic PTQ that follows. Returns the fine-tuned fp32 model (fake quantization removed; pass it to
    `quantize(..., "int8")`) and the training loss of each step.

    fake_quant=False runs the same steps on the same samples without fake quantization: the control that tells
    what QAT adds beyond the extra training."""
    from app.data import GlobalOrder, windows

    check_qat_steps(steps)
    if is_quantized(model):
        raise QuantizeError("the model is already quantized; fine-tune its fp32 parent instead")
    with _quiet():
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    model = copy.deepcopy(model)
    layers = set(linear_layers(model))
    if fake_quant:
        act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
        weight = IntxFakeQuantizeConfig(torch.int8, "per_channel")
        with _quiet():
            quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"),
                      filter_fn=lambda mod, fqn: fqn in layers)
    seq_len = model.cfg.seq_len
    order = GlobalOrder.for_stream(seed, len(tokens), seq_len)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        x, y = windows(tokens, order.batch_ids(step, batch_size), seq_len)
        _, loss = model(torch.from_numpy(x).long(), torch.from_numpy(y).long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    if fake_quant:
        with _quiet():
            quantize_(model, QATConfig(step="convert"), filter_fn=None)  # FakeQuantizedLinear -> nn.Linear
    assert set(linear_layers(model)) == layers, "convert turns every fake-quantized layer back into nn.Linear"
    return model, losses
