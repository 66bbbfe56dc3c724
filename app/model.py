"""The GPT network: parameters and their init, forward and loss, KV-cached generation, and counts of parameters
and FLOPs; also its split into layers for DeepSpeed's PipelineModule.

A pre-LN decoder-only transformer laid out like nanoGPT (github.com/karpathy/nanoGPT): learned position
embeddings, token embeddings tied to the output head, GELU MLPs. The network is built from the same three kinds
of module that make up the pipeline layer list (Embedding, Block, Head), so both paths run the same code on the
same parameters. Imports only torch and the config, so serving and tests load it without ray or deepspeed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from app.config import ModelConfig

IGNORE_INDEX = -100  # target id that adds nothing to the loss (padding, prompt tokens)


@dataclass
class KVCache:
    """Keys and values of one attention layer for every position seen so far, preallocated to seq_len.

    It stores no length: the caller's start_pos says where new positions go, so "where we are" has one source
    of truth, which also picks the position embeddings. Rewinding is just passing a smaller start_pos.
    """

    k: torch.Tensor  # [B, H, seq_len, hd]
    v: torch.Tensor  # [B, H, seq_len, hd]

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
              length: int | None = None) -> KVCache:
        """Zeros for `length` slots (default seq_len; a left-padded batch may need more, see forward_padded)."""
        shape = (batch_size, cfg.n_head, length or cfg.seq_len, cfg.d_model // cfg.n_head)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, hd] at positions start_pos.. and return keys and values for 0..start_pos+T."""
        end = start_pos + k.size(2)
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """attn_mask [B, 1, T, S] (True = may attend), from GPT.forward_padded, replaces the causal mask."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, hd]
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start_pos)  # [B, H, S, hd], S = start_pos + T
        # SDPA's is_causal aligns its mask to the top left, which is right only when queries and keys start at
        # the same position (training, or a prefill from 0). One new token may see every cached key, so it needs
        # no mask; a chunk appended after cached positions needs the diagonal shifted by start_pos.
        S = k.size(2)
        mask = attn_mask
        if mask is None and T > 1 and S != T:
            rows = torch.arange(start_pos, start_pos + T, device=x.device)[:, None]  # [T, 1]
            mask = torch.arange(S, device=x.device) <= rows  # [T, S], True = may attend
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and T > 1 and S == T,
        )  # [B, H, T, hd]
        y = self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # heads side by side, then the output projection
        # dropout only where it acts: a module call per use is a measurable share of a small model's decode step
        return self.resid_drop(y) if self.training and self.dropout else y


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(F.gelu(self.c_fc(x)))
        return self.drop(y) if self.training and self.drop.p else y


class Block(nn.Module):
    """One pre-LN transformer block, residual stream [B, T, D] -> [B, T, D]; also one pipeline layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, start_pos, attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class Embedding(nn.Module):
    """First pipeline layer: token ids [B, T] -> residual stream [B, T, D] (token + position embeddings)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor, start_pos: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """positions [B, T] overrides start_pos.. (rows of a left-padded batch start at different slots)."""
        if positions is None:
            positions = torch.arange(start_pos, start_pos + idx.size(1), device=idx.device)  # [T]
        x = self.wte(idx) + self.wpe(positions)  # [B, T, D]
        return self.drop(x) if self.training and self.drop.p else x


class Head(nn.Module):
    """Last pipeline layer: residual stream [B, T, D] -> logits [B, T, V]. GPT ties lm_head.weight to wte."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


class _Entry(nn.Module):
    """One of a GPT's inference forwards as a module of its own, for torch.compile: compiling a module (rather
    than a bound method) lets inductor's freezing treat the GPT's weights as constants, which its int8 lowering
    needs. Holds the GPT outside its own module tree, so the GPT's parameters and state_dict are unchanged."""

    def __init__(self, gpt: "GPT", name: str) -> None:
        super().__init__()
        self.gpt = gpt
        self.fn = gpt._logits if name == "forward" else gpt._logits_padded

    def forward(self, *args):
        return self.fn(*args)


def pipeline_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits [B, T, V] against targets [B, T], skipping IGNORE_INDEX.

    Shaped as DeepSpeed's PipelineModule(loss_fn=...) expects; GPT.forward computes its loss with it too.
    """
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=IGNORE_INDEX)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token id per row of logits [B, V] -> [B]: argmax at temperature 0, else a sample after top-k/top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest most-likely set whose mass reaches top_p: drop a token once the tokens before it
        # already reach it. The most likely token has nothing before it, so it always survives.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.head = Head(cfg)
        # Weight tying (Press & Wolf, 2017): input and output embeddings share one matrix, which saves
        # vocab_size * d_model parameters and tends to help small models.
        self.head.lm_head.weight = self.embed.wte.weight
        # Recompute each block's activations in backward instead of keeping them (set by the trainer).
        self.activation_checkpointing = False
        self._compiled: dict | None = None  # compile_decoding(): torch.compile'd inference forwards
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                # GPT-2: every block adds two projections onto the residual stream; shrinking them keeps the
                # stream's variance from growing with depth.
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def compile_decoding(self) -> GPT:
        """Run this model's inference forwards (generate, forward_padded, and forward without targets) through
        torch.compile; returns self. For a finished model: serving and evaluation.

        Inductor fuses each forward into a few C++ kernels around the matmuls, which removes most of the
        per-operator overhead of a small model's decode step; with torchao's int8 weights it also fuses the
        activation quantization and scaling around the int8 matmuls — on x86 CPUs that is where torchao int8 gets
        its speed (eagerly it is slower than fp32 here; README, "Compression"). Shapes are dynamic (batch, prompt
        and cache length), but the compiler specializes a graph to the sizes and layouts it first meets, so a model
        compiles a few dozen graphs on its first calls — a minute or two on a small CPU; serving compiles them up
        front (decoding.warm_up) — and then reuses them.

        Inference only: the compiled path runs in eval mode with gradients off, and the weights are frozen into
        the compiled code (inductor's `freezing`), so changing them afterwards is not seen; training and loss
        computation always run eagerly. Copies and pickles of the model are eager again.
        """
        import torch._dynamo
        import torch._inductor.config

        # Both settings are read when a graph compiles, which happens on a call (a new shape may recompile much
        # later) and on the calling thread (an LMServer decodes on a worker thread; the compiler's settings are
        # per thread), so every call runs with them set rather than setting them once (torch.compile's `options`
        # reaches neither). Freezing: the weights become constants. The recompile limit: every GPT compiles the
        # same code, and serving's shapes (one row or several, one-token or longer prompts, a contiguous or a
        # strided cache) take a few dozen graphs per model (decoding.warm_up); past the default 8 dynamo would
        # silently run the rest eagerly.
        settings = [torch._inductor.config.patch(freezing=True), torch._dynamo.config.patch(recompile_limit=64)]
        self._compiled = {}
        for name in ("forward", "padded"):
            fn = torch.compile(_Entry(self, name), dynamic=True)
            for setting in settings:
                fn = setting(fn)
            self._compiled[name] = fn
        return self

    @property
    def compiled(self) -> bool:
        """True after compile_decoding()."""
        return self._compiled is not None

    def _use_compiled(self) -> bool:
        return not self.training and not torch.is_grad_enabled()

    def __getstate__(self) -> dict:
        # The compiled functions are bound to this instance: a copy or a pickle runs eagerly.
        return {**super().__getstate__(), "_compiled": None}

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: list[KVCache] | None = None,
        start_pos: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, V] for token ids idx [B, T], and the mean loss against targets [B, T] if given.

        With kv_cache (one KVCache per block, from new_kv_cache), idx holds positions start_pos..start_pos+T-1:
        their keys and values are stored and they attend to every earlier cached position.
        """
        B, T = idx.shape
        if start_pos + T > self.cfg.seq_len:
            raise ValueError(
                f"sequence of {start_pos + T} tokens exceeds model.seq_len={self.cfg.seq_len}; "
                f"crop the input to at most {self.cfg.seq_len} tokens"
            )
        if start_pos and kv_cache is None:
            raise ValueError(f"start_pos={start_pos} needs a kv_cache holding the earlier positions")
        if self._compiled is not None and targets is None and self._use_compiled():
            return self._compiled["forward"](idx, kv_cache, start_pos), None
        logits = self._logits(idx, kv_cache, start_pos)
        loss = None if targets is None else pipeline_loss(logits, targets)
        return logits, loss

    def _logits(self, idx: torch.Tensor, kv_cache: list[KVCache] | None, start_pos: int) -> torch.Tensor:
        x = self.embed(idx, start_pos)  # [B, T, D]
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)  # [B, T, D]
            else:
                x = block(x, None if kv_cache is None else kv_cache[i], start_pos)  # [B, T, D]
        return self.head(x)  # [B, T, V]

    def new_kv_cache(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None,
        length: int | None = None,
    ) -> list[KVCache]:
        """An empty cache per block for batch_size sequences of `length` slots (default seq_len); device and
        dtype default to the weights'."""
        w = self.embed.wte.weight
        return [KVCache.empty(self.cfg, batch_size, device or w.device, dtype or w.dtype, length)
                for _ in self.blocks]

    def forward_padded(
        self, idx: torch.Tensor, pad: torch.Tensor, kv_cache: list[KVCache], start_pos: int = 0
    ) -> torch.Tensor:
        """Logits [B, T, V] for cache slots start_pos..start_pos+T-1 of a left-padded batch (serving).

        Row b's real tokens start at slot pad[b] (pad [B], padding before it). Each row's positions count from
        its own first real token, and no query attends to a padding slot, so every row computes what it would
        alone. Slots are shared by the rows, so a batch whose prompts differ in length may need a cache longer
        than seq_len (new_kv_cache(length=...)); only positions must stay below seq_len.
        """
        T = idx.size(1)
        slots = torch.arange(start_pos, start_pos + T, device=idx.device)  # [T]
        positions = (slots - pad[:, None]).clamp(min=0)  # [B, T]
        if int(positions[:, -1].max()) >= self.cfg.seq_len:
            raise ValueError(f"a row reaches position {int(positions[:, -1].max())}, beyond "
                             f"model.seq_len={self.cfg.seq_len}; lower max_new_tokens or shorten the prompt")
        if self._compiled is not None and self._use_compiled():
            return self._compiled["padded"](idx, pad, kv_cache, start_pos, positions)
        return self._logits_padded(idx, pad, kv_cache, start_pos, positions)

    def _logits_padded(self, idx: torch.Tensor, pad: torch.Tensor, kv_cache: list[KVCache], start_pos: int,
                       positions: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        slots = torch.arange(start_pos, start_pos + T, device=idx.device)  # [T]
        keys = torch.arange(start_pos + T, device=idx.device)  # [S]
        mask = (keys <= slots[:, None]) & (keys >= pad[:, None, None])  # [B, T, S]: causal, no padding
        # A padding query would see no key at all, and an all-masked softmax row is NaN, which the next layer's
        # keys and values would carry into real rows (0 * NaN); let it see itself. Its output is never used.
        mask |= keys == slots[:, None]
        x = self.embed(idx, positions=positions)  # [B, T, D]
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache[i], start_pos, mask[:, None])  # [B, T, D]
        return self.head(x)  # [B, T, V]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_ids: Sequence[int] = (),
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue each prompt of idx [B, T] by up to max_new_tokens tokens; returns [B, T + new].

        The prompts are encoded into a KV cache once, then each step feeds only the newest token.
        temperature=0 is greedy; top_k and top_p (nucleus) restrict sampling to the likeliest tokens.
        A row that emits one of stop_ids keeps repeating that id, so the batch stays rectangular; generation
        ends early once every row has stopped. Dropout stays on in train mode, so call eval() first.
        """
        B, T = idx.shape
        if T + max_new_tokens > self.cfg.seq_len:
            raise ValueError(
                f"prompt of {T} tokens + max_new_tokens={max_new_tokens} exceeds model.seq_len={self.cfg.seq_len}; "
                "lower max_new_tokens or shorten the prompt"
            )
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(
                f"need temperature >= 0, top_k >= 1 and 0 < top_p <= 1 (got {temperature}, {top_k}, {top_p})"
            )
        cache = self.new_kv_cache(B, idx.device)
        logits, _ = self(idx, kv_cache=cache)  # prefill: [B, T, V]
        stop = torch.tensor(list(stop_ids), dtype=idx.dtype, device=idx.device)
        stopped = torch.zeros(B, dtype=torch.bool, device=idx.device)
        out = [idx]
        for step in range(max_new_tokens):
            token = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)  # [B]
            token = torch.where(stopped, out[-1][:, -1], token)  # a stopped row repeats its stop id
            out.append(token[:, None])
            stopped |= torch.isin(token, stop)
            if stopped.all() or step == max_new_tokens - 1:
                break
            logits, _ = self(token[:, None], kv_cache=cache, start_pos=T + step)  # decode: [B, 1, V]
        return torch.cat(out, dim=1)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters, each counted once (the tied wte / lm_head matrix once).

        non_embedding=True leaves out the token and position embeddings, wte and wpe (nanoGPT leaves out only
        wpe). As lm_head is wte, it is left out too; flops_per_token adds its matmul back.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            n -= self.embed.wte.weight.numel() + self.embed.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), counted as torchtitan's get_num_flop_per_token does.

        6 FLOPs per matmul weight per token (2 forward, 4 backward) over the non-embedding parameters plus the
        lm_head's vocab_size * d_model: its matmul is real compute although its weight is tied to wte, while the
        embedding lookups cost nothing. Attention scores and the weighted sum of values add
        12 * n_layer * n_head * head_dim * seq_len, counting the full window as torchtitan does (no causal halving).
        LayerNorm and bias parameters are inside N as well; they are a rounding error.
        """
        cfg = self.cfg
        head_dim = cfg.d_model // cfg.n_head
        matmul_params = self.num_params(non_embedding=True) + cfg.vocab_size * cfg.d_model
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.seq_len

    def as_pipeline_layers(self) -> list[nn.Module]:
        """The layers for DeepSpeed's PipelineModule(layers=..., loss_fn=pipeline_loss): Embedding (idx [B, T] ->
        [B, T, D]), each Block ([B, T, D] -> [B, T, D]), then Head ([B, T, D] -> logits [B, T, V]).

        These are this model's own modules, not copies, so running them in order is forward(idx)[0] and training
        them trains this model. The Embedding's wte.weight and the Head's lm_head.weight are one Parameter; with
        pipeline_stages > 1 the two ends live on different stages, and the pipeline builder must tie them with
        TiedLayerSpec (which all-reduces the shared gradient) instead of relying on shared storage.
        """
        return [self.embed, *self.blocks, self.head]
