"""Corpora → token shards (Parquet) with a manifest, and GlobalOrder: the world-size-free sample order.

A source yields documents tagged with a domain: ``stdlib`` (the Python standard library's source files,
domain "code"), ``site-packages`` (the Python files of the packages installed beside this interpreter: torch, ray,
numpy, …; domain "code", ~20× the standard library, for runs that must not repeat data), ``pydoc``
(``pydoc_data.topics``, domain "docs"), a local file or folder (.txt, .jsonl with a ``text`` field, .parquet with a
``text`` column) or a pyarrow filesystem URI (s3://, gs://, file://). Prefix a source with ``DOMAIN=`` to label it
(``code=./src``); local sources default to domain "text".

On disk a prepared data set is a folder::

    tokenizer.json
    train-00000.parquet …   one row per document: doc_id, domain, tokens (list<int32>)
    val-00000.parquet …
    manifest.json           written last: its presence means the folder is complete

Training reads a split as one token stream (documents in manifest order, each followed by eos) cut into
fixed-length windows; ``GlobalOrder`` says which window is sample k of the run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from app.errors import DataError

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".parquet")
# Test suites and vendored tools are a large, repetitive share of the stdlib; leaving them out keeps the
# "code" domain about idiomatic library code (~600 files, 11 MB).
_STDLIB_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}
_SITE_PACKAGES_SKIP_DIRS = {"test", "tests", "testing", "__pycache__"}
_SOURCES_HINT = "pass stdlib, site-packages, pydoc, a path or a URI"


@dataclass(frozen=True)
class Document:
    doc_id: str
    domain: str
    text: str


# --------------------------------------------------------------------------------------------------------------
# Sources


def parse_source(spec: str) -> tuple[str | None, str]:
    """'code=./src' -> ('code', './src'); 's3://b/x' -> (None, 's3://b/x')."""
    head, sep, rest = spec.partition("=")
    if sep and head and head.isidentifier():
        return head, rest
    return None, spec


def iter_documents(spec: str, max_documents: int | None = None) -> Iterator[Document]:
    """Documents of one source, in a deterministic order."""
    domain, location = parse_source(spec)
    if location == "stdlib":
        docs = _stdlib_documents(domain or "code")
    elif location == "site-packages":
        docs = _site_packages_documents(domain or "code")
    elif location == "pydoc":
        docs = _pydoc_documents(domain or "docs")
    else:
        docs = _file_documents(location, domain or "text")
    count = 0
    for doc in docs:
        if not doc.text.strip():
            continue
        yield doc
        count += 1
        if max_documents is not None and count >= max_documents:
            return


def _stdlib_documents(domain: str) -> Iterator[Document]:
    return _python_files("stdlib", sysconfig.get_paths()["stdlib"], _STDLIB_SKIP_DIRS, domain)


def _site_packages_documents(domain: str) -> Iterator[Document]:
    return _python_files("site-packages", sysconfig.get_paths()["purelib"], _SITE_PACKAGES_SKIP_DIRS, domain)


def _python_files(source: str, folder: str, skip_dirs: set[str], domain: str) -> Iterator[Document]:
    """The .py files under `folder` in path order, minus any under a folder named in `skip_dirs`."""
    root = Path(folder)
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip_dirs.intersection(rel.parts) or not path.is_file():
            continue
        yield Document(f"{source}:{rel.as_posix()}", domain, path.read_text(encoding="utf-8", errors="replace"))


def _pydoc_documents(domain: str) -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"pydoc:{name}", domain, topics[name])


def _file_documents(location: str, domain: str) -> Iterator[Document]:
    try:
        fs, root = pafs.FileSystem.from_uri(location) if "://" in location else (pafs.LocalFileSystem(), location)
        info = fs.get_file_info(root)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"--source {location}: cannot open ({err}); {_SOURCES_HINT}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"--source {location}: no such file or folder; {_SOURCES_HINT}")
    if info.type == pafs.FileType.Directory:
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files = sorted(e.path for e in entries if e.type == pafs.FileType.File and e.path.endswith(TEXT_SUFFIXES))
    else:
        files = [root]
    for path in files:
        yield from _read_file(fs, path, domain)


def _read_file(fs: pafs.FileSystem, path: str, domain: str) -> Iterator[Document]:
    if path.endswith(".parquet"):
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
        if "text" not in table.column_names:
            raise DataError(f"{path}: Parquet source needs a 'text' column (has {table.column_names})")
        for i, text in enumerate(table.column("text").to_pylist()):
            yield Document(f"{path}#{i}", domain, text or "")
        return
    with fs.open_input_stream(path) as f:
        raw = f.read().decode("utf-8", errors="replace")
    if path.endswith(".jsonl"):
        for i, line in enumerate(raw.splitlines()):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{i + 1}: not valid JSON ({err.msg}); each line must be an object") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{i + 1}: JSONL records need a string 'text' field")
            yield Document(f"{path}#{i}", record.get("domain", domain), record["text"])
    else:
        yield Document(path, domain, raw)


def collect_documents(sources: Sequence[str], max_documents: int | None = None) -> list[Document]:
    docs = [doc for spec in sources for doc in iter_documents(spec, max_documents)]
    if not docs:
        raise DataError(f"sources {list(sources)} yielded no non-empty documents; check the paths and file types")
    return docs


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int) -> dict[str, list[Document]]:
    """Deterministic split by document: per domain, the ceil(fraction × n) documents whose seeded hash is smallest
    go to validation (at least one when the domain has two or more). Same inputs → same split on any machine."""

    def rank(doc: Document) -> str:
        return hashlib.sha256(f"{seed}:{doc.doc_id}".encode()).hexdigest()

    val_ids: set[str] = set()
    for domain in sorted({d.domain for d in docs}):
        members = sorted((d for d in docs if d.domain == domain), key=rank)
        n_val = min(len(members) - 1, max(1, int(np.ceil(val_fraction * len(members))))) if len(members) > 1 else 0
        val_ids.update(d.doc_id for d in members[:n_val])
    return {
        "train": [d for d in docs if d.doc_id not in val_ids],
        "val": [d for d in docs if d.doc_id in val_ids],
    }


# --------------------------------------------------------------------------------------------------------------
# Shards and manifest


SHARD_SCHEMA = pa.schema([("doc_id", pa.string()), ("domain", pa.string()), ("tokens", pa.list_(pa.int32()))])


@dataclass
class ShardWriter:
    """Writes rows of one split into Parquet shards of about `shard_tokens` tokens each."""

    out_dir: Path
    split: str
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)
    domains: dict[str, dict[str, int]] = field(default_factory=dict)
    _rows: list[tuple[str, str, list[int]]] = field(default_factory=list)
    _pending_tokens: int = 0

    def add(self, doc_id: str, domain: str, tokens: Sequence[int]) -> None:
        self._rows.append((doc_id, domain, list(tokens)))
        self._pending_tokens += len(tokens)
        stats = self.domains.setdefault(domain, {"documents": 0, "tokens": 0})
        stats["documents"] += 1
        stats["tokens"] += len(tokens)
        if self._pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        doc_ids, domains, tokens = zip(*self._rows)
        table = pa.table({"doc_id": doc_ids, "domain": domains, "tokens": tokens}, schema=SHARD_SCHEMA)
        pq.write_table(table, self.out_dir / name)
        self.shards.append({"file": name, "documents": len(self._rows), "tokens": self._pending_tokens})
        self._rows, self._pending_tokens = [], 0

    def summary(self) -> dict:
        self.flush()
        return {
            "documents": sum(s["documents"] for s in self.shards),
            "tokens": sum(s["tokens"] for s in self.shards),
            "shards": self.shards,
            "domains": self.domains,
        }


@dataclass(frozen=True)
class Manifest:
    """What a prepared data folder holds; `tokens` counts include one eos per document."""

    path: Path
    raw: dict

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def tokenizer_sha256(self) -> str:
        return self.raw["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        return self.raw["tokenizer"]["vocab_size"]

    def tokens(self, split: str = "train", domain: str | None = None) -> int:
        info = self.raw["splits"][split]
        return info["domains"].get(domain, {}).get("tokens", 0) if domain else info["tokens"]

    def documents(self, split: str = "train", domain: str | None = None) -> int:
        info = self.raw["splits"][split]
        return info["domains"].get(domain, {}).get("documents", 0) if domain else info["documents"]

    @property
    def domains(self) -> list[str]:
        return sorted({d for s in self.raw["splits"].values() for d in s["domains"]})


def write_manifest(out_dir: Path, body: dict) -> Manifest:
    """Write manifest.json atomically; it is the completion marker of a data folder."""
    body = {"version": MANIFEST_VERSION, **body}
    path = out_dir / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True))
    tmp.replace(path)
    return Manifest(path, body)


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(
            f"no prepared data in {directory} (missing {MANIFEST_FILE}); "
            f"run `python -m app prepare-data --out {directory}` first"
        )
    raw = json.loads(path.read_text())
    if raw.get("version") != MANIFEST_VERSION:
        raise DataError(f"{path}: manifest version {raw.get('version')} is not {MANIFEST_VERSION}; re-run prepare-data")
    return Manifest(path, raw)


def load_tokens(directory: str | Path, split: str = "train", domains: Sequence[str] | None = None) -> np.ndarray:
    """A split's documents concatenated in manifest order, as one int32 token stream (eos already appended)."""
    manifest = read_manifest(directory)
    if split not in manifest.raw["splits"]:
        raise DataError(f"split '{split}' not in {manifest.path}; choose one of {list(manifest.raw['splits'])}")
    if domains:
        unknown = sorted(set(domains) - set(manifest.domains))
        if unknown:
            raise DataError(f"domain(s) {unknown} not in {manifest.path}; available: {manifest.domains}")
    parts = []
    for shard in manifest.raw["splits"][split]["shards"]:
        table = pq.read_table(manifest.directory / shard["file"], columns=["domain", "tokens"])
        if domains:
            mask = pc.is_in(table.column("domain"), value_set=pa.array(list(domains)))
            table = table.filter(mask)
        flat = table.column("tokens").combine_chunks().flatten()
        parts.append(flat.to_numpy(zero_copy_only=False).astype(np.int32, copy=False))
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    if stream.size == 0:
        raise DataError(f"split '{split}' of {directory} has no tokens for domains {list(domains or [])}")
    return stream


# --------------------------------------------------------------------------------------------------------------
# Sample order


@dataclass(frozen=True)
class GlobalOrder:
    """Sample k of a run, for every k, independent of how many workers read it.

    The token stream is cut into `n_samples` windows of seq_len + 1 tokens (inputs and shifted targets) with stride
    seq_len. Epoch e visits them in a seeded permutation of its own. Optimizer step s consumes samples
    [s·G, (s+1)·G) of the global batch G; rank r of W takes the contiguous slice [r·G/W, (r+1)·G/W) of that step,
    so resuming at step s with any world size reads exactly the samples an undisturbed run would.
    """

    seed: int
    n_samples: int

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise DataError("the token stream is shorter than one window; prepare more data or lower model.seq_len")

    @classmethod
    def for_stream(cls, seed: int, n_tokens: int, seq_len: int) -> "GlobalOrder":
        return cls(seed, (n_tokens - 1) // seq_len)

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        return _permutation(self.seed, epoch, self.n_samples)

    def sample_ids(self, start: int, stop: int) -> np.ndarray:
        """Window ids of samples start … stop-1 of the run (may cross epoch boundaries)."""
        assert 0 <= start <= stop
        ks = np.arange(start, stop)
        epochs, offsets = np.divmod(ks, self.n_samples)
        out = np.empty(len(ks), dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._epoch_permutation(int(epoch))[offsets[sel]]
        return out

    def rank_slice(self, step: int, global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
        """[first, last) sample index of the run that `rank` of `world_size` trains on at optimizer step `step`."""
        if global_batch % world_size:
            raise ValueError(f"global_batch={global_batch} is not divisible by world size {world_size}")
        per_rank = global_batch // world_size
        first = step * global_batch + rank * per_rank
        return first, first + per_rank

    def batch_ids(self, step: int, global_batch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        return self.sample_ids(*self.rank_slice(step, global_batch, rank, world_size))


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n_samples: int) -> np.ndarray:
    """Epoch `epoch`'s window order, kept: drawing it is O(n_samples) (12 ms for the 840 K windows of 108 M tokens,
    at every step that was half of a small model's step time), and a step needs only 16 entries of it."""
    order = np.random.default_rng([seed, epoch]).permutation(n_samples)
    order.flags.writeable = False  # shared between calls
    return order


def windows(stream: np.ndarray, ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets [len(ids), seq_len] for the given window ids."""
    starts = np.asarray(ids, dtype=np.int64)[:, None] * seq_len
    block = stream[starts + np.arange(seq_len + 1)]  # [B, T+1]
    return block[:, :-1], block[:, 1:]


# --------------------------------------------------------------------------------------------------------------
# Tokenising (the per-batch function Ray Data maps; also usable in-process)


def tokenize_rows(texts: Iterable[str], tokenizer_json: str) -> list[list[int]]:
    """Token ids of each text followed by eos. Takes the tokenizer as JSON so a Ray task can rebuild it."""
    from app.tokenizer import Tokenizer

    tok = Tokenizer.from_json(tokenizer_json)
    eos = tok.eos_id
    return [ids + [eos] for ids in tok.encode_batch(list(texts))]


def prepared_matches(directory: Path, settings: dict) -> bool:
    """True when `directory` holds a complete data set prepared with exactly these settings."""
    try:
        return read_manifest(directory).raw.get("settings") == settings
    except DataError:
        return False


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
