"""Builders for the model tests: a briefly trained 2-layer GPT, its BPE, and a two-domain data folder made
in-process (the layout the Ray pipeline writes), saved as an artifact. No Ray."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import torch

from app.config import ModelConfig
from app.data import ShardWriter, iter_documents, load_tokens, split_documents, tokenize_rows, write_manifest
from app.model import GPT
from app.registry import save_artifact
from app.tokenizer import train_tokenizer

CFG = ModelConfig(vocab_size=512, seq_len=64, n_layer=2, n_head=4, d_model=64, mlp_ratio=4, dropout=0.0, bias=True)


def make_data(out: Path) -> Path:
    """About 50 documents: stdlib source ("code") and pydoc topics ("docs"), tokenized with a 512-token BPE."""
    docs = [*iter_documents("stdlib", max_documents=12), *iter_documents("pydoc", max_documents=40)]
    tok = train_tokenizer((d.text for d in docs), CFG.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    summaries = {}
    for split, members in split_documents(docs, 0.2, seed=0).items():
        writer = ShardWriter(out, split, 100_000)
        for doc, ids in zip(members, tokenize_rows([d.text for d in members], tok.to_json())):
            writer.add(doc.doc_id, doc.domain, ids)
        summaries[split] = writer.summary()
    write_manifest(out, {"tokenizer": {"sha256": tok.sha256, "vocab_size": tok.vocab_size}, "splits": summaries})
    return out


def train_model(data: Path, steps: int = 30, seed: int = 0) -> GPT:
    """The tiny GPT after `steps` AdamW steps on `data`: trained weights, so quantization errors are realistic."""
    torch.manual_seed(seed)
    model = GPT(CFG)
    stream = load_tokens(data, "train")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - CFG.seq_len - 1, 8)
        block = np.stack([stream[s:s + CFG.seq_len + 1] for s in starts])
        _, loss = model(torch.from_numpy(block[:, :-1]).long(), torch.from_numpy(block[:, 1:]).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_tiny(model: GPT, data: Path, out: Path) -> Path:
    """`model` as an fp32 artifact whose card names `data`, as training writes it."""
    from app.tokenizer import Tokenizer

    card = {"source_run": "tiny-test", "config_hash": "0123456789abcdef", "step": 30, "data": str(data),
            "quantization": None, "lineage": {"teacher": None, "source_run": "tiny-test"}}
    return save_artifact(out, model.state_dict(), CFG, Tokenizer.load(data), card)


_SCRATCH = tempfile.TemporaryDirectory(prefix="scalestack-models-")  # removed when the test process exits


@functools.cache
def tiny_setup() -> tuple[Path, Path]:
    """(data folder, fp32 artifact folder), built once per test process and shared by the model tests."""
    root = Path(_SCRATCH.name)
    data = make_data(root / "data")
    return data, save_tiny(train_model(data), data, root / "artifact")
