"""LMServer: one registry artifact served by Ray Serve — batched KV-cache generation, streaming, scoring, embeddings.

    LMServer.options(name="teacher").bind("runs/demo/artifact", "teacher", {"max_batch_size": 16})

Every method takes and returns plain dicts (cheap across a DeploymentHandle). Generation is continuously batched:
`@serve.batch` gathers the requests that arrive together (up to max_batch_size, for batch_wait_timeout_s), and the
group joins the one left-padded KV-cache batch already decoding at its next step (`decoding.ContinuousBatcher`,
`GPT.forward_padded`) instead of waiting for it to finish. Each row keeps its own max_tokens, stop strings and
sampling settings and leaves the batch the step it finishes, so its caller gets its answer without waiting for
the longest row; a caller that goes away (a cancelled call, a closed stream) frees its row at the next step.
Greedy output is the same batched or alone. The torch work runs on one worker thread, so the replica's event
loop keeps accepting requests while the batch decodes.

A text prompt starts a document: training saw every document after an eos token, so the context is
[eos] + tokens(prompt) (counted in prompt_tokens). `prompt_ids` are used as given.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import secrets
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from torch.nn import functional as F

from app.errors import UserError
from app.model import GPT
from serve_deployments.decoding import ContinuousBatcher, Sequence, warm_up

logger = logging.getLogger("ray.serve")

# ---- requests and settings (validated at the edge; one-line UserErrors) -------------------------------------


class _Request(BaseModel):
    # The router passes OpenAI-shaped bodies through; keys this server does not use (model, user, n, ...) are
    # the router's business, so they are ignored here rather than rejected.
    model_config = ConfigDict(extra="ignore", strict=False)


class GenerationRequest(_Request):
    """One completion: a prompt (text or token ids) and how to continue it."""

    prompt: str | None = Field(None, description="Text to continue.")
    prompt_ids: list[int] | None = Field(None, description="Token ids to continue (instead of prompt).")
    max_tokens: int = Field(16, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 = greedy; else softmax temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (1 = off).")
    top_k: int | None = Field(None, ge=1, description="Sample among the k likeliest tokens (None = off).")
    stop: list[str] = Field(default_factory=list, max_length=8, description="Strings that end the completion.")
    seed: int | None = Field(None, description="Seed of this request's sampling (same seed, same output).")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [] if v is None else [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop strings must not be empty")
        return v


class ScoreRequest(_Request):
    prompt: str = ""
    continuation: str = Field(min_length=1)


class EmbedRequest(_Request):
    text: str = Field(min_length=1)


class LiveSettings(BaseModel):
    """Settings a running replica takes through reconfigure(user_config) (also the deployment's `settings`)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, le=256, description="Most requests decoded together in one batch.")
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=5.0,
                                        description="Seconds a batch waits for more requests before it starts.")
    continuous_batching: bool = Field(True, description="Requests join the running batch between steps (False: "
                                      "a batch runs until its last request finishes before the next starts).")
    max_tokens_limit: int | None = Field(None, ge=1, description="Largest max_tokens a request may ask for "
                                         "(default: the model's context).")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: the replica's "
                                      "num_cpus, at least 1).")


def _validate(model: type[BaseModel], data: Any, what: str) -> Any:
    """`model(**data)` with a pydantic error turned into a one-line UserError naming the field."""
    if not isinstance(data, dict):
        raise UserError(f"{what} must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or what
        raise UserError(f"{what}.{loc}: {first['msg']} (got {first.get('input')!r:.60})") from None


# ---- scoring and embedding (right-padded batches: a causal model never looks at later pads) ------------------


@torch.inference_mode()
def score_batch(model: GPT, items: list[tuple[list[int], int]], pad_id: int) -> list[dict]:
    """Mean log-probability (nats per token) of ids[n_context:] given ids[:n_context], for each (ids, n_context)."""
    idx = _right_padded([ids for ids, _ in items], pad_id, model)
    logp = F.log_softmax(model(idx)[0].float(), dim=-1)  # [B, T, V]
    out = []
    for row, (ids, n_context) in enumerate(items):
        targets = torch.tensor(ids[n_context:], device=idx.device)  # [n]
        lp = logp[row, n_context - 1:len(ids) - 1].gather(1, targets[:, None])  # token t is predicted at t - 1
        out.append({"mean_logprob": float(lp.mean()), "tokens": len(targets)})
    return out


@torch.inference_mode()
def embed_batch(model: GPT, texts: list[list[int]], pad_id: int) -> list[list[float]]:
    """Unit-length mean of the final (layer-normed) hidden states over each text's tokens."""
    idx = _right_padded(texts, pad_id, model)
    x = model.embed(idx)
    for block in model.blocks:
        x = block(x)
    h = model.head.ln_f(x)  # [B, T, D]
    lengths = torch.tensor([len(t) for t in texts], device=idx.device)
    real = (torch.arange(idx.size(1), device=idx.device) < lengths[:, None]).unsqueeze(-1)  # [B, T, 1]
    mean = (h * real).sum(dim=1) / lengths[:, None]  # [B, D]
    return F.normalize(mean.float(), dim=-1).tolist()


def _right_padded(rows: list[list[int]], pad_id: int, model: GPT) -> torch.Tensor:
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), pad_id, dtype=torch.long, device=model.embed.wte.weight.device)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return idx


# ---- the deployment --------------------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class LMServer:
    """Serves one artifact (a folder or registry name) under `name`; `settings` are LiveSettings fields.
    compile=True runs the model through torch.compile (GPT.compile_decoding) and compiles its graphs before the
    replica takes requests (tens of seconds per replica on a small CPU)."""

    def __init__(self, artifact: str, name: str, settings: dict | None = None, compile: bool = False) -> None:
        from app.registry import load_artifact

        self.name = name
        self.artifact = load_artifact(artifact)
        self.model, self.tokenizer = self.artifact.model.eval(), self.artifact.tokenizer
        self.seq_len = self.model.cfg.seq_len
        # One worker thread runs all torch work: batches never run two forwards at once on the same cores, and
        # the event loop stays free to accept and batch requests meanwhile.
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lm-{name}")
        self.settings = LiveSettings()
        self._batcher = ContinuousBatcher(self.model, self.tokenizer.pad_id, self._worker)
        self._draining: set[asyncio.Task] = set()
        self._apply(_validate(LiveSettings, settings or {}, "settings"))
        if compile:
            if (self.artifact.card.get("quantization_config") or {}).get("backend") == "torch.ao":
                logger.warning("%s: compile with torch.ao int8 layers: the compiler cannot fuse them and decoding "
                               "may be slower than eager; quantize with --backend torchao to compile int8", name)
            self.model.compile_decoding()
            seconds = self._worker.submit(self._warm_up).result()
            logger.info("%s: compiled the model's decoding in %.1f s", name, seconds)

    def _warm_up(self) -> float:
        """Compile every graph requests will use: decoding (decoding.warm_up) and scoring (one row and several;
        the compiler specializes a graph to the first sizes it sees, and compiles a general one on the next)."""
        start = time.perf_counter()
        warm_up(self.model, self.tokenizer.pad_id)
        for rows in (1, 2, 3):
            score_batch(self.model, [([1, 2, 3], 1)] * rows, self.tokenizer.pad_id)
        return time.perf_counter() - start

    # -- live settings --

    def reconfigure(self, user_config: dict) -> None:
        """Live settings (max_batch_size, batch_wait_timeout_s, max_tokens_limit, torch_threads) from the
        deployment's user_config; fields left out keep their current value."""
        merged = {**self.settings.model_dump(exclude_unset=True), **(user_config or {})}
        self._apply(_validate(LiveSettings, merged, "user_config"))

    def _apply(self, settings: LiveSettings) -> None:
        self.settings = settings
        self._batcher.max_batch_size = settings.max_batch_size
        self._batcher.continuous = settings.continuous_batching
        for method in (self._decode_batch, self._score_batch, self._embed_batch):
            method.set_max_batch_size(settings.max_batch_size)
            method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        threads = settings.torch_threads or _replica_cpus()
        self._worker.submit(torch.set_num_threads, threads).result()
        self.torch_threads = threads

    # -- generation --

    def _sequence(self, req: dict) -> Sequence:
        r: GenerationRequest = _validate(GenerationRequest, req, "request")
        if (r.prompt is None) == (r.prompt_ids is None):
            raise UserError("request: give exactly one of prompt (text) or prompt_ids (token ids)")
        if r.prompt_ids is not None:
            ids = r.prompt_ids
            if not ids:
                raise UserError("request.prompt_ids: empty; give at least one token id")
            if min(ids) < 0 or max(ids) >= self.model.cfg.vocab_size:
                raise UserError(f"request.prompt_ids: ids must lie in [0, {self.model.cfg.vocab_size})")
        else:
            ids = [self.tokenizer.eos_id, *self.tokenizer.encode(r.prompt)]
        limit = min(self.settings.max_tokens_limit or self.seq_len, self.seq_len)
        if r.max_tokens > limit:
            raise UserError(f"request.max_tokens={r.max_tokens} is over this server's limit of {limit}; ask for fewer")
        if len(ids) + r.max_tokens > self.seq_len:
            raise UserError(
                f"request: prompt of {len(ids)} tokens + max_tokens={r.max_tokens} exceeds {self.name}'s context of "
                f"{self.seq_len} tokens; shorten the prompt or lower max_tokens")
        generator = None
        if r.temperature > 0:
            generator = torch.Generator().manual_seed(r.seed if r.seed is not None else secrets.randbits(63))
        return Sequence(ids, r.max_tokens, r.temperature, r.top_k, r.top_p if r.top_p < 1 else None,
                        tuple(r.stop), generator, self.tokenizer)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, max_concurrent_batches=64)
    async def _decode_batch(self, seqs: list[Sequence]) -> AsyncIterator[list]:
        """Serve hands over the sequences that arrived together; they join the running batch, and this yields one
        event per sequence per step (StopIteration once a sequence has finished, which ends its caller's stream)."""
        async with aclosing(self._batcher.join(seqs)) as steps:
            async for events in steps:
                yield [StopIteration if e is None else e for e in events]

    async def generate(self, req: dict) -> dict:
        """A completion: text, token_ids, prompt/completion token counts, finish_reason, mean_logprob,
        mean_entropy, prompt_logprob (None for a one-token prompt), model. Returns as soon as this request
        finishes, whatever else is decoding with it."""
        seq = self._sequence(req)
        async for _ in self._events(seq):
            pass
        return seq.result(self.name)

    async def stream(self, req: dict) -> AsyncIterator[dict]:
        """The completion token by token: {"text": new text, "token_id", "finish_reason": None|"stop"|"length"}.
        Text that may be the start of a stop string is held back until it is known not to be."""
        async for event in self._events(self._sequence(req)):
            yield event

    async def _events(self, seq: Sequence) -> AsyncIterator[dict]:
        """seq's stream events up to its last; if the caller goes away first, its row leaves the batch."""
        events = self._decode_batch(seq)
        try:
            async for event in events:
                yield event
                if event["finish_reason"] is not None:
                    self._drain(events)
                    return
        finally:
            self._batcher.cancel(seq)  # no-op once finished

    def _drain(self, events: AsyncIterator[dict]) -> None:
        """Read a finished sequence's end-of-stream marker in the background. Serve resolves one more future for
        it a step later (with StopAsyncIteration); left unread, asyncio would log it as an unretrieved error."""
        async def drain() -> None:
            async for _ in events:
                pass

        task = asyncio.ensure_future(drain())
        self._draining.add(task)  # a reference, so the task is not garbage-collected mid-way
        task.add_done_callback(self._draining.discard)

    # -- scoring and embedding --

    async def score(self, req: dict) -> dict:
        """{"mean_logprob", "tokens"}: the mean log-likelihood (nats/token) of req["continuation"] after
        req["prompt"]. A prompt too long for the context loses its oldest tokens."""
        r: ScoreRequest = _validate(ScoreRequest, req, "request")
        cont = self.tokenizer.encode(r.continuation)
        if len(cont) >= self.seq_len:
            raise UserError(f"request.continuation: {len(cont)} tokens does not fit {self.name}'s context of "
                            f"{self.seq_len}; score at most {self.seq_len - 1} tokens")
        context = [self.tokenizer.eos_id, *self.tokenizer.encode(r.prompt)][-(self.seq_len - len(cont)):]
        return await self._score_batch((context + cont, len(context)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _score_batch(self, items: list[tuple[list[int], int]]) -> list[dict]:
        return await asyncio.get_running_loop().run_in_executor(
            self._worker, score_batch, self.model, items, self.tokenizer.pad_id)

    async def embed(self, req: dict) -> list[float]:
        """A unit vector for req["text"]: the mean of the model's final hidden states (semantic-cache key)."""
        r: EmbedRequest = _validate(EmbedRequest, req, "request")
        return await self._embed_batch([self.tokenizer.eos_id, *self.tokenizer.encode(r.text)][:self.seq_len])

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, texts: list[list[int]]) -> list[list[float]]:
        return await asyncio.get_running_loop().run_in_executor(
            self._worker, embed_batch, self.model, texts, self.tokenizer.pad_id)

    async def info(self) -> dict:
        """What this deployment serves and how: sizes, quantization, live settings, the artifact's card."""
        card = self.artifact.card
        return {
            "name": self.name, "artifact": str(self.artifact.path),
            # the card's count: a quantized model's int8 weights are no longer nn.Parameters
            "parameters": card.get("parameters") or self.model.num_params(non_embedding=False),
            "seq_len": self.seq_len,
            "vocab_size": self.model.cfg.vocab_size, "quantization": card.get("quantization") or "none",
            "max_batch_size": self.settings.max_batch_size, "batch_wait_timeout_s": self.settings.batch_wait_timeout_s,
            "continuous_batching": self.settings.continuous_batching,
            "max_tokens_limit": min(self.settings.max_tokens_limit or self.seq_len, self.seq_len),
            "torch_threads": self.torch_threads, "compiled": self.model.compiled,
            "batch_stats": dict(self._batcher.stats), "card": card,
        }


def _replica_cpus() -> int:
    """Whole CPUs Ray gave this replica (ray_actor_options num_cpus), at least 1: torch's thread count."""
    import ray

    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # noqa: BLE001 - outside an actor (unit tests): one thread
        cpus = 1.0
    return max(1, math.floor(cpus))
