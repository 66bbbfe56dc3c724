"""Quantize a model and publish it to the registry: load → (QAT fine-tune) → quantize → evaluate before and
after → save an artifact whose card carries the measurements and the lineage.

In-process torch (no Ray: quantizing a model of this size takes seconds on one machine).
`python -m pipelines.quantize MODEL --method int8` is `python -m app quantize ...`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.console import html_table, progress_bar
from app.errors import UserError
from app.evaluate import EvalResult, measure
from app.quantize import QuantizeError, check_method, check_qat_steps, qat_finetune, quantize, quantized_state_dict
from app.registry import CARD, Artifact, Registry, load_artifact, machine


@dataclass(frozen=True)
class QuantizeResult:
    """A quantized model in the registry and its measurements next to its fp32 parent's; for QAT also next to
    plain PTQ of the parent and to PTQ after the same fine-tuning without fake quantization (the control)."""

    name: str
    path: str
    method: str
    backend: str
    fallback: str | None
    before: EvalResult
    after: EvalResult
    compared: dict[str, EvalResult] = field(default_factory=dict)  # QAT only: label -> result, in column order
    qat_losses: list[float] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> list[str]:
        last = "QAT int8" if self.method == "qat" else self.method
        return ["metric", "fp32", *self.compared, last, f"{last} vs fp32"]

    def rows(self) -> list[tuple]:
        """bytes, val loss per domain and tokens/s per batch size for fp32, (the QAT comparisons,) the result, and
        the result's ratio to fp32."""
        results = [self.before, *self.compared.values(), self.after]
        first, last = self.before, self.after
        rows = [("bytes on disk", *(r.bytes for r in results),
                 f"{last.bytes / first.bytes:.2f}×" if first.bytes and last.bytes else "")]
        for d in first.val_loss:
            change = (last.val_loss[d] - first.val_loss[d]) / first.val_loss[d]
            rows.append((f"val loss {d}", *(round(r.val_loss[d], 4) for r in results), f"{change:+.3%}"))
        for b in first.tokens_per_s:
            rows.append((f"tokens/s batch {b}", *(round(r.tokens_per_s[b]) for r in results),
                         f"{last.tokens_per_s[b] / first.tokens_per_s[b]:.2f}×"))
        rows.append(("backend", "", *([self.backend] * len(self.compared)), self.backend, ""))
        return rows

    def _repr_html_(self) -> str:
        return html_table(self.columns(), self.rows())


def _parent(model: str, artifact: Artifact) -> tuple[str, str]:
    """(a short name for default output names, the reference lineage records: the registry name or the folder)."""
    card = artifact.card
    if not (Path(model) / CARD).is_file():
        return model, model  # loaded by registry name
    path = Path(model)
    short = card.get("name") or card.get("source_run") or (path.parent.name if path.name == "artifact" else path.name)
    return short, str(path.resolve())


def _eval(artifact_model, tokenizer, data, batches: int, label: str, parameters: int, nbytes: int | None,
          quantization: str | None) -> EvalResult:
    start = time.perf_counter()
    losses, counts, speeds = measure(artifact_model, tokenizer, data, batches=batches, label=label)
    return EvalResult(model=label, data=str(data), parameters=parameters, bytes=nbytes, quantization=quantization,
                      val_loss=losses, tokens_evaluated=counts, tokens_per_s=speeds, machine=machine(),
                      seconds=time.perf_counter() - start)


def run(model: str, method: str = "int8", *, name: str | None = None, registry: str | None = None,
        data: str | Path | None = None, backend: str = "auto", steps: int = 50, lr: float = 1e-4,
        batch_size: int = 8, batches: int = 8, overwrite: bool = False) -> QuantizeResult:
    """Quantize `model` (a registry name or artifact folder) with `method` and publish it as `name` (default
    PARENT-METHOD). `data` (default: the parent card's data folder) gives validation loss per domain and, for
    method "qat", the training tokens of `steps` fine-tuning steps at learning rate `lr`."""
    from app.data import load_tokens

    check_method(method, backend)
    if method == "qat":
        check_qat_steps(steps)  # before the evaluation and the fine-tuning start
    reg = Registry(registry)
    parent = load_artifact(model, registry)
    if parent.card.get("quantization"):
        of = (parent.card.get("lineage") or {}).get("parent")
        raise QuantizeError(f"model {model} is already quantized ({parent.card['quantization']}); quantize its fp32 "
                            f"parent{f' {of}' if of else ''} instead")
    parent_name, parent_ref = _parent(str(model), parent)
    name = name or f"{parent_name}-{method}"
    if reg.exists(name) and not overwrite:  # fail before minutes of work, not after
        raise UserError(f"model '{name}' already exists in registry {reg.root}; pick another --name or pass "
                        "--overwrite")
    data = data or parent.card.get("data")
    if data is None:
        raise UserError(f"the card of {model} names no data folder; pass --data DIR (a prepared data set)")
    params = parent.card.get("parameters") or parent.model.num_params(non_embedding=False)
    before = _eval(parent.model, parent.tokenizer, data, batches, f"{parent_name} fp32", params,
                   parent.card.get("bytes"), None)

    compared, losses, source = {}, [], parent.model
    if method == "qat":
        tokens = load_tokens(data, "train")
        ptq_model, ptq_spec = quantize(parent.model, "int8", backend)
        compared["PTQ int8"] = _eval(ptq_model, parent.tokenizer, data, batches, f"{parent_name} PTQ", params, None,
                                     ptq_spec.method)
        for label, fake_quant in (("fine-tune + PTQ", False), ("QAT", True)):
            with progress_bar(f"{label} fine-tuning", steps) as bar:
                tuned, tuned_losses = qat_finetune(
                    parent.model, tokens, steps=steps, lr=lr, batch_size=batch_size, fake_quant=fake_quant,
                    on_step=lambda s, loss: (bar.advance(), bar.update(status=f"loss {loss:.3f}")))
            if fake_quant:
                source, losses = tuned, tuned_losses
            else:  # the control: the same steps and samples without fake quantization, then the same PTQ
                control, control_spec = quantize(tuned, "int8", backend)
                compared["fine-tune + PTQ"] = _eval(control, parent.tokenizer, data, batches, f"{parent_name} control",
                                                    params, None, control_spec.method)
    qmodel, spec = quantize(source, "int8" if method == "qat" else method, backend)
    after = _eval(qmodel, parent.tokenizer, data, batches, name, params, None, spec.method)

    lineage = {**(parent.card.get("lineage") or {}), "parent": parent_ref, "config_hash": parent.card.get("config_hash")}
    card = {
        **{k: parent.card[k] for k in ("source_run", "config_hash", "step", "data") if k in parent.card},
        "data": str(data),
        "parameters": params,
        "quantization": spec.method,
        "quantization_config": {**spec.to_card(),
                                "qat": {"steps": steps, "lr": lr, "batch_size": batch_size,
                                        "first_loss": losses[0], "last_loss": losses[-1]} if losses else None},
        "val_loss_per_domain": {d: round(v, 5) for d, v in after.val_loss.items()},
        "tokens_per_s": {f"batch_{b}": round(v, 1) for b, v in after.tokens_per_s.items()},
        "machine": after.machine,
        "lineage": lineage,
    }
    path = reg.publish(name, quantized_state_dict(qmodel, spec), model_cfg=parent.model.cfg,
                       tokenizer=parent.tokenizer, card=card, overwrite=overwrite)
    final_card = reg.card(name)
    after = EvalResult(**{**after.__dict__, "bytes": final_card["bytes"]})
    # The comparison models are not saved; theirs would be the same size (same layers, same int8 layout).
    compared = {k: EvalResult(**{**r.__dict__, "bytes": final_card["bytes"]}) for k, r in compared.items()}
    return QuantizeResult(name=name, path=path, method=method, backend=spec.backend, fallback=spec.fallback,
                          before=before, after=after, compared=compared, qat_losses=losses, card=final_card)


def main(argv=None) -> int:
    import sys

    from app.__main__ import main as app_main

    return app_main(["quantize", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
