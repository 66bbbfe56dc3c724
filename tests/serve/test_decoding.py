"""Continuous batching without Ray: sequences that join a batch mid-decode (longer or shorter than what is
already there) decode exactly as they would alone, finished and cancelled rows leave, the cache keeps only the
slots some live row still needs, and the asyncio scheduler feeds one batch from many callers."""

from __future__ import annotations

import asyncio
import concurrent.futures
from contextlib import aclosing

import pytest

from app.registry import load_artifact
from serve_deployments.decoding import ContinuousBatcher, DecodeBatch
from tests.serve.test_lm_server import alone, build_tiny_artifact, greedy

LONG = "import os\nimport sys\nclass Parser(object):\n    def parse(self, text):\n        return text"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_artifact(build_tiny_artifact(tmp_path_factory.mktemp("decoding") / "tiny"))


def ids(loaded, text: str) -> list[int]:
    return [loaded.tokenizer.eos_id, *loaded.tokenizer.encode(text)]


def test_rows_that_join_mid_decode_match_decoding_alone(loaded) -> None:
    tok = loaded.tokenizer
    first = [greedy(loaded, ids(loaded, "def f(x):"), 30), greedy(loaded, ids(loaded, "x"), 12)]
    batch = DecodeBatch(loaded.model, first, tok.pad_id)
    for _ in range(3):
        batch.step()
    assert batch._slot < len(ids(loaded, LONG))  # the joiner's prompt is longer than the batch so far
    late = [greedy(loaded, ids(loaded, LONG), 9), greedy(loaded, ids(loaded, "return"), 14)]
    batch.add(late)
    events = batch.step()
    # The running rows got their 4th token, the joiners their 1st, in the same step.
    assert [(s, len(s.token_ids)) for s, _ in events] == [(first[0], 4), (first[1], 4), (late[0], 1), (late[1], 1)]
    assert batch._slot == len(ids(loaded, LONG))  # everyone's next input shares the longest context's slot
    for _ in range(2):
        batch.step()
    last = greedy(loaded, ids(loaded, "class A"), 5)
    batch.add([last])
    while not batch.done:
        batch.step()
    for s in [*first, *late, last]:
        assert s.token_ids == alone(loaded, s.prompt_ids, s.max_tokens)
        assert s.finish_reason == ("stop" if s.token_ids[-1] == tok.eos_id else "length")


def test_random_joins_and_leaves_over_a_long_run_match_decoding_alone(loaded) -> None:
    """Sequences of random prompt lengths and max_tokens (1 included) join at random steps and some are cancelled,
    for far longer than the context: the cache is moved and reused many times, stays bounded, and every
    sequence that was not cancelled decodes exactly as alone."""
    import random

    rng = random.Random(0)
    words = LONG.split()
    batch = DecodeBatch(loaded.model, (), loaded.tokenizer.pad_id)
    seqs, slots_cap, steps, compactions = [], 0, 0, 0
    while len(seqs) < 150 or not batch.done:
        if len(seqs) < 150 and (rng.random() < 0.3 or len(batch.rows) < 2):
            prompts = [ids(loaded, " ".join(rng.choices(words, k=rng.randint(0, 12))))
                       for _ in range(rng.randint(1, 3))]
            joiners = [greedy(loaded, p, min(rng.choice([1, 2, 5, 17, 30]), loaded.model.cfg.seq_len - len(p)))
                       for p in prompts]
            batch.add(joiners)
            seqs += joiners
        if not batch.done:
            before = batch._slot if batch.rows else None
            batch.step()
            steps += 1
            compactions += before is not None and bool(batch.rows) and batch._slot < before
        for s in batch.rows:
            if rng.random() < 0.01:
                s.cancelled = True
        slots_cap = max(slots_cap, batch._cache[0].k.size(2) if batch._cache else 0)
    assert steps > 3 * loaded.model.cfg.seq_len and compactions > 0 and slots_cap <= 2 * loaded.model.cfg.seq_len
    cancelled = [s for s in seqs if s.cancelled]
    assert 0 < len(cancelled) < 30
    for s in seqs:
        if not s.cancelled:
            assert s.token_ids == alone(loaded, s.prompt_ids, s.max_tokens)


def test_attention_skips_slots_no_live_row_needs(loaded) -> None:
    """Once the long row leaves, the short one's leading padding is no longer read: attention spans its own
    context only."""
    long_row, short_row = greedy(loaded, ids(loaded, LONG), 2), greedy(loaded, ids(loaded, "x"), 20)
    batch = DecodeBatch(loaded.model, [long_row, short_row], loaded.tokenizer.pad_id)
    batch.step()
    assert batch._slot == len(long_row.prompt_ids) and len(batch.rows) == 2
    batch.step()  # the long row reaches its max_tokens and leaves
    assert batch.rows == [short_row]
    first, nxt = batch.span
    assert nxt - first == len(short_row.prompt_ids) + len(short_row.token_ids) - 1  # its own cached positions
    assert first > 0  # the slots only the long row used are no longer read
    while not batch.done:
        batch.step()
    assert short_row.token_ids == alone(loaded, short_row.prompt_ids, 20)


def test_cancelled_rows_leave_and_cancelled_joiners_never_decode(loaded) -> None:
    rows = [greedy(loaded, ids(loaded, p), 20) for p in ("def f(x):", "import os", "class A:")]
    batch = DecodeBatch(loaded.model, rows[:2], loaded.tokenizer.pad_id)
    batch.step()
    rows[0].cancelled = True
    batch.add([rows[2]])
    rows[2].cancelled = True  # gone after it was queued: its prefill still runs, but it never joins the rows
    batch.step()
    assert batch.rows == [rows[1]]
    n = len(rows[0].token_ids)
    while not batch.done:
        batch.step()
    assert len(rows[0].token_ids) == n == 2 and len(rows[2].token_ids) == 1
    assert rows[1].token_ids == alone(loaded, rows[1].prompt_ids, 20)


# ---- the asyncio scheduler ------------------------------------------------------------------------------------


async def collect(batcher: ContinuousBatcher, seqs, log: list | None = None, tag: str = "") -> list[list]:
    steps = []
    async for events in batcher.join(seqs):
        steps.append(events)
        if log is not None:
            log.append(tag)
    return steps


def test_a_request_arriving_mid_decode_joins_and_finishes_first(loaded) -> None:
    """A long request is decoding; a short one arrives, joins at the next step (one prefill, not a wait for the
    long one to end) and returns first; both decode as if alone, and the stats count one batch of two rows."""
    worker = concurrent.futures.ThreadPoolExecutor(1)
    batcher = ContinuousBatcher(loaded.model, loaded.tokenizer.pad_id, worker, max_batch_size=8)
    long_seq = greedy(loaded, ids(loaded, "def f(x):"), 40, stop=("never-\u2603",))
    short_seq = greedy(loaded, ids(loaded, LONG), 3, stop=("never-\u2603",))
    log: list[str] = []

    async def scenario():
        long_task = asyncio.ensure_future(collect(batcher, [long_seq], log, "long"))
        while len(log) < 5:
            await asyncio.sleep(0.001)
        short_steps = await collect(batcher, [short_seq], log, "short")
        assert not long_task.done()  # the short one was not held until the long one ended
        return await long_task, short_steps

    long_steps, short_steps = asyncio.run(scenario())
    assert [e[0]["token_id"] for e in long_steps] == long_seq.token_ids == alone(loaded, long_seq.prompt_ids, 40)
    assert [e[0]["token_id"] for e in short_steps] == short_seq.token_ids == alone(loaded, short_seq.prompt_ids, 3)
    assert long_steps[-1][0]["finish_reason"] == "length" and short_steps[-1][0]["finish_reason"] == "length"
    stats = batcher.stats
    assert (stats["requests"], stats["prefills"], stats["largest"], stats["cancelled"]) == (2, 2, 2, 0)
    assert stats["steps"] == 39 and stats["rows"] == 39 + 2  # after their prefills, two decode steps held both
    worker.shutdown()


def test_static_batching_holds_a_late_request_until_the_batch_ends(loaded) -> None:
    """The baseline policy (continuous=False): a request arriving mid-decode starts only after the last row of
    the running batch finished."""
    worker = concurrent.futures.ThreadPoolExecutor(1)
    batcher = ContinuousBatcher(loaded.model, loaded.tokenizer.pad_id, worker, continuous=False)
    long_seq = greedy(loaded, ids(loaded, "def f(x):"), 20, stop=("never-\u2603",))
    late = greedy(loaded, ids(loaded, "import"), 3, stop=("never-\u2603",))
    log: list[str] = []

    async def scenario():
        long_task = asyncio.ensure_future(collect(batcher, [long_seq], log, "long"))
        while len(log) < 3:
            await asyncio.sleep(0.001)
        await asyncio.gather(long_task, collect(batcher, [late], log, "late"))

    asyncio.run(scenario())
    assert log == ["long"] * 20 + ["late"] * 3
    assert late.token_ids == alone(loaded, late.prompt_ids, 3)
    assert batcher.stats["largest"] == 1
    worker.shutdown()


def test_groups_wait_for_room_and_abandoned_requests_free_theirs(loaded) -> None:
    """max_batch_size 2: a third request waits until a row frees; a caller that stops listening frees its row."""
    worker = concurrent.futures.ThreadPoolExecutor(1)
    batcher = ContinuousBatcher(loaded.model, loaded.tokenizer.pad_id, worker, max_batch_size=2)
    a, b, c = (greedy(loaded, ids(loaded, p), 30, stop=("never-\u2603",)) for p in ("def", "import", "class"))

    async def scenario():
        task_b = asyncio.ensure_future(collect(batcher, [b]))
        steps_a = 0
        async with aclosing(batcher.join([a])) as steps:
            async for _ in steps:
                steps_a += 1
                if steps_a == 1:
                    task_c = asyncio.ensure_future(collect(batcher, [c]))
                if steps_a == 4:
                    assert c.token_ids == []  # the batch is full (a, b): c waits
                    break  # a's caller goes away
        return await task_b, await task_c

    steps_b, steps_c = asyncio.run(scenario())
    assert a.cancelled and 4 <= len(a.token_ids) <= 5 and a.finish_reason is None
    assert (len(steps_b), len(steps_c)) == (len(b.token_ids), len(c.token_ids))
    assert c.token_ids == alone(loaded, c.prompt_ids, 30) and b.token_ids == alone(loaded, b.prompt_ids, 30)
    assert batcher.stats["largest"] == 2 and batcher.stats["cancelled"] == 1
    worker.shutdown()


def test_a_failing_step_reaches_its_callers_and_the_next_batch_starts_clean(loaded, monkeypatch) -> None:
    worker = concurrent.futures.ThreadPoolExecutor(1)
    batcher = ContinuousBatcher(loaded.model, loaded.tokenizer.pad_id, worker)
    real = loaded.model.forward_padded
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward_padded", flaky)
    first = greedy(loaded, ids(loaded, "def"), 10)
    with pytest.raises(RuntimeError, match="simulated"):
        asyncio.run(collect(batcher, [first]))
    again = greedy(loaded, ids(loaded, "def"), 10)
    steps = asyncio.run(collect(batcher, [again]))
    assert [e[0]["token_id"] for e in steps] == alone(loaded, again.prompt_ids, 10)
    worker.shutdown()


def test_lmserver_frees_the_row_of_a_stream_its_client_closed(tmp_path, monkeypatch) -> None:
    """The deployment class itself, off Serve: a client that closes its stream after two tokens cancels its row
    (what Serve does when an HTTP client disconnects); a request sent at the same time completes as if alone."""
    import importlib.util
    from types import SimpleNamespace

    from ray import serve

    import serve_deployments.lm_server

    # A private copy of the module: @serve.batch keeps its queue in the decorated function once called, and the
    # shared class, carrying that queue, could no longer be pickled for the Serve tests that follow.
    spec = importlib.util.spec_from_file_location("lm_server_off_serve", serve_deployments.lm_server.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    LMServer = module.LMServer
    # @serve.batch reads only this from the replica's context (to warn about a batch above max_ongoing_requests).
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)

    server = LMServer.func_or_class(str(build_tiny_artifact(tmp_path / "tiny")), "tiny", {"batch_wait_timeout_s": 0.05})
    req = {"prompt": "def f(x):", "max_tokens": 40, "temperature": 0, "stop": ["never-\u2603"]}

    async def scenario():
        other = asyncio.ensure_future(server.generate({**req, "prompt": "import"}))
        got = []
        async with aclosing(server.stream(req)) as events:
            async for event in events:
                got.append(event)
                if len(got) == 2:
                    break
        return got, await other

    got, other = asyncio.run(scenario())
    stats = (asyncio.run(server.info()))["batch_stats"]
    assert len(got) == 2 and stats["cancelled"] == 1 and stats["requests"] == 2
    tok = server.tokenizer
    assert other["token_ids"] == alone(server.artifact, [tok.eos_id, *tok.encode("import")], 40)


def test_compiled_model_decodes_like_the_eager_one(loaded, tmp_path) -> None:
    """GPT.compile_decoding: after warm_up, rows that join mid-decode through the compiled forward_padded (every
    step goes through it) compile nothing new and give the tokens the eager model gives alone; training and
    copies stay eager."""
    import copy

    import torch
    from torch._dynamo.utils import counters

    from serve_deployments.decoding import warm_up

    compiled = load_artifact(build_tiny_artifact(tmp_path / "tiny")).model.eval().compile_decoding()
    calls = []
    padded = compiled._compiled["padded"]
    compiled._compiled["padded"] = lambda *a: calls.append(1) or padded(*a)
    assert warm_up(compiled, loaded.tokenizer.pad_id) > 0
    assert calls, "warm_up decodes through the compiled graphs"
    calls.clear()
    graphs = counters["stats"]["unique_graphs"]
    tok = loaded.tokenizer
    first = [greedy(loaded, ids(loaded, "def f(x):"), 20), greedy(loaded, ids(loaded, "x"), 6)]
    batch = DecodeBatch(compiled, first, tok.pad_id)
    for _ in range(3):
        batch.step()
    late = [greedy(loaded, ids(loaded, LONG), 9)]
    batch.add(late)
    steps = 3
    while not batch.done:
        batch.step()
        steps += 1
    assert len(calls) >= steps  # every step (and the joiners' prefill) ran compiled
    assert counters["stats"]["unique_graphs"] == graphs  # warm_up left nothing to compile: no stall under load
    for s in [*first, *late]:
        assert s.token_ids == alone(loaded, s.prompt_ids, s.max_tokens)
    # generate and a forward without targets go through the compiled forward too, and agree with eager
    prompt = torch.tensor([ids(loaded, "def f(x):")])
    assert torch.equal(compiled.generate(prompt, 8, temperature=0), loaded.model.generate(prompt, 8, temperature=0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(prompt)[0], loaded.model(prompt)[0], rtol=1e-4, atol=1e-4)
    assert not copy.deepcopy(compiled).compiled  # a copy holds no graphs bound to the original
    calls.clear()
    compiled.train()
    with torch.no_grad():
        compiled.forward_padded(prompt, torch.zeros(1, dtype=torch.long), compiled.new_kv_cache(1), 0)
    assert not calls  # training mode runs eagerly
