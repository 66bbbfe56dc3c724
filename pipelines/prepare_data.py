"""Prepare a corpus for training: documents → split → BPE tokenizer → Ray Data tokenisation → Parquet shards.

    python -m pipelines.prepare_data --source stdlib --out runs/data/code
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from app.console import progress_bar
from app.data import (
    Document,
    Manifest,
    ShardWriter,
    collect_documents,
    now_iso,
    prepared_matches,
    read_manifest,
    split_documents,
    tokenize_rows,
    write_manifest,
)
from app.errors import DataError
from app.tokenizer import MIN_VOCAB_SIZE, Tokenizer, train_tokenizer
from pipelines.ray_session import ray_session


@dataclass(frozen=True)
class PrepareResult:
    """A prepared data folder and how it was made."""

    manifest: Manifest
    seconds: float
    reused: bool  # True when an identical, complete data set was already there

    @property
    def out_dir(self) -> Path:
        return self.manifest.directory

    def rows(self) -> list[tuple[str, str, int, int]]:
        """(split, domain, documents, tokens) for every split and domain."""
        out = []
        for split, info in self.manifest.raw["splits"].items():
            for domain, stats in sorted(info["domains"].items()):
                out.append((split, domain, stats["documents"], stats["tokens"]))
        return out


def _tokenize_batch(batch, tokenizer_json: str):
    import pyarrow as pa

    tokens = tokenize_rows(batch.column("text").to_pylist(), tokenizer_json)
    return pa.table(
        {"doc_id": batch.column("doc_id"), "domain": batch.column("domain"), "tokens": pa.array(tokens, pa.list_(pa.int32()))}
    )


def _tokenize_split(docs: Sequence[Document], tokenizer: Tokenizer, writer: ShardWriter, batch_size: int, bar) -> None:
    """Tokenise with Ray Data (so it scales past one machine) and write shards in document order."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset execution plans are noise here
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards and GlobalOrder depend on a fixed document order
    ctx.enable_progress_bars = False  # ours is the one progress bar
    ds = ray.data.from_items(
        [{"doc_id": d.doc_id, "domain": d.domain, "text": d.text} for d in docs],
        override_num_blocks=max(1, min(len(docs) // batch_size, 64)),
    )
    ds = ds.map_batches(
        _tokenize_batch, fn_kwargs={"tokenizer_json": tokenizer.to_json()}, batch_size=batch_size, batch_format="pyarrow"
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for doc_id, domain, tokens in zip(*(batch.column(c).to_pylist() for c in ("doc_id", "domain", "tokens"))):
            writer.add(doc_id, domain, tokens)
        bar.advance(batch.num_rows)


def run(
    sources: Sequence[str],
    out: str | Path,
    vocab_size: int,
    val_fraction: float = 0.05,
    seed: int = 1234,
    max_documents: int | None = None,
    shard_tokens: int = 1_000_000,
    force: bool = False,
    num_cpus: int | None = None,
    batch_size: int = 32,
) -> PrepareResult:
    """Prepare `sources` into `out`. An identical complete data set already in `out` is reused, not rebuilt."""
    start = time.perf_counter()
    out = Path(out)
    if vocab_size < MIN_VOCAB_SIZE:  # train_tokenizer would refuse it too, but only after collecting the corpus
        raise DataError(f"--vocab-size {vocab_size}: byte-level BPE needs at least {MIN_VOCAB_SIZE} "
                        "(256 bytes and the special tokens); e.g. 2048")
    if max_documents is not None and max_documents < 1:
        raise DataError(f"--max-documents {max_documents}: must be at least 1 (leave it out for every document)")
    settings = {
        "sources": list(sources),
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "seed": seed,
        "max_documents": max_documents,
        "shard_tokens": shard_tokens,
    }
    if not force and prepared_matches(out, settings):
        return PrepareResult(read_manifest(out), time.perf_counter() - start, reused=True)
    if out.exists() and any(out.iterdir()) and not force:
        raise DataError(f"--out {out} already holds other data; pass --force to replace it or choose another --out")

    docs = collect_documents(sources, max_documents)
    splits = split_documents(docs, val_fraction, seed)
    if not splits["val"]:
        raise DataError(f"{len(docs)} document(s) leave no validation split (a domain needs 2 or more documents to "
                        "give one up); add sources or raise --max-documents")
    tokenizer = train_tokenizer((d.text for d in splits["train"]), vocab_size)

    # Build in a sibling folder and swap it in at the end: an interrupted run never leaves a half-written data set
    # where a complete one was.
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer.save(staging)
    summaries = {}
    with ray_session(num_cpus), progress_bar("tokenising", total=len(docs)) as bar:
        for split in ("train", "val"):
            writer = ShardWriter(staging, split, shard_tokens)
            _tokenize_split(splits[split], tokenizer, writer, batch_size, bar)
            summaries[split] = writer.summary()
    write_manifest(
        staging,
        {
            "created": now_iso(),
            "settings": settings,
            "tokenizer": {"file": "tokenizer.json", "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size},
            "splits": summaries,
        },
    )
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return PrepareResult(read_manifest(out), time.perf_counter() - start, reused=False)


def main(argv: Sequence[str] | None = None) -> int:
    from app.__main__ import main as app_main

    return app_main(["prepare-data", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
