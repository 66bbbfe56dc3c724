"""Request guards: API keys off loopback, per-key token-bucket rate limits, and input limits — pure, no Ray.

Each check returns or raises a `GuardError` carrying the HTTP status and a one-line message; the router turns it
into an OpenAI-style error body (and Retry-After on 429). Nothing here touches the model.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

API_KEYS_ENV = "SCALESTACK_API_KEYS"  # comma-separated keys, added to the configured ones


class GuardError(Exception):
    """A refused request: HTTP status, one-line message, and optional extra headers (Retry-After)."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 and 'localhost'; anything else (0.0.0.0, a LAN address, a name, None) is not."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def key_required(bind_host: str, client_host: str | None) -> bool:
    """Keys are required unless both the address the server listens on and the caller are loopback.

    A server bound to 0.0.0.0 or a LAN address is reachable from elsewhere, so every caller needs a key, even one
    on the same machine (a local reverse proxy makes remote callers look local). The client host is the TCP peer
    address the server saw; X-Forwarded-For is never trusted.
    """
    return not (is_loopback(bind_host) and is_loopback(client_host))


def configured_keys(keys: Sequence[str]) -> list[str]:
    """The configured keys plus those in $SCALESTACK_API_KEYS."""
    env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return [*keys, *env]


def bearer_token(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header (what OpenAI clients send)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def check_key(keys: Sequence[str], presented: str | None) -> str:
    """The presented key if it is one of `keys` (constant-time compare); else GuardError 401."""
    if presented is None:
        raise GuardError(401, "missing API key; send 'Authorization: Bearer KEY' (keys: router.guard.api_keys "
                              f"or ${API_KEYS_ENV})", "missing_api_key")
    if not any(hmac.compare_digest(presented.encode("utf-8", "replace"), k.encode()) for k in keys):
        raise GuardError(401, "invalid API key; check the key you send in 'Authorization: Bearer KEY'",
                         "invalid_api_key")
    return presented


@dataclass
class TokenBucket:
    """Up to `burst` requests at once, refilled at `rate` per second (the classic token bucket)."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(default=math.nan)
    updated: float = field(default=math.nan)

    def __post_init__(self) -> None:
        self.tokens, self.updated = self.burst, self.clock()

    def take(self, cost: float = 1.0) -> float:
        """Take `cost` tokens: returns 0 if granted, else the seconds until they would be available."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate if self.rate > 0 else math.inf


@dataclass
class RateLimiter:
    """One token bucket per caller (API key, or client host when no key is needed); GuardError 429 when empty."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    max_callers: int = 100_000
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def check(self, caller: str) -> None:
        if self.rate <= 0:  # rate 0 = unlimited
            return
        bucket = self.buckets.get(caller)
        if bucket is None:
            if len(self.buckets) >= self.max_callers:  # bound memory: forget the oldest caller
                self.buckets.pop(next(iter(self.buckets)))
            bucket = self.buckets[caller] = TokenBucket(self.rate, self.burst, self.clock)
        wait = bucket.take()
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise GuardError(429, f"rate limit of {self.rate:g} requests/s (burst {self.burst:g}) exceeded; "
                                  f"retry after {retry} s", "rate_limit_exceeded", {"Retry-After": str(retry)})


def check_text(name: str, text: str, max_chars: int) -> None:
    """400 for an empty text, one longer than `max_chars`, or one that is not valid Unicode (lone surrogates)."""
    if not text.strip():
        raise GuardError(400, f"{name} is empty; send some text to complete", "empty_prompt")
    if len(text) > max_chars:
        raise GuardError(400, f"{name} has {len(text)} characters, over the limit of {max_chars}; shorten it",
                         "prompt_too_long")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise GuardError(400, f"{name} is not valid UTF-8 (unpaired surrogate at character {err.start}); "
                              "send well-formed Unicode", "invalid_utf8") from None


def check_max_tokens(max_tokens: int, limit: int) -> None:
    if max_tokens > limit:
        raise GuardError(400, f"max_tokens={max_tokens} is over the limit of {limit}; ask for at most {limit}",
                         "max_tokens_too_large")
