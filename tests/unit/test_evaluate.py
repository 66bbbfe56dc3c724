"""Evaluation: per-domain validation loss equals a direct cross-entropy over the same windows, perplexity is its
exponential, decoding speed is measured at batch 1 and 16, and card metrics refuse a mismatched tokenizer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from app.data import load_tokens
from app.errors import DataError
from app.evaluate import card_metrics, evaluate, resolve_domains, tokens_per_second, val_loss
from app.registry import load_artifact
from tests.unit.tiny_models import tiny_setup


@pytest.fixture(scope="module")
def art():
    data, artifact = tiny_setup()
    return data, load_artifact(artifact)


def test_val_loss_is_cross_entropy_over_evenly_spaced_windows(art):
    data, a = art
    stream = load_tokens(data, "val", domains=["docs"])
    loss, count = val_loss(a.model, stream, batches=2, batch_size=4)
    n_windows = (len(stream) - 1) // 64
    ids = np.linspace(0, n_windows - 1, 8).astype(int)
    x = torch.from_numpy(np.stack([stream[i * 64:i * 64 + 64] for i in ids])).long()
    y = torch.from_numpy(np.stack([stream[i * 64 + 1:i * 64 + 65] for i in ids])).long()
    with torch.no_grad():
        _, expected = a.model(x, y)
    assert count == 8 * 64 and loss == pytest.approx(expected.item(), rel=1e-5)


def test_evaluate_reports_domains_perplexity_speed_and_size(art):
    data, a = art
    result = evaluate(a, batches=2)  # data from the card
    assert result.data == str(data) and list(result.val_loss) == ["code", "docs"]
    assert result.val_loss["code"] != result.val_loss["docs"]
    assert result.perplexity["docs"] == pytest.approx(math.exp(result.val_loss["docs"]))
    assert all(3.0 < v < math.log(512) + 0.5 for v in result.val_loss.values())  # trained a little below ln V
    assert set(result.tokens_per_s) == {1, 16} and min(result.tokens_per_s.values()) > 0
    assert result.parameters == 136_960 and result.bytes == a.card["bytes"] and result.quantization is None
    assert dict(result.rows())["perplexity docs"] == round(result.perplexity["docs"], 2)
    one = evaluate(a, domains="code", batches=2, speed=False)
    assert one.val_loss == {"code": result.val_loss["code"]} and one.tokens_per_s == {}
    bare = evaluate(a.model, data, domains="code", batches=2, speed=False)  # a GPT without its artifact
    assert bare.val_loss == one.val_loss and bare.bytes is None


def test_domain_and_tokenizer_mistakes_fail_clearly(art, tmp_path):
    data, a = art
    assert resolve_domains(data, "all") == ["code", "docs"]
    with pytest.raises(DataError, match="--domain poetry is not in .*; available: code, docs, all"):
        resolve_domains(data, "poetry")
    from app.tokenizer import train_tokenizer

    other = train_tokenizer(["a different corpus, so a different tokenizer"] * 3, 300)
    with pytest.raises(DataError, match="tokenized with another tokenizer than the model's"):
        card_metrics(a.model, other, data, batches=1)


def test_card_metrics_fill_the_card_fields(art):
    data, a = art
    metrics = card_metrics(a.model, a.tokenizer, data, batches=1)
    assert set(metrics) == {"val_loss_per_domain", "tokens_per_s", "machine"}
    assert set(metrics["val_loss_per_domain"]) == {"code", "docs"}
    assert set(metrics["tokens_per_s"]) == {"batch_1", "batch_16"}
    assert metrics["machine"]["torch_threads"] == torch.get_num_threads()


def test_tokens_per_second_counts_generated_tokens(art):
    _, a = art
    calls = []
    real = a.model.generate

    def counting(prompt, n, **kw):
        calls.append((prompt.shape, n))
        return real(prompt, n, **kw)

    a.model.generate = counting
    try:
        tps = tokens_per_second(a.model, 4, new_tokens=8, repeats=2)
    finally:
        del a.model.generate
    assert tps > 0 and calls[0][1] == 4 and calls[1:] == [(torch.Size([4, 16]), 8)] * 2  # warm-up, then timed
