"""Evaluating a model: validation loss and perplexity per data domain, generation tokens/s at batch 1 and 16,
and size; also the metrics a model card carries.

    result = evaluate("tiny-int8", "runs/data/demo")     # a registry name, an artifact folder or a loaded model
    result.val_loss["code"], result.tokens_per_s[16]

Validation loss is the mean next-token cross-entropy (nats per token) over a fixed, evenly spaced set of
seq_len windows of one domain's validation split, so two models on the same data see the same tokens.
Tokens/s times KV-cached greedy `generate` of a fixed number of new tokens (no stop ids) after one untimed
warm-up run; the median of three timed runs is kept, because the CPU may be shared.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from app.console import html_table, progress_bar
from app.data import load_tokens, read_manifest, windows
from app.errors import DataError
from app.model import GPT
from app.tokenizer import Tokenizer

SPEED_BATCHES = (1, 16)  # decoding batch sizes the card reports
NEW_TOKENS = 32  # tokens generated per timed run
PROMPT_TOKENS = 16


@dataclass(frozen=True)
class EvalResult:
    """Quality, speed and size of one model on one data folder."""

    model: str
    data: str | None
    parameters: int
    bytes: int | None  # weights file on disk (None for a model that was never saved)
    quantization: str | None
    val_loss: dict[str, float]  # domain -> mean cross-entropy, nats per token
    tokens_evaluated: dict[str, int]  # domain -> tokens the loss averages over
    tokens_per_s: dict[int, float]  # decoding batch size -> generated tokens per second
    machine: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    compiled: bool = False  # decoding ran through torch.compile (GPT.compile_decoding)

    @property
    def perplexity(self) -> dict[str, float]:
        return {d: math.exp(v) for d, v in self.val_loss.items()}

    def rows(self) -> list[tuple[str, object]]:
        rows: list[tuple[str, object]] = [("parameters", self.parameters), ("bytes on disk", self.bytes or ""),
                                          ("quantization", self.quantization or "fp32")]
        for d, loss in self.val_loss.items():
            rows += [(f"val loss {d}", round(loss, 4)), (f"perplexity {d}", round(math.exp(loss), 2))]
        rows += [(f"tokens/s batch {b}", round(v, 1)) for b, v in self.tokens_per_s.items()]
        if self.tokens_per_s:
            rows.append(("decoding", "torch.compile" if self.compiled else "eager"))
        return rows

    def _repr_html_(self) -> str:
        return html_table(["metric", "value"], self.rows())


def resolve_domains(data_dir: str | Path, domains: str | Sequence[str] = "all") -> list[str]:
    """'all' -> every domain in the manifest; a name or list of names is checked against it."""
    available = read_manifest(data_dir).domains
    wanted = available if domains == "all" else [domains] if isinstance(domains, str) else list(domains)
    unknown = [d for d in wanted if d not in available]
    if unknown:
        raise DataError(f"--domain {', '.join(unknown)} is not in {data_dir}; available: {', '.join(available)}, all")
    return wanted


@torch.no_grad()
def val_loss(model: GPT, tokens: np.ndarray, *, batches: int = 8, batch_size: int = 8) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats per token) over up to batches × batch_size evenly spaced windows of
    `tokens`, and the number of tokens it averages over."""
    seq_len = model.cfg.seq_len
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise DataError(f"validation stream of {len(tokens)} tokens is shorter than one window of {seq_len + 1}")
    ids = np.unique(np.linspace(0, n_windows - 1, min(n_windows, batches * batch_size)).astype(np.int64))
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        x, y = windows(tokens, ids[start:start + batch_size], seq_len)
        logits, _ = model(torch.from_numpy(x).long())
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).long().flatten(),
                                                   reduction="sum").item()
        count += y.size
    return total / count, count


@torch.no_grad()
def tokens_per_second(model: GPT, batch_size: int, *, new_tokens: int = NEW_TOKENS, repeats: int = 3) -> float:
    """Generated tokens per second of greedy KV-cached decoding at `batch_size` (median of `repeats` runs)."""
    prompt_len = min(PROMPT_TOKENS, model.cfg.seq_len // 4)
    new_tokens = min(new_tokens, model.cfg.seq_len - prompt_len)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch_size, prompt_len), generator=g)
    model.generate(prompt, min(4, new_tokens), temperature=0)  # warm-up: allocator, kernels, packed weights
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompt, new_tokens, temperature=0)
        times.append(time.perf_counter() - start)
    return batch_size * new_tokens / statistics.median(times)


def _check_tokenizer(tokenizer: Tokenizer | None, data_dir: str | Path) -> None:
    manifest = read_manifest(data_dir)
    if tokenizer is not None and tokenizer.sha256 != manifest.tokenizer_sha256:
        raise DataError(f"{data_dir} was tokenized with another tokenizer than the model's; evaluate on the data "
                        "folder the model was trained on (its card's 'data')")


def measure(model: GPT, tokenizer: Tokenizer | None, data_dir: str | Path | None, *,
            domains: str | Sequence[str] = "all", batches: int = 8, batch_size: int = 8, speed: bool = True,
            label: str = "model") -> tuple[dict[str, float], dict[str, int], dict[int, float]]:
    """(val loss per domain, tokens per domain, tokens/s per batch size) with one progress bar."""
    model.eval()
    wanted = [] if data_dir is None else resolve_domains(data_dir, domains)
    if data_dir is not None:
        _check_tokenizer(tokenizer, data_dir)
    losses, counts, speeds = {}, {}, {}
    with progress_bar(f"eval {label}", len(wanted) + (len(SPEED_BATCHES) if speed else 0)) as bar:
        for domain in wanted:
            bar.update(status=f"val loss {domain}")
            stream = load_tokens(data_dir, "val", domains=[domain])
            losses[domain], counts[domain] = val_loss(model, stream, batches=batches, batch_size=batch_size)
            bar.advance()
        for b in SPEED_BATCHES if speed else ():
            bar.update(status=f"tokens/s at batch {b}")
            speeds[b] = tokens_per_second(model, b)
            bar.advance()
    return losses, counts, speeds


def card_metrics(model: GPT, tokenizer: Tokenizer, data_dir: str | Path, *, batches: int = 8) -> dict[str, Any]:
    """The model card's measured fields: val_loss_per_domain (every domain of `data_dir`), tokens_per_s at
    batch 1 and 16 (on this machine), and the machine. Merge the result into the card given to save_artifact."""
    from app.registry import machine

    losses, _, speeds = measure(model, tokenizer, data_dir, batches=batches)
    return {"val_loss_per_domain": {d: round(v, 5) for d, v in losses.items()},
            "tokens_per_s": {f"batch_{b}": round(v, 1) for b, v in speeds.items()},
            "machine": machine()}


def evaluate(model_or_name, data_dir: str | Path | None = None, *, domains: str | Sequence[str] = "all",
             batches: int = 8, batch_size: int = 8, registry: str | None = None, speed: bool = True,
             compile: bool = False) -> EvalResult:
    """Evaluate a model: a registry name, an artifact folder, an `Artifact` already loaded, or a bare `GPT`
    (then pass data_dir; its tokenizer is not checked against the data's).

    data_dir defaults to the folder in the model's card ('data'); domains: 'all', one name, or a list.
    batches × batch_size validation windows per domain bound the cost (default 64 windows). compile=True
    measures the model as `GPT.compile_decoding` runs it (the first calls compile: the untimed warm-ups pay that).
    """
    from app.registry import Artifact, load_artifact, machine

    start = time.perf_counter()
    if isinstance(model_or_name, GPT):
        model_or_name = Artifact("<in memory>", model_or_name, None, {})
    artifact = model_or_name if isinstance(model_or_name, Artifact) else load_artifact(model_or_name, registry)
    card = artifact.card
    data_dir = data_dir or card.get("data")
    if data_dir is None:
        raise DataError("the model's card names no data folder; pass --data DIR (a prepared data set)")
    label = card.get("name") or str(model_or_name if not isinstance(model_or_name, Artifact) else artifact.path)
    if compile and not artifact.model.compiled:
        artifact.model.compile_decoding()
    losses, counts, speeds = measure(artifact.model, artifact.tokenizer, data_dir, domains=domains,
                                     batches=batches, batch_size=batch_size, speed=speed, label=label)
    return EvalResult(model=label, data=str(data_dir), parameters=card.get("parameters")
                      or artifact.model.num_params(non_embedding=False), bytes=card.get("bytes"),
                      quantization=card.get("quantization"), val_loss=losses, tokens_evaluated=counts,
                      tokens_per_s=speeds, machine=machine(), seconds=time.perf_counter() - start,
                      compiled=artifact.model.compiled)
