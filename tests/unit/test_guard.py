"""Guards without Ray: loopback detection, key checks, token buckets on an injected clock, input limits."""

from __future__ import annotations

import pytest

from serve_deployments.guard import (
    GuardError,
    RateLimiter,
    TokenBucket,
    bearer_token,
    check_key,
    check_max_tokens,
    check_text,
    configured_keys,
    is_loopback,
    key_required,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("10.0.0.7", False), ("192.168.1.2", False), ("::", False), ("example.com", False),
    (None, False), ("", False),
])
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_keys_needed_unless_server_and_client_are_both_loopback():
    assert not key_required("127.0.0.1", "127.0.0.1")
    assert key_required("0.0.0.0", "127.0.0.1")  # exposed server: even local callers
    assert key_required("127.0.0.1", "10.0.0.9")
    assert key_required("127.0.0.1", None)  # unknown peer: not trusted


def test_serving_off_loopback_without_any_key_is_refused_before_anything_starts(monkeypatch):
    """A server on 0.0.0.0 with no key would answer every request 401: `serve`/`app.deploy` refuse it up front."""
    from app import sdk
    from app.errors import UserError
    from serve_deployments.app import check_keys_off_loopback, load_serve_args

    monkeypatch.delenv("SCALESTACK_API_KEYS", raising=False)
    exposed = {"models": [{"name": "m", "artifact": "anything"}], "host": "0.0.0.0"}
    with pytest.raises(UserError, match="host 0.0.0.0 is reachable from other machines.*router.guard.api_keys"):
        check_keys_off_loopback(load_serve_args(exposed))
    with pytest.raises(UserError, match="host 0.0.0.0"):  # before the artifact is resolved or Ray starts
        sdk.deploy(exposed)
    check_keys_off_loopback(load_serve_args({**exposed, "router": {"guard": {"api_keys": ["sk-1"]}}}))
    check_keys_off_loopback(load_serve_args({**exposed, "host": "127.0.0.1"}))
    monkeypatch.setenv("SCALESTACK_API_KEYS", "sk-2")
    check_keys_off_loopback(load_serve_args(exposed))


def test_key_check_and_bearer_parsing(monkeypatch):
    assert bearer_token("Bearer sk-1") == "sk-1" and bearer_token("bearer  sk-1 ") == "sk-1"
    assert bearer_token("Basic abc") is None and bearer_token(None) is None and bearer_token("Bearer ") is None
    assert check_key(["sk-1", "sk-2"], "sk-2") == "sk-2"
    with pytest.raises(GuardError) as err:
        check_key(["sk-1"], None)
    assert err.value.status == 401 and err.value.code == "missing_api_key"
    with pytest.raises(GuardError) as err:
        check_key(["sk-1"], "sk-10")
    assert err.value.status == 401 and err.value.code == "invalid_api_key"
    monkeypatch.setenv("SCALESTACK_API_KEYS", " sk-env , ,sk-env2")
    assert configured_keys(["sk-1"]) == ["sk-1", "sk-env", "sk-env2"]


def test_token_bucket_burst_refill_and_wait():
    clock = Clock()
    b = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [b.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take() == pytest.approx(0.5)  # empty: one token comes back in 1/rate s
    clock.now += 0.5
    assert b.take() == 0.0
    clock.now += 100  # refills only up to the burst
    assert [b.take() == 0.0 for _ in range(4)] == [True, True, True, False]


def test_rate_limiter_is_per_caller_and_answers_429_with_retry_after():
    clock = Clock()
    limiter = RateLimiter(rate=0.5, burst=2, clock=clock)
    limiter.check("key:a")
    limiter.check("key:a")
    with pytest.raises(GuardError) as err:
        limiter.check("key:a")
    assert err.value.status == 429 and err.value.headers == {"Retry-After": "2"}
    limiter.check("key:b")  # another caller has its own bucket
    clock.now += 2.0
    limiter.check("key:a")
    RateLimiter(rate=0, burst=1, clock=clock).check("x")  # rate 0 = unlimited
    small = RateLimiter(rate=1, burst=1, clock=clock, max_callers=2)
    for caller in ("a", "b", "c"):
        small.check(caller)
    assert list(small.buckets) == ["b", "c"]


def test_input_limits():
    check_text("prompt", "hello", 10)
    for text, code in [("", "empty_prompt"), ("  \n", "empty_prompt"), ("x" * 11, "prompt_too_long"),
                       ("ok \ud800 no", "invalid_utf8")]:
        with pytest.raises(GuardError) as err:
            check_text("prompt", text, 10)
        assert err.value.status == 400 and err.value.code == code
    with pytest.raises(GuardError, match="character 3"):
        check_text("prompt", "ok \ud800", 10)
    check_max_tokens(64, 64)
    with pytest.raises(GuardError, match="max_tokens=65 is over the limit of 64"):
        check_max_tokens(65, 64)
