"""Unit tests for app/model.py: shapes and loss, causality, KV-cache generation, sampling, counts, pipeline layers."""

from __future__ import annotations

import math

import pytest
import torch

from app.config import ModelConfig
from app.model import GPT, pipeline_loss, sample_next_token

V, SEQ = 97, 32


def make_cfg(**changes: object) -> ModelConfig:
    fields = dict(vocab_size=V, seq_len=SEQ, n_layer=2, n_head=4, d_model=64, mlp_ratio=4, dropout=0.0, bias=True)
    fields.update(changes)
    return ModelConfig(**fields)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(make_cfg()).eval()


@pytest.fixture(scope="module")
def sharp() -> GPT:
    """At init greedy decoding repeats one token, which would hide a cache that mixes up positions; weight
    matrices ten times larger give confident, varied predictions."""
    torch.manual_seed(0)
    gpt = GPT(make_cfg()).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            if p.ndim == 2:
                p.mul_(10)
    return gpt


def prompts(batch: int = 2, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy_by_recompute(model: GPT, idx: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference decoder: no cache, the whole sequence goes through forward at every step."""
    for _ in range(steps):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_forward_shapes_and_initial_loss(model: GPT) -> None:
    idx = prompts(3, 16)
    targets = prompts(3, 16, seed=2)
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, V)
    assert loss is not None and loss.ndim == 0 and torch.isfinite(loss)
    # Small init makes the first prediction close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(V)) < 0.3
    assert model(idx)[1] is None


def test_loss_skips_ignore_index(model: GPT) -> None:
    idx, targets = prompts(2, 8), prompts(2, 8, seed=2)
    masked = targets.clone()
    masked[:, :4] = -100
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, V), targets[:, 4:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_backward_reaches_tied_weight() -> None:
    torch.manual_seed(0)
    gpt = GPT(make_cfg(dropout=0.1))
    _, loss = gpt(prompts(2, 8), prompts(2, 8, seed=2))
    loss.backward()
    assert gpt.embed.wte.weight.grad is not None and gpt.embed.wte.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in gpt.parameters())


def test_init_scales_residual_projections(model: GPT) -> None:
    block = model.blocks[0]
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(model.embed.wte.weight.std().item() - 0.02) < 0.002
    residual_std = 0.02 / math.sqrt(2 * model.cfg.n_layer)
    for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
        assert abs(w.std().item() - residual_std) < 0.001
    assert (block.mlp.c_fc.bias == 0).all()


@pytest.mark.parametrize("t", [0, 3, 10, 20])
def test_causality(model: GPT, t: int) -> None:
    idx = prompts(2, 24)
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % V
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1], atol=1e-6)  # the change does reach position t+1


@pytest.mark.parametrize("which", ["model", "sharp"])
def test_cached_logits_match_full_forward(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    idx = prompts(2, 20)
    full, _ = model(idx)
    cache = model.new_kv_cache(2)
    prefill, _ = model(idx[:, :8], kv_cache=cache)  # prefill from 0 (is_causal path)
    chunk, _ = model(idx[:, 8:12], kv_cache=cache, start_pos=8)  # chunk after cached positions (shifted mask)
    steps = [model(idx[:, p : p + 1], kv_cache=cache, start_pos=p)[0] for p in range(12, 20)]  # one token each
    cached = torch.cat([prefill, chunk, *steps], dim=1)
    assert cached.shape == full.shape
    assert torch.allclose(cached, full, atol=1e-5, rtol=1e-5)


def test_kv_cache_generation_equals_recompute(sharp: GPT) -> None:
    idx = prompts(2, 5)
    out = sharp.generate(idx, max_new_tokens=12, temperature=0)
    assert out.shape == (2, 17)
    assert torch.equal(out[:, :5], idx)
    assert torch.equal(out, greedy_by_recompute(sharp, idx, 12))


def test_generate_fills_context_exactly(sharp: GPT) -> None:
    idx = prompts(1, 4)
    out = sharp.generate(idx, max_new_tokens=SEQ - 4, temperature=0)
    assert torch.equal(out, greedy_by_recompute(sharp, idx, SEQ - 4))


def test_stop_ids_end_early_and_pad(sharp: GPT) -> None:
    idx = prompts(2, 5, seed=3)
    greedy = sharp.generate(idx, max_new_tokens=12, temperature=0)[:, 5:]  # [2, 12] new tokens, no stops
    stop_ids = (int(greedy[0, 3]), int(greedy[1, 0]))
    first_stop = [next(i for i, tok in enumerate(row.tolist()) if tok in stop_ids) for row in greedy]
    assert first_stop[0] != first_stop[1], "pick other prompts: both rows would stop at the same step"
    out = sharp.generate(idx, max_new_tokens=12, temperature=0, stop_ids=stop_ids)[:, 5:]
    assert out.shape[1] == max(first_stop) + 1 < 12
    for row, stop_at in enumerate(first_stop):
        assert torch.equal(out[row, : stop_at + 1], greedy[row, : stop_at + 1])
        assert (out[row, stop_at:] == greedy[row, stop_at]).all()  # padded with its own stop id


def test_stop_id_never_hit_runs_to_max(sharp: GPT) -> None:
    idx = prompts(2, 5)
    greedy = sharp.generate(idx, max_new_tokens=6, temperature=0)
    unused = next(tok for tok in range(V) if tok not in greedy[:, 5:].tolist()[0] + greedy[:, 5:].tolist()[1])
    assert torch.equal(sharp.generate(idx, max_new_tokens=6, temperature=0, stop_ids=[unused]), greedy)


def test_top_k_1_and_tiny_top_p_are_greedy(sharp: GPT) -> None:
    idx = prompts(2, 5)
    greedy = sharp.generate(idx, max_new_tokens=10, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sharp.generate(idx, max_new_tokens=10, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(sharp.generate(idx, max_new_tokens=10, temperature=1.0, top_p=1e-6, generator=g), greedy)


def test_top_k_and_top_p_filter_the_tail() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(2000, 4)  # probabilities 0.5, 0.3, 0.15, 0.05
    g = torch.Generator().manual_seed(0)
    top_k = sample_next_token(logits, 1.0, 2, None, g)
    assert set(top_k.tolist()) == {0, 1}
    # Nucleus 0.75: {0} holds 0.5 < 0.75, {0, 1} holds 0.8 >= 0.75, so tokens 2 and 3 are cut.
    top_p = sample_next_token(logits, 1.0, None, 0.75, g)
    assert set(top_p.tolist()) == {0, 1}
    assert 0.55 < (top_p == 0).float().mean().item() < 0.70  # renormalised: 0.5 / 0.8 = 0.625
    assert set(sample_next_token(logits, 1.0, None, None, g).tolist()) == {0, 1, 2, 3}


def test_seeded_sampling_is_reproducible(model: GPT) -> None:
    idx = prompts(2, 5)

    def sample(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return model.generate(idx, max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, generator=g)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))  # the generator, not a global seed, drives sampling


def test_param_count_closed_form() -> None:
    for bias in (True, False):
        cfg = make_cfg(bias=bias, n_layer=3, d_model=48, n_head=3)
        d, L = cfg.d_model, cfg.n_layer
        # Per block: c_attn 3d^2, attn c_proj d^2, c_fc 4d^2, mlp c_proj 4d^2 = 12d^2 weights.
        # With bias: 2 LayerNorms (2d each) + biases 3d + d + 4d + d = 13d; plus ln_f (2d).
        # Without bias: 2 LayerNorm weights (d each) per block; plus ln_f weight (d).
        expected = L * (12 * d * d + 13 * d) + 2 * d if bias else L * (12 * d * d + 2 * d) + d
        gpt = GPT(cfg)
        assert gpt.num_params() == expected
        assert gpt.num_params(non_embedding=False) == expected + cfg.vocab_size * d + cfg.seq_len * d
        # The head shares the embedding matrix, so it adds nothing to either count.
        assert gpt.head.lm_head.weight is gpt.embed.wte.weight


def test_flops_per_token_formula(model: GPT) -> None:
    cfg = model.cfg
    n = cfg.n_layer * (12 * cfg.d_model**2 + 13 * cfg.d_model) + 2 * cfg.d_model
    head_dim = cfg.d_model // cfg.n_head
    expected = 6 * (n + cfg.vocab_size * cfg.d_model) + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.seq_len
    assert model.flops_per_token() == expected == 6 * 106_304 + 49_152


def test_pipeline_layers_reproduce_forward(model: GPT) -> None:
    layers = model.as_pipeline_layers()
    assert len(layers) == model.cfg.n_layer + 2
    idx, targets = prompts(2, 16), prompts(2, 16, seed=2)
    x = idx
    for layer in layers:
        x = layer(x)
    logits, loss = model(idx, targets)
    assert torch.equal(x, logits)
    assert torch.equal(pipeline_loss(x, targets), loss)
    # Same storage, so training the layers trains the model; the two ends share the tied matrix.
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    layer_ptrs = {p.data_ptr() for layer in layers for p in layer.parameters()}
    assert layer_ptrs == model_ptrs
    assert layers[0].wte.weight.data_ptr() == layers[-1].lm_head.weight.data_ptr()
    assert layers[0].wte.weight.data_ptr() == model.embed.wte.weight.data_ptr()


def test_too_long_input_raises(model: GPT) -> None:
    with pytest.raises(ValueError, match="seq_len=32"):
        model(prompts(1, SEQ + 1))


def test_too_many_new_tokens_raises(model: GPT) -> None:
    with pytest.raises(ValueError, match=r"max_new_tokens=28.*seq_len=32"):
        model.generate(prompts(1, 5), max_new_tokens=SEQ - 4)


def test_bad_sampling_settings_raise(model: GPT) -> None:
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompts(1, 5), max_new_tokens=2, top_p=0.0)
