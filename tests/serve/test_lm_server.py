"""LMServer: padded batches decode exactly like single requests, rows leave the batch when they finish, stop strings
and streaming, seeded sampling, scoring and embeddings; the pure parts without Ray, then one Serve app on the
embedded Ray (handle calls, live settings, request errors)."""

from __future__ import annotations

import asyncio
import inspect
import json
import string
import textwrap
import time
from pathlib import Path

import pytest
import torch

from app.config import ModelConfig
from app.errors import UserError
from app.model import GPT, IGNORE_INDEX
from app.registry import load_artifact, save_artifact
from app.tokenizer import train_tokenizer
from serve_deployments.decoding import DecodeBatch, Sequence
from serve_deployments.lm_server import embed_batch, score_batch
from tests.serve.helpers import batch_stats_when

TINY = dict(vocab_size=512, seq_len=64, n_layer=2, n_head=4, d_model=64, mlp_ratio=4, dropout=0.0, bias=True)


def build_tiny_artifact(out: Path, seed: int = 0, **config) -> Path:
    """A 2-layer, width-64 GPT with a BPE trained on three stdlib modules, written as a registry artifact.

    Untrained weights decode greedily into one repeated token, which would hide a batch that mixes up rows or
    positions; weight matrices ten times larger give confident, context-dependent predictions instead.
    """
    texts = [Path(inspect.getsourcefile(m)).read_text() for m in (json.encoder, textwrap, string)]
    tokenizer = train_tokenizer(texts, TINY["vocab_size"])
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**TINY, **config}))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10)
    return save_artifact(out, model.state_dict(), model.cfg, tokenizer, {"quantization": None, "domain": "code"})


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return build_tiny_artifact(tmp_path_factory.mktemp("lm") / "tiny")


@pytest.fixture(scope="module")
def loaded(artifact):
    return load_artifact(artifact)


def alone(loaded, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Reference: GPT.generate on this prompt by itself, greedy, cut after the first eos."""
    eos = loaded.tokenizer.eos_id
    out = loaded.model.generate(torch.tensor([prompt_ids]), max_tokens, temperature=0, stop_ids=[eos])
    new = out[0, len(prompt_ids):].tolist()
    return new[:new.index(eos) + 1] if eos in new else new


def greedy(loaded, prompt_ids: list[int], max_tokens: int, stop: tuple[str, ...] = ()) -> Sequence:
    return Sequence(prompt_ids, max_tokens, 0.0, None, None, stop, None, loaded.tokenizer)


PROMPTS = ["def f(x):", "import os\nimport sys\nclass Parser(object):\n    pass", "x", "return self._indent + 1"]
MAX_TOKENS = [12, 3, 20, 7]


# ---- pure: no Ray -----------------------------------------------------------------------------------------------


def test_padded_batch_decodes_each_row_as_if_alone(loaded) -> None:
    tok = loaded.tokenizer
    seqs = [greedy(loaded, [tok.eos_id, *tok.encode(p)], n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    assert len({len(s.prompt_ids) for s in seqs}) == len(seqs)  # every row is padded differently
    batch = DecodeBatch(loaded.model, seqs, tok.pad_id)
    rows, steps = [], 0
    while not batch.done:
        rows.append(len(batch.rows) + len(batch.pending))
        batch.step()
        steps += 1
    for s, n in zip(seqs, MAX_TOKENS):
        assert s.token_ids == alone(loaded, s.prompt_ids, n)
        assert s.finish_reason == ("stop" if s.token_ids[-1] == tok.eos_id else "length")
    # Rows leave as they finish: the cache shrinks from 4 rows to the one with the most tokens to go.
    assert steps == max(len(s.token_ids) for s in seqs)
    assert rows[0] == 4 and rows[-1] == 1 and rows == sorted(rows, reverse=True)


def test_prefill_scores_each_prompt_as_if_alone(loaded) -> None:
    """prompt_logprob (a judge's feature) comes from the batch's left-padded prefill and equals the model's own
    mean log-likelihood of the prompt's tokens after the first; a one-token prompt has none."""
    tok, model = loaded.tokenizer, loaded.model
    seqs = [greedy(loaded, [tok.eos_id, *tok.encode(p)], 2) for p in PROMPTS] + [greedy(loaded, [tok.eos_id], 2)]
    batch = DecodeBatch(model, seqs, tok.pad_id)
    while not batch.done:
        batch.step()
    for s in seqs[:-1]:
        x, y = torch.tensor([s.prompt_ids[:-1]]), torch.tensor([s.prompt_ids[1:]])
        assert s.result("m")["prompt_logprob"] == pytest.approx(-model(x, y)[1].item(), rel=1e-5)
    assert len({s.prompt_logprob for s in seqs[:-1]}) == len(PROMPTS)  # rows are not mixed up
    assert seqs[-1].result("m")["prompt_logprob"] is None


def test_stop_string_cuts_text_and_the_stream_never_shows_it(loaded) -> None:
    tok = loaded.tokenizer
    text = "result = compute(x)\n# stop here please"
    seq = greedy(loaded, [tok.eos_id], 100, stop=("# st", "never"))
    deltas = []
    for token in tok.encode(text):
        event = seq.push(token, -1.0, 2.0)
        deltas.append(event["text"])
        assert text.startswith("".join(deltas)) and "#" not in "".join(deltas)
        if event["finish_reason"]:
            break
    assert seq.finish_reason == "stop" and seq.text == "result = compute(x)\n" == "".join(deltas)
    result = seq.result("m")
    assert result["completion_tokens"] == len(result["token_ids"]) < len(tok.encode(text))
    assert result["mean_logprob"] == -1.0 and result["mean_entropy"] == 2.0


def test_score_batch_is_the_mean_loglik_of_the_continuation(loaded) -> None:
    tok, model = loaded.tokenizer, loaded.model
    pairs = [("def f(x):", "\n    return x"), ("import", " os"), ("", "class A:\n    pass\n")]
    items = [([tok.eos_id, *tok.encode(p)] + tok.encode(c), 1 + len(tok.encode(p))) for p, c in pairs]
    together = score_batch(model, items, tok.pad_id)
    for item, got in zip(items, together):
        ids, n_context = item
        assert got == pytest.approx(score_batch(model, [item], tok.pad_id)[0], rel=1e-5)
        x = torch.tensor([ids[:-1]])
        y = torch.tensor([[IGNORE_INDEX] * (n_context - 1) + ids[n_context:]])
        _, loss = model(x, y)
        assert got["tokens"] == len(ids) - n_context
        assert got["mean_logprob"] == pytest.approx(-loss.item(), rel=1e-5)


def test_embed_batch_is_unit_length_and_padding_free(loaded) -> None:
    tok, model = loaded.tokenizer, loaded.model
    texts = [[tok.eos_id, *tok.encode(t)] for t in ("a short one", "a much longer text about parsing json files")]
    together = torch.tensor(embed_batch(model, texts, tok.pad_id))
    apart = torch.tensor([embed_batch(model, [t], tok.pad_id)[0] for t in texts])
    assert torch.allclose(together, apart, atol=1e-5)
    assert torch.allclose(together.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert float(together[0] @ together[1]) < 0.999  # different texts, different vectors


# ---- on Serve ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(ray_local, artifact):
    """One LMServer replica (a quarter CPU) with a 50 ms batch window, so requests sent together batch."""
    from ray import serve

    from serve_deployments.lm_server import LMServer

    serve.start(proxy_location="Disabled")
    app = LMServer.options(name="tiny", ray_actor_options={"num_cpus": 0.25}).bind(
        str(artifact), "tiny", {"max_batch_size": 8, "batch_wait_timeout_s": 0.05})
    handle = serve.run(app, name="lm-test", route_prefix=None)
    yield handle
    serve.shutdown()


def test_concurrent_requests_batch_and_match_single_decoding(server, loaded) -> None:
    tok = loaded.tokenizer
    responses = [server.generate.remote({"prompt": p, "max_tokens": n, "temperature": 0})
                 for p, n in zip(PROMPTS, MAX_TOKENS)]
    results = [r.result(timeout_s=30) for r in responses]
    for p, n, res in zip(PROMPTS, MAX_TOKENS, results):
        ids = [tok.eos_id, *tok.encode(p)]
        expected = alone(loaded, ids, n)
        assert res["token_ids"] == expected and res["text"] == tok.decode(expected)
        assert (res["prompt_tokens"], res["completion_tokens"], res["model"]) == (len(ids), len(expected), "tiny")
        assert res["finish_reason"] == ("stop" if expected[-1] == tok.eos_id else "length")
        assert res["mean_logprob"] < 0 and res["mean_entropy"] > 0
    stats = server.info.remote().result()["batch_stats"]
    assert stats["largest"] > 1  # they really were decoded together


def test_a_short_request_returns_before_the_long_one_in_its_batch(server) -> None:
    async def race() -> dict[str, float]:
        t0 = time.perf_counter()
        done: dict[str, float] = {}

        async def one(name: str, max_tokens: int) -> None:
            res = await server.generate.remote({"prompt": "def", "max_tokens": max_tokens, "temperature": 0,
                                                "stop": ["never-in-output-\u2603"]})
            assert res["completion_tokens"] <= max_tokens
            done[name] = time.perf_counter() - t0

        await asyncio.gather(one("long", 60), one("short", 2))
        return done

    before = server.info.remote().result()["batch_stats"]
    done = asyncio.run(race())
    after = server.info.remote().result()["batch_stats"]
    assert after["prefills"] == before["prefills"] + 1  # they arrived together and decoded together
    assert done["short"] < done["long"]


def test_stream_yields_the_same_completion_token_by_token(server) -> None:
    req = {"prompt": "class Parser:", "max_tokens": 15, "temperature": 0}
    whole = server.generate.remote(req).result()
    events = list(server.options(stream=True).stream.remote(req))
    assert [e["token_id"] for e in events] == whole["token_ids"]
    assert "".join(e["text"] for e in events) == whole["text"]
    assert [e["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1]["finish_reason"] == whole["finish_reason"]


def test_stop_string_from_a_greedy_completion(server) -> None:
    req = {"prompt": "def f(x):", "max_tokens": 25, "temperature": 0}
    text = server.generate.remote(req).result()["text"]
    stop = next(text[i:i + 3] for i in range(4, len(text) - 3) if text[i:i + 3].isprintable()
                and text.find(text[i:i + 3]) == i)
    res = server.generate.remote({**req, "stop": [stop]}).result()
    assert res["finish_reason"] == "stop" and res["text"] == text[:text.index(stop)]


def test_sampling_is_reproducible_with_a_seed(server) -> None:
    req = {"prompt": "import", "max_tokens": 20, "temperature": 1.0, "top_p": 0.95, "top_k": 50}
    a, b, c = (server.generate.remote({**req, "seed": s}).result()["token_ids"] for s in (7, 7, 8))
    assert a == b and a != c


def test_score_embed_and_info(server, loaded) -> None:
    s = server.score.remote({"prompt": "def f(x):", "continuation": "\n    return x"}).result()
    assert s["tokens"] == len(loaded.tokenizer.encode("\n    return x")) and s["mean_logprob"] < 0
    v = server.embed.remote({"text": "hello"}).result()
    assert len(v) == TINY["d_model"] and sum(x * x for x in v) == pytest.approx(1.0, abs=1e-5)
    info = server.info.remote().result()
    assert (info["name"], info["seq_len"], info["vocab_size"], info["quantization"]) == ("tiny", 64, 512, "none")
    assert info["parameters"] == loaded.model.num_params(non_embedding=False)
    assert info["torch_threads"] == 1 and info["card"]["domain"] == "code"


@pytest.mark.parametrize("req, field", [
    ({"prompt": "x " * 80, "max_tokens": 4}, "context of 64 tokens"),
    ({"prompt": "x", "max_tokens": 500}, "max_tokens=500"),
    ({"prompt": "x", "temperature": -1}, "request.temperature"),
    ({"prompt": 3}, "request.prompt"),
    ({"max_tokens": 3}, "exactly one of prompt"),
    ({"prompt_ids": [1, 99999]}, "request.prompt_ids"),
    ({"prompt": "x", "stop": [""]}, "request.stop"),
])
def test_bad_requests_raise_one_line_user_errors(server, req, field) -> None:
    with pytest.raises(UserError) as err:
        server.generate.remote(req).result()
    line = str(err.value).strip().splitlines()[-1]
    assert field in line
    assert server.generate.remote({"prompt": "x", "max_tokens": 2}).result()["completion_tokens"] >= 1  # alive


def test_live_settings_through_user_config(server, artifact) -> None:
    from ray import serve

    from serve_deployments.lm_server import LMServer

    app = LMServer.options(name="tiny", ray_actor_options={"num_cpus": 0.25},
                           user_config={"max_batch_size": 1, "max_tokens_limit": 5,
                                        "continuous_batching": False}).bind(
        str(artifact), "tiny", {"max_batch_size": 8, "batch_wait_timeout_s": 0.05})
    handle = serve.run(app, name="lm-test", route_prefix=None)
    info = handle.info.remote().result()
    assert (info["max_batch_size"], info["max_tokens_limit"], info["batch_wait_timeout_s"]) == (1, 5, 0.05)
    assert info["continuous_batching"] is False
    before = info["batch_stats"]
    results = [r.result() for r in [handle.generate.remote({"prompt": "a", "max_tokens": 3}) for _ in range(3)]]
    after = handle.info.remote().result()["batch_stats"]
    assert len(results) == 3 and after["prefills"] - before["prefills"] == 3  # one request per batch now
    assert after["rows"] - before["rows"] == after["steps"] - before["steps"] > 0  # each step decoded one row
    with pytest.raises(UserError, match="limit of 5"):
        handle.generate.remote({"prompt": "a", "max_tokens": 6}).result()


def test_a_client_that_drops_its_stream_frees_its_row(server, tmp_path) -> None:
    """A streaming caller that cancels after the first token: Serve cancels the replica's generator and the row
    leaves the batch, long before the 1,000 tokens it asked for (a model with a 1,024-token context)."""
    from ray import serve

    from serve_deployments.lm_server import LMServer

    app = LMServer.options(name="long", ray_actor_options={"num_cpus": 0.25}).bind(
        str(build_tiny_artifact(tmp_path / "long", seq_len=1024)), "long")
    handle = serve.run(app, name="lm-long", route_prefix=None)
    try:
        stream = handle.options(stream=True).stream.remote(
            {"prompt": "def", "max_tokens": 1000, "temperature": 0, "stop": ["never-\u2603"]})
        first = next(stream)
        stream.cancel()
        stats = batch_stats_when(handle, lambda st: st["cancelled"] or st["steps"] >= 999, 20)
        assert first["finish_reason"] is None
        assert stats["cancelled"] == 1 and stats["steps"] < 999
    finally:
        serve.delete("lm-long")


def test_a_compiled_replica_compiles_before_serving_and_answers_like_eager(server, artifact, loaded) -> None:
    """ModelDeployment(compile=True): the replica compiles and warms up its graphs in its constructor, reports
    itself compiled, and its greedy answers and scores are the eager model's."""
    from ray import serve

    from serve_deployments.app import ModelDeployment
    from serve_deployments.lm_server import LMServer

    spec = ModelDeployment(name="tiny-compiled", artifact=str(artifact), compile=True,
                           ray_actor_options={"num_cpus": 0.25})
    app = LMServer.options(name=spec.name, ray_actor_options=spec.ray_actor_options).bind(
        spec.artifact, spec.name, spec.settings(), spec.compile)
    handle = serve.run(app, name="lm-compiled", route_prefix=None)
    try:
        info = handle.info.remote().result(timeout_s=60)
        assert info["compiled"] is True
        tok = loaded.tokenizer
        results = [r.result(timeout_s=60) for r in [handle.generate.remote({"prompt": p, "max_tokens": n,
                                                                            "temperature": 0})
                                                    for p, n in zip(PROMPTS, MAX_TOKENS)]]
        for p, n, res in zip(PROMPTS, MAX_TOKENS, results):
            assert res["token_ids"] == alone(loaded, [tok.eos_id, *tok.encode(p)], n)
        eager = server.score.remote({"prompt": "def f(x):", "continuation": " return x"}).result()
        compiled = handle.score.remote({"prompt": "def f(x):", "continuation": " return x"}).result()
        assert compiled["mean_logprob"] == pytest.approx(eager["mean_logprob"], abs=1e-4)
    finally:
        serve.delete("lm-compiled")
