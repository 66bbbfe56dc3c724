"""The router's model calls without Ray: retried when the replica died, not otherwise, and cancelled with the
request that awaited them (a timeout, a client that left); and the transport they use (router.model_transport)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError

from serve_deployments.router import call_with_retry


class FakeResponse:
    """Stands in for a DeploymentResponse: awaitable, with cancel()."""

    def __init__(self, outcome, delay_s: float = 0.0) -> None:
        self.outcome, self.delay_s, self.cancelled = outcome, delay_s, False

    def cancel(self) -> None:
        self.cancelled = True

    def __await__(self):
        return self._result().__await__()

    async def _result(self):
        await asyncio.sleep(self.delay_s)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def _calls(*responses):
    sent = []
    pending = list(responses)

    def call():
        sent.append(pending.pop(0))
        return sent[-1]

    return call, sent


def test_a_dead_replica_is_retried_and_other_errors_are_not():
    call, sent = _calls(FakeResponse(ActorDiedError()), FakeResponse({"text": "ok"}))
    assert asyncio.run(call_with_retry(call, backoff_s=0)) == {"text": "ok"} and len(sent) == 2

    call, sent = _calls(FakeResponse(ValueError("bad request")), FakeResponse({"text": "never"}))
    with pytest.raises(ValueError):
        asyncio.run(call_with_retry(call, backoff_s=0))
    assert len(sent) == 1

    call, sent = _calls(*(FakeResponse(ActorDiedError()) for _ in range(3)))
    with pytest.raises(ActorDiedError):
        asyncio.run(call_with_retry(call, attempts=3, backoff_s=0))
    assert len(sent) == 3


def test_a_timed_out_request_cancels_its_model_call():
    call, sent = _calls(FakeResponse({"text": "late"}, delay_s=5.0))

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(call_with_retry(call), 0.05)

    asyncio.run(main())
    assert len(sent) == 1 and sent[0].cancelled


def test_a_finished_call_is_not_cancelled():
    call, sent = _calls(FakeResponse({"text": "ok"}))
    assert asyncio.run(call_with_retry(call)) == {"text": "ok"} and not sent[0].cancelled


class FakeHandle:
    """Stands in for a DeploymentHandle: options(_by_reference=...) returns a new one with that option."""

    def __init__(self, by_reference: bool = True) -> None:
        self.handle_options = SimpleNamespace(_by_reference=by_reference)

    def options(self, _by_reference: bool) -> "FakeHandle":
        return FakeHandle(_by_reference)


def test_the_model_transport_is_set_on_the_handles_and_changes_live():
    from app.errors import ConfigError
    from serve_deployments.router import Router

    cls = Router.func_or_class.__bases__[0]  # the class itself, under the ASGI wrapper @serve.ingress puts on it
    router = object.__new__(cls)
    cls.__init__(router, {"teacher": FakeHandle(), "student": FakeHandle()}, {"export_metrics": False})
    assert router._stats()["model_transport"] == {"teacher": "grpc", "student": "grpc"}  # the default
    router.reconfigure({"model_transport": "ray"})
    assert router._stats()["model_transport"] == {"teacher": "ray", "student": "ray"}
    with pytest.raises(ConfigError, match="router.model_transport: Input should be 'grpc' or 'ray'"):
        router.reconfigure({"model_transport": "carrier-pigeon"})
    assert router._stats()["model_transport"] == {"teacher": "ray", "student": "ray"}  # a refused change keeps it
