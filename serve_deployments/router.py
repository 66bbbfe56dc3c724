"""The Router ingress: an OpenAI-compatible HTTP API in front of LMServer deployments.

    Router.bind({"teacher": teacher_app, "code-int8": code_app}, {"policy": {...}, "guard": {...}})

A request flows guard → cache → policy → model handle(s) → judge (cascade only) → cache fill → response. Every
response says which model answered (`x-scalestack-model`), the route the policy took (`x-scalestack-route`),
whether it came from the cache (`x-scalestack-cache`: miss, exact, semantic or off) and whether the cascade
escalated (`x-scalestack-escalated`); the JSON body repeats them under `scalestack`. A complete (non-streamed)
answer also carries `Server-Timing: router;dur=MS, model;dur=MS`: the time the request spent in the router's own
code and the time it waited on model replicas.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /healthz, POST /v1/feedback,
GET /v1/stats, and the admin endpoints GET|POST /v1/admin/policy and POST /v1/admin/calibrate, which always need
an API key. Settings change live through `reconfigure(user_config)` (every replica, via `serve deploy`) or
`POST /v1/admin/policy` (the replica that receives it).
"""


import asyncio
import json
import logging
import math
import random
import time
import uuid
from collections import OrderedDict
from typing import Any, AsyncIterator, Awaitable, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from app.errors import ConfigError, UserError
from app.jsonsafe import finite
from serve_deployments import guard as guards
from serve_deployments.cache import (
    ExactCache,
    HashingEmbedder,
    SemanticCache,
    exact_key,
    is_deterministic,
    params_key,
)
from serve_deployments.metrics import DriftMonitor, RouterMetrics, manifest_domain_mix
from serve_deployments.policies import (
    Cascade,
    Decision,
    DomainRoute,
    Policy,
    RouteRequest,
    build_policy,
    builtin_classifier,
    describe,
    text_agreement,
    walk,
)

logger = logging.getLogger("ray.serve")

# --------------------------------------------------------------------------------------------------------------
# Settings


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GuardSettings(_Settings):
    api_keys: list[str] = Field([], description="Accepted API keys (plus $SCALESTACK_API_KEYS, comma-separated).")
    bind_host: str = Field("127.0.0.1", description="Address the HTTP proxy listens on; not loopback → keys needed.")
    rate_per_s: float = Field(20.0, ge=0, description="Requests per second per key (or client host); 0 = unlimited.")
    burst: float = Field(40.0, ge=1, description="Requests a caller may send at once before the rate applies.")
    max_prompt_chars: int = Field(32_000, ge=1, description="Longest prompt (characters) the router accepts.")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    request_timeout_s: float = Field(60.0, gt=0, description="Seconds before a request is answered 504.")


class ExactCacheSettings(_Settings):
    enabled: bool = True
    max_entries: int = Field(10_000, ge=1)
    ttl_s: float = Field(3600.0, gt=0)


class SemanticCacheSettings(_Settings):
    enabled: bool = False
    threshold: float = Field(0.97, ge=-1, le=1, description="Cosine similarity a cached prompt needs to answer.")
    max_entries: int = Field(2000, ge=1)
    ttl_s: float = Field(3600.0, gt=0)
    embedder: Literal["model", "hashing"] = Field("model", description="'model': a deployment's embed(); "
                                                  "'hashing': character trigrams, no model call.")
    embed_model: str | None = Field(None, description="Deployment whose embed() is used (default: the first).")
    verify_fraction: float = Field(0.0, ge=0, le=1, description="Share of semantic hits re-asked to the model "
                                   "in the background to count wrong hits.")


class CacheSettings(_Settings):
    exact: ExactCacheSettings = ExactCacheSettings()
    semantic: SemanticCacheSettings = SemanticCacheSettings()


class DriftSettings(_Settings):
    manifest: str | None = Field(None, description="Prepared data folder whose domain mix is the reference.")
    reference_lengths: list[int] | None = Field(None, description="Prompt lengths (characters) of normal traffic.")
    window: int = Field(1000, ge=1, description="Recent prompts compared with the reference.")


class RouterSettings(_Settings):
    """Everything the router is told at deploy time (ServeArgs.router) or live (user_config)."""

    policy: Any = Field(None, description="Policy tree (see policies.py); None sends 'auto' to default_model.")
    default_model: str | None = Field(None, description="Model for 'auto' without a policy (default: the first).")
    guard: GuardSettings = GuardSettings()
    cache: CacheSettings = CacheSettings()
    drift: DriftSettings = DriftSettings()
    seed: int = Field(0, description="Seed of the policies' random draws (splits without a user, bandit).")
    export_metrics: bool = Field(True, description="Mirror the figures to ray.util.metrics.")
    model_transport: Literal["grpc", "ray"] = Field(
        "grpc", description="How the router calls model replicas: 'grpc' sends each request and answer by value over "
        "Serve's inter-deployment gRPC (handle option _by_reference=False; ~1.2 ms less per request than 'ray' on the "
        "2-core VM, README 'Serving load'); 'ray' uses Ray actor calls and object references, Serve's default for "
        "handles — for clusters whose nodes cannot reach the replicas' own gRPC ports.")


def validate_settings(raw: dict | None) -> RouterSettings:
    try:
        return RouterSettings.model_validate(raw or {})
    except ValidationError as err:
        first = err.errors()[0]
        path = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"router.{path}: {first['msg']} (got {first.get('input')!r:.80})") from None


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "policy" else v
    return out


# --------------------------------------------------------------------------------------------------------------
# Request bodies (OpenAI's field names; unknown fields are ignored as OpenAI clients send extras)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Sampling(_Body):
    model: str = Field("auto", description="A deployment name, or 'auto' to let the routing policy choose.")
    max_tokens: int = Field(16, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy (cacheable).")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the completion.")
    stream: bool = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Fixed seed: sampled yet reproducible.")
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")
    user: str | None = Field(None, max_length=256, description="User/session id: A/B and canary stick to it.")


class CompletionRequest(_Sampling):
    prompt: str = Field(description="Text to continue.")


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class FeedbackRequest(_Body):
    id: str = Field(description="The `id` of a completion this router returned.")
    reward: float = Field(ge=0, le=1, description="How good the answer was: 0 bad … 1 good.")


class CalibrateRequest(_Body):
    target_escalation_rate: float = Field(ge=0, le=1)
    scores: list[float] | None = Field(None, description="Judge scores to calibrate on (default: recent traffic).")


CHAT_STOP = "\nuser:"


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The documented chat template: one `role: content` line per message, then `assistant:` to continue."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


# --------------------------------------------------------------------------------------------------------------
# The deployment

class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return super().render(finite(content))


app = FastAPI(title="scalestack router", version="1.0",
              description="OpenAI-compatible completions over scalestack models, routed by policy.")


def _error(status: int, message: str, code: str, headers: dict | None = None, param: str | None = None) -> _JSON:
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 422: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
    return _JSON({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, err: RequestValidationError) -> _JSON:
    first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc) or "body"
    return _error(422, f"{where}: {first.get('msg')}", "invalid_value", param=where)


def _cause_message(err: BaseException) -> str:
    """A UserError's own one line, also when it crossed a Ray handle (RayTaskError keeps it as .cause)."""
    cause = getattr(err, "cause", None)
    return str(cause if isinstance(cause, UserError) else err.args[0] if err.args else err)


class _Refused(Exception):
    """A request turned away (key, rate, body): raised anywhere on the request path, answered by the handler below."""

    def __init__(self, response: JSONResponse) -> None:
        self.response = response


@app.exception_handler(_Refused)
async def _refused(request: Request, err: _Refused) -> JSONResponse:
    return err.response


# Helpers the Router uses are defined before it: Serve serialises the class when the decorator runs.

_RESPONSE_MEMORY = 10_000


async def _json_object(request: Request) -> dict:
    try:
        raw = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise _Refused(_error(400, "body is not valid JSON", "invalid_json")) from None
    if not isinstance(raw, dict):
        raise _Refused(_error(400, "body must be a JSON object", "invalid_json"))
    return raw


def _meta(result: dict) -> dict:
    meta = {"model": result["model"], "route": result["route"], "cache": result["cache"],
            "escalated": result["escalated"]}
    if "similarity" in result:
        meta["similarity"] = result["similarity"]
    return meta


def _headers(result: dict, rid: str) -> dict[str, str]:
    return {"x-scalestack-model": result["model"], "x-scalestack-route": result["route"],
            "x-scalestack-cache": result["cache"], "x-scalestack-escalated": str(result["escalated"]).lower(),
            "x-scalestack-request-id": rid}


# --------------------------------------------------------------------------------------------------------------
# Calling model replicas: retried when one dies mid-request, timed for Server-Timing. Nothing here imports torch:
# the router's process never loads it (the first request used to pay ~1.3 s for `import torch`).


def replica_died(err: BaseException) -> bool:
    """Whether `err` means the replica serving the request died (or became unreachable), so the same request
    sent again goes to a live replica."""
    from ray.exceptions import RayActorError, RayTaskError

    return isinstance(err, RayActorError) or (
        isinstance(err, RayTaskError) and isinstance(getattr(err, "cause", None), RayActorError))


async def call_with_retry(call: Callable[[], Awaitable[Any]], *, attempts: int = 3, backoff_s: float = 0.05) -> Any:
    """Await `call()` (e.g. `lambda: handle.generate.remote(req)`), sending it again when its replica died.

    Serve's handle stops routing to a dead replica, but a request already running there fails with
    ActorDiedError; generate/score/embed/info have no side effects, so sending them again is safe. Streams are
    not retried (tokens may already have reached the client).

    When the awaiting task is cancelled (the request timed out, or its client left), the call is cancelled too:
    awaiting a DeploymentResponse does not do that by itself, and the model would go on decoding for nobody.
    """
    for attempt in range(attempts):
        response = None
        try:
            response = call()
            return await response
        except asyncio.CancelledError:
            cancel = getattr(response, "cancel", None)  # a DeploymentResponse; plain coroutines in unit tests
            if cancel is not None:
                cancel()
            raise
        except Exception as err:  # noqa: BLE001 - re-raised unless it is a replica death
            if not replica_died(err) or attempt == attempts - 1:
                raise
            logger.warning("replica died during a request; retrying (%d/%d)", attempt + 1, attempts - 1)
            await asyncio.sleep(backoff_s * 2**attempt)


class _Clock:
    """Seconds a request spent waiting on model replicas; the rest of its time in the router is the router's own."""

    __slots__ = ("model_s",)

    def __init__(self) -> None:
        self.model_s = 0.0

    async def wait(self, call: Callable[[], Awaitable[Any]]) -> Any:
        t0 = time.perf_counter()
        try:
            return await call_with_retry(call)
        finally:
            self.model_s += time.perf_counter() - t0

    def server_timing(self, start: float) -> str:
        """The W3C Server-Timing header: `router;dur=MS, model;dur=MS` (browsers' devtools show it)."""
        total = time.perf_counter() - start
        return f"router;dur={1e3 * (total - self.model_s):.2f}, model;dur={1e3 * self.model_s:.2f}"


def _in_ray() -> bool:
    import ray

    return ray.is_initialized()


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class Router:
    """Ingress over `models` (deployment name → handle), configured by `settings` (RouterSettings fields)."""

    def __init__(self, models: dict[str, Any], settings: dict | None = None) -> None:
        if not models:
            raise ConfigError("router: no models to route to; deploy at least one LMServer")
        self._handles = dict(models)  # as deployed; self.models (set by _apply) holds them with the transport's options
        self._raw_settings = dict(settings or {})
        self._infos: dict[str, dict] = {}
        self._responses: OrderedDict[str, tuple[str, list]] = OrderedDict()  # response id → (model, credit)
        self._background: set[asyncio.Task] = set()
        self._policy_version = 0
        self._apply(validate_settings(self._raw_settings))

    # -- settings --------------------------------------------------------------------------------------------

    def reconfigure(self, user_config: dict) -> None:
        """Live settings from the deployment's user_config, merged over the deploy-time settings."""
        self._apply(validate_settings(_merge(self._raw_settings, user_config or {})))

    def _apply(self, s: RouterSettings) -> None:
        names = list(self._handles)
        default = s.default_model or names[0]
        if default not in self._handles:
            raise ConfigError(f"router.default_model: unknown model '{default}'; deployed: {', '.join(names)}")
        embed_model = s.cache.semantic.embed_model or names[0]
        if embed_model not in self._handles:
            raise ConfigError(f"router.cache.semantic.embed_model: unknown model '{embed_model}'; "
                              f"deployed: {', '.join(names)}")
        old = getattr(self, "settings", None)
        self.settings, self.default_model, self.embed_model = s, default, embed_model
        self.keys = guards.configured_keys(s.guard.api_keys)
        self.limiter = guards.RateLimiter(s.guard.rate_per_s, s.guard.burst)
        if old is None or old.model_transport != s.model_transport:
            by_reference = s.model_transport == "ray"
            self.models = {name: h.options(_by_reference=by_reference) for name, h in self._handles.items()}
        if old is None or old.policy != s.policy:
            self._set_policy(s.policy)
        if old is None or old.cache != s.cache:
            e, m = s.cache.exact, s.cache.semantic
            self.exact = ExactCache(e.max_entries, e.ttl_s)
            self.semantic = SemanticCache(m.threshold, m.max_entries, m.ttl_s)
            self.hashing = HashingEmbedder()
        if old is None or old.drift != s.drift:
            mix = manifest_domain_mix(s.drift.manifest) if s.drift.manifest else None
            self.drift = DriftMonitor(mix, s.drift.reference_lengths, s.drift.window)
        if old is None:
            self.metrics = RouterMetrics(export=s.export_metrics and _in_ray())
            self.rng = random.Random(s.seed)

    def _set_policy(self, raw: Any) -> None:
        self.policy: Policy | None = None if raw is None else build_policy(raw, self.models)
        self.policy_spec = raw
        self._policy_version += 1
        domain_nodes = [p for p in walk(self.policy) if isinstance(p, DomainRoute)] if self.policy else []
        self.classifier = domain_nodes[0].classifier if domain_nodes else builtin_classifier()

    # -- guard -----------------------------------------------------------------------------------------------

    def _admit(self, request: Request, admin: bool = False) -> str:
        """Check the key (when needed) and the caller's rate; returns the caller id. Raises _Refused."""
        client = request.client.host if request.client else None
        presented = guards.bearer_token(request.headers.get("authorization"))
        try:
            if admin and not self.keys:
                raise guards.GuardError(403, "admin endpoints need an API key; set router.guard.api_keys or "
                                             f"${guards.API_KEYS_ENV}", "admin_needs_key")
            if admin or guards.key_required(self.settings.guard.bind_host, client):
                caller = "key:" + guards.check_key(self.keys, presented)
            else:
                caller = f"host:{client}"
            self.limiter.check(caller)
        except guards.GuardError as err:
            self.metrics.error(err.status)
            raise _Refused(_error(err.status, err.message, err.code, err.headers)) from None
        return caller

    def _check_body(self, body: _Sampling, prompt: str, name: str) -> None:
        g = self.settings.guard
        try:
            guards.check_text(name, prompt, g.max_prompt_chars)
            guards.check_max_tokens(body.max_tokens, g.max_tokens_limit)
            if body.user is not None:
                guards.check_text("user", body.user, 256)
        except guards.GuardError as err:
            self.metrics.error(err.status)
            raise _Refused(_error(err.status, err.message, err.code, param=name)) from None
        if body.model != "auto" and body.model not in self.models:
            self.metrics.error(404)
            raise _Refused(_error(404, f"model '{body.model}' is not deployed; use 'auto' or one of "
                                       f"{', '.join(self.models)} (GET /v1/models)", "model_not_found", param="model"))

    # -- endpoints -------------------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: the router answers and knows its models (no key needed)."""
        return {"status": "ok", "models": list(self.models)}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> _JSON:
        self._admit(request)
        data = [{"id": "auto", "object": "model", "created": 0, "owned_by": "scalestack",
                 "scalestack": {"policy": self.policy_spec}}]
        for name in self.models:
            info = await self._info(name)
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "scalestack",
                         "scalestack": {k: info.get(k) for k in ("parameters", "seq_len", "vocab_size",
                                                                 "quantization", "max_batch_size")}})
        return _JSON({"object": "list", "data": data})

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        return await self._serve(body, body.prompt, "prompt", chat=False, request=request)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest, request: Request):
        return await self._serve(body, chat_prompt(body.messages), "messages", chat=True, request=request)

    @app.post("/v1/feedback")
    async def feedback(self, body: FeedbackRequest, request: Request) -> _JSON:
        """A reward in [0, 1] for a response: feeds the bandit's posteriors and the canary's quality."""
        self._admit(request)
        entry = self._responses.get(body.id)
        if entry is None:
            return _error(404, f"no recent response with id '{body.id}' (feedback is kept for the last "
                               f"{_RESPONSE_MEMORY} responses of this replica)", "unknown_response", param="id")
        model, credit = entry
        for policy, arm in credit:
            policy.reward(arm, body.reward)
        return _JSON({"id": body.id, "model": model, "credited": [type(p).__name__.lower() for p, _ in credit]})

    @app.get("/v1/stats")
    async def stats(self, request: Request) -> _JSON:
        """Counts, latency, cache, escalations, shadow agreement, drift and policy state of this replica."""
        self._admit(request)
        return _JSON(self._stats())

    @app.get("/v1/admin/policy")
    async def get_policy(self, request: Request) -> _JSON:
        self._admit(request, admin=True)
        return _JSON({"policy": self.policy_spec, "version": self._policy_version,
                             "state": describe(self.policy) if self.policy else {}})

    @app.post("/v1/admin/policy")
    async def set_policy(self, request: Request) -> _JSON:
        """Replace the policy tree of this replica (body: {"policy": tree}); learnt state starts afresh."""
        self._admit(request, admin=True)
        raw = await _json_object(request)
        if set(raw) != {"policy"}:
            return _error(400, "body must be {\"policy\": <policy tree>} (see README 'Routing policies')",
                          "invalid_policy", param="policy")
        try:
            self._set_policy(raw["policy"])
        except UserError as err:  # ConfigError, or DataError from a classifier's data folder
            return _error(400, str(err), "invalid_policy", param="policy")
        self.settings = self.settings.model_copy(update={"policy": raw["policy"]})
        return _JSON({"policy": self.policy_spec, "version": self._policy_version})

    @app.post("/v1/admin/calibrate")
    async def calibrate(self, body: CalibrateRequest, request: Request) -> _JSON:
        """Set every cascade's threshold so that the target share of judged answers would escalate."""
        self._admit(request, admin=True)
        cascades = [p for p in walk(self.policy) if isinstance(p, Cascade)] if self.policy else []
        if not cascades:
            return _error(400, "the current policy has no cascade to calibrate", "no_cascade")
        try:
            out = {f"{c.student}>{c.teacher}": c.calibrate(body.target_escalation_rate, body.scores)
                   for c in cascades}
        except ConfigError as err:
            return _error(400, str(err), "cannot_calibrate")
        return _JSON({"thresholds": out, "target_escalation_rate": body.target_escalation_rate})

    # -- the request path ------------------------------------------------------------------------------------

    async def _serve(self, body: _Sampling, prompt: str, name: str, chat: bool, request: Request):
        start = time.perf_counter()
        self._admit(request)
        self._check_body(body, prompt, name)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stops = [s for s in stops if s][:4] + ([CHAT_STOP] if chat else [])
        params = {"max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                  "top_k": body.top_k, "stop": stops, "seed": body.seed}
        timeout = self.settings.guard.request_timeout_s
        clock = _Clock()
        try:
            # asyncio.timeout rather than wait_for: the route runs in this task, not a task of its own, which
            # saves two trips through the event loop per request; a timeout still cancels the model call.
            async with asyncio.timeout(timeout):
                if body.stream:
                    head = await self._route(prompt, body, params, rid, clock, stream=True)
                    return self._stream_response(head, rid, chat, start, prompt, params, body.model)
                result = await self._route(prompt, body, params, rid, clock, stream=False)
        except TimeoutError:
            self.metrics.error(504)
            return _error(504, f"no answer within router.guard.request_timeout_s={timeout:g} s; retry, or ask "
                               "for fewer max_tokens", "timeout")
        except UserError as err:
            self.metrics.error(400)
            return _error(400, _cause_message(err), "invalid_request", param=name)
        except Exception as err:  # noqa: BLE001 - a model failure is the server's, never the client's crash
            logger.exception("router: request %s failed", rid)
            self.metrics.error(503)
            return _error(503, f"the model call failed ({type(err).__name__}); retry later", "model_unavailable")
        self._finish(result, prompt, start)
        return _JSON(self._body(result, rid, chat),
                     headers={**_headers(result, rid), "server-timing": clock.server_timing(start)})

    async def _route(self, prompt: str, body: _Sampling, params: dict, rid: str, clock: _Clock,
                     stream: bool) -> dict:
        """Cache, policy, model call(s) and judge. Returns the answer and how it was reached; for a stream whose
        answer is not known yet, `pending` holds the model and request to stream from. Model calls go through
        `clock`, which keeps the time spent waiting on them."""
        deterministic = is_deterministic(params)
        route_key = body.model if body.model != "auto" else f"auto#{self._policy_version}"
        ckey = exact_key(prompt, route_key, params)
        exact_on, sem_on = self.settings.cache.exact.enabled, self.settings.cache.semantic.enabled
        vector = None
        if deterministic and exact_on:
            hit = self.exact.get(ckey)
            if hit is not None:
                return {**hit, "route": "cache", "cache": "exact", "escalated": False, "credit": []}
        if deterministic and sem_on:
            vector = await self._embed(prompt, clock)
            hit = self.semantic.get(vector, params_key(route_key, params))
            if hit is not None:
                self._maybe_verify(hit.value, prompt, params)
                return {**hit.value, "route": "cache", "cache": "semantic", "escalated": False, "credit": [],
                        "similarity": round(hit.similarity, 4)}
        cache_state = "miss" if deterministic and (exact_on or sem_on) else "off"

        if body.model != "auto":
            decision = Decision(body.model, ["explicit"])
        elif self.policy is None:
            decision = Decision(self.default_model, ["default"])
        else:
            decision = self.policy.decide(RouteRequest(prompt, body.user, rid), self.rng)
        req = {"prompt": prompt, **params}
        escalated = False
        if stream and decision.cascade is None:
            out = {"pending": True}
        else:
            out = await self._call(decision, req, clock)
            if decision.cascade is not None:
                out, escalated = await self._judge(decision, req, out, clock)
        if decision.shadow and decision.shadow != decision.model:
            self._spawn(self._shadow(decision.shadow, req, out if "text" in out else None))
        result = {**out, "model": out.get("model", decision.model), "route": decision.route,
                  "cache": cache_state, "escalated": escalated, "credit": decision.credit, "request": req,
                  "deterministic": deterministic, "ckey": ckey, "vector": vector,
                  "skey": params_key(route_key, params)}
        if "pending" in out:
            result["model"] = decision.model
        return result

    async def _call(self, decision: Decision, req: dict, clock: _Clock) -> dict:
        """generate() on the chosen model; a canary arm's failure is recorded before the error propagates."""
        handle = self.models[decision.model]
        try:
            out = await clock.wait(lambda: handle.generate.remote(req))
        except UserError:
            raise
        except Exception:
            for policy, arm in decision.credit:
                policy.outcome(arm, False, None)
            raise
        quality = math.exp(out["mean_logprob"]) if math.isfinite(out.get("mean_logprob", math.nan)) else None
        for policy, arm in decision.credit:
            policy.outcome(arm, True, quality)
        return out

    async def _judge(self, decision: Decision, req: dict, out: dict, clock: _Clock) -> tuple[dict, bool]:
        """Score the student's answer; below the threshold the teacher answers instead."""
        cascade = decision.cascade
        teacher_lp = None
        if cascade.judge == "teacher":
            if out["text"]:
                scored = await clock.wait(lambda: self.models[cascade.teacher].score.remote(
                    {"prompt": req["prompt"], "continuation": out["text"]}))
                teacher_lp = scored["mean_logprob"]
            else:
                teacher_lp = float("nan")  # nothing to judge: escalate
        score = cascade.score(out, teacher_lp)
        decision.reasons.append(f"judge={score:.3f}")
        if not cascade.should_escalate(score):
            return out, False
        decision.reasons.append("escalated")
        decision.model = cascade.teacher
        teacher_out = await clock.wait(lambda: self.models[cascade.teacher].generate.remote(req))
        return teacher_out, True

    async def _embed(self, prompt: str, clock: _Clock) -> list[float]:
        if self.settings.cache.semantic.embedder == "hashing":
            return self.hashing(prompt)
        return await clock.wait(lambda: self.models[self.embed_model].embed.remote({"text": prompt}))

    def _maybe_verify(self, cached: dict, prompt: str, params: dict) -> None:
        """For a sampled share of semantic hits, ask the model afresh and count a different answer as wrong."""
        if self.rng.random() >= self.settings.cache.semantic.verify_fraction:
            return

        async def verify() -> None:
            fresh = await self.models[cached["model"]].generate.remote({"prompt": prompt, **params})
            self.semantic.record_check(fresh["text"] == cached["text"])

        self._spawn(verify())

    async def _shadow(self, model: str, req: dict, primary: dict | None) -> None:
        """Ask the shadow model too; compare with the primary answer; log, never return."""
        shadow = await self.models[model].generate.remote(req)
        if primary is None:
            return
        agreement = text_agreement(primary["text"], shadow["text"])
        self.metrics.shadow(agreement, shadow["text"] == primary["text"])
        logger.info("shadow %s vs %s: agreement %.3f", model, primary.get("model"), agreement)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception() and logger.warning(
            "router background task failed: %r", t.exception()))

    def _finish(self, result: dict, prompt: str, start: float) -> None:
        """Cache fill, response memory for feedback, metrics and drift after an answer is complete."""
        if result["cache"] == "miss":
            value = {k: result[k] for k in ("text", "finish_reason", "prompt_tokens", "completion_tokens", "model")}
            if self.settings.cache.exact.enabled:
                self.exact.put(result["ckey"], value)
            if self.settings.cache.semantic.enabled and result["vector"] is not None:
                self.semantic.put(result["vector"], result["skey"], prompt, value)
        tokens = 0 if result["cache"] in ("exact", "semantic") else result.get("completion_tokens", 0)
        self.metrics.record(result["route"] if result["cache"] not in ("exact", "semantic") else "cache",
                            result["model"], result["cache"], result["escalated"], time.perf_counter() - start,
                            tokens)
        self.drift.observe(self.classifier.predict(prompt), len(prompt))

    def _remember(self, rid: str, result: dict) -> None:
        self._responses[rid] = (result["model"], result.get("credit", []))
        while len(self._responses) > _RESPONSE_MEMORY:
            self._responses.popitem(last=False)

    def _body(self, result: dict, rid: str, chat: bool) -> dict:
        self._remember(rid, result)
        usage = {"prompt_tokens": result.get("prompt_tokens", 0), "completion_tokens": result.get("completion_tokens", 0)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                      "finish_reason": result["finish_reason"], "logprobs": None}
        else:
            choice = {"index": 0, "text": result["text"], "finish_reason": result["finish_reason"], "logprobs": None}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": result["model"], "choices": [choice], "usage": usage, "scalestack": _meta(result)}

    # -- streaming -------------------------------------------------------------------------------------------

    def _stream_response(self, head: dict, rid: str, chat: bool, start: float, prompt: str, params: dict,
                         requested: str) -> StreamingResponse:
        self._remember(rid, head)
        return StreamingResponse(self._sse(head, rid, chat, start, prompt), media_type="text/event-stream",
                                 headers=_headers(head, rid))

    async def _sse(self, head: dict, rid: str, chat: bool, start: float, prompt: str) -> AsyncIterator[str]:
        """OpenAI's chunk format: `data: {chunk}` lines, then `data: [DONE]`."""
        created, model = int(time.time()), head["model"]

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                    "model": model, "choices": [choice]}
            if first:
                body["scalestack"] = _meta(head)
            return f"data: {json.dumps(body)}\n\n"

        yield chunk(None, None, first=True)
        if "pending" not in head:
            yield chunk(head["text"], head["finish_reason"])
            self._finish(head, prompt, start)
            yield "data: [DONE]\n\n"
            return
        parts, finish, n, gen = [], None, 0, None
        timeout = self.settings.guard.request_timeout_s
        try:
            gen = self.models[model].options(stream=True).stream.remote(head["request"])
            while finish is None:
                event = await asyncio.wait_for(gen.__anext__(), timeout)
                parts.append(event["text"])
                finish, n = event["finish_reason"], n + 1
                yield chunk(event["text"], finish)
        except StopAsyncIteration:
            pass
        except Exception as err:  # noqa: BLE001 - the status line has gone out: report in-band, end the stream
            if isinstance(err, asyncio.TimeoutError):
                message, status = (f"no token within router.guard.request_timeout_s={timeout:g} s; retry, or raise "
                                   "the timeout"), 504
            elif isinstance(err, UserError):
                message, status = _cause_message(err), 400
            else:
                message, status = f"stream failed ({type(err).__name__})", 503
            self.metrics.error(status)
            yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
            yield "data: [DONE]\n\n"
            return
        finally:
            if gen is not None and finish is None:  # timed out, failed or the client left: free the model's row
                gen.cancel()
        result = {**head, "text": "".join(parts), "finish_reason": finish or "stop", "completion_tokens": n,
                  "prompt_tokens": 0}
        self._finish(result, prompt, start)
        yield "data: [DONE]\n\n"

    # -- helpers ---------------------------------------------------------------------------------------------

    async def _info(self, name: str) -> dict:
        if name not in self._infos:
            try:
                self._infos[name] = await asyncio.wait_for(self.models[name].info.remote(), 30)
            except Exception as err:  # noqa: BLE001 - listing must not fail because one model is starting
                return {"error": type(err).__name__}
        return self._infos[name]

    def _stats(self) -> dict:
        drift = self.drift.report()
        self.metrics.drift(drift["score"])
        return {**self.metrics.report(),
                "cache_exact": self.exact.stats.as_dict(), "cache_semantic": self.semantic.stats.as_dict(),
                "drift": drift, "policy": describe(self.policy) if self.policy else {},
                "policy_version": self._policy_version,
                # from the handles themselves, not the setting: what the model calls really use
                "model_transport": {name: "ray" if h.handle_options._by_reference else "grpc"
                                    for name, h in self.models.items()}}
