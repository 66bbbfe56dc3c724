"""Sources, split, shards and GlobalOrder — in-process (no Ray); the Ray Data path is tested in integration."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.data import (
    GlobalOrder,
    ShardWriter,
    collect_documents,
    iter_documents,
    load_tokens,
    read_manifest,
    split_documents,
    tokenize_rows,
    windows,
    write_manifest,
)
from app.errors import DataError
from app.tokenizer import train_tokenizer


def test_stdlib_source_is_code_and_deterministic():
    a = list(iter_documents("stdlib", max_documents=5))
    assert [d.doc_id for d in a] == [d.doc_id for d in iter_documents("stdlib", max_documents=5)]
    assert len(a) == 5 and all(d.domain == "code" and d.doc_id.endswith(".py") for d in a)
    assert not any("/test/" in d.doc_id for d in iter_documents("stdlib"))


def test_site_packages_source_is_the_installed_packages_code():
    import sysconfig

    docs = list(iter_documents("site-packages", max_documents=200))
    assert [d.doc_id for d in docs] == [d.doc_id for d in iter_documents("site-packages", max_documents=200)]
    assert len(docs) == 200 and all(d.domain == "code" and d.doc_id.startswith("site-packages:") for d in docs)
    first = Path(sysconfig.get_paths()["purelib"]) / docs[0].doc_id.removeprefix("site-packages:")
    assert first.read_text(encoding="utf-8", errors="replace") == docs[0].text
    assert not any(set(d.doc_id.split("/")) & {"tests", "test", "__pycache__"} for d in docs)
    labelled = next(iter_documents("docs=site-packages"))
    assert labelled.domain == "docs"


def test_pydoc_source_is_docs():
    docs = list(iter_documents("pydoc"))
    assert len(docs) > 50 and all(d.domain == "docs" for d in docs)
    assert any("for" in d.text and "loop" in d.text for d in docs)


def test_local_sources_and_domain_prefix(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n")
    pq.write_table(pa.table({"text": ["delta", "", "epsilon"]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    docs = list(iter_documents(f"notes={tmp_path}"))
    assert [d.text for d in docs] == ["alpha text", "beta", "gamma", "delta", "epsilon"]
    assert {d.domain for d in docs} == {"notes"}
    uri_docs = list(iter_documents(f"file://{tmp_path}/a.txt"))
    assert [d.text for d in uri_docs] == ["alpha text"] and uri_docs[0].domain == "text"


@pytest.mark.parametrize(
    "content,match",
    [("{not json}\n", "b.jsonl:1: not valid JSON"), (json.dumps({"body": "x"}) + "\n", "string 'text' field")],
)
def test_bad_jsonl_is_clear(tmp_path, content, match):
    (tmp_path / "b.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        list(iter_documents(str(tmp_path / "b.jsonl")))


def test_missing_source_and_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        list(iter_documents(str(tmp_path / "nope")))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(DataError, match="yielded no non-empty documents"):
        collect_documents([str(tmp_path)])


def test_split_by_document_deterministic_per_domain():
    docs = collect_documents(["stdlib", "pydoc"], max_documents=60)
    a, b = split_documents(docs, 0.1, seed=7), split_documents(docs, 0.1, seed=7)
    assert [d.doc_id for d in a["val"]] == [d.doc_id for d in b["val"]]
    train_ids, val_ids = {d.doc_id for d in a["train"]}, {d.doc_id for d in a["val"]}
    assert not train_ids & val_ids and len(train_ids | val_ids) == len(docs)
    assert sum(d.domain == "code" for d in a["val"]) == 6 and sum(d.domain == "docs" for d in a["val"]) == 6
    other = split_documents(docs, 0.1, seed=8)
    assert {d.doc_id for d in other["val"]} != val_ids


def _prepare_in_process(tmp_path, docs, vocab=300, shard_tokens=2_000):
    """The shard layout the Ray pipeline writes, built in-process for fast unit tests."""
    tok = train_tokenizer((d.text for d in docs), vocab)
    tok.save(tmp_path)
    splits = split_documents(docs, 0.2, seed=0)
    summaries = {}
    for split, members in splits.items():
        writer = ShardWriter(tmp_path, split, shard_tokens)
        for doc, ids in zip(members, tokenize_rows([d.text for d in members], tok.to_json())):
            writer.add(doc.doc_id, doc.domain, ids)
        summaries[split] = writer.summary()
    write_manifest(tmp_path, {"tokenizer": {"sha256": tok.sha256, "vocab_size": tok.vocab_size}, "splits": summaries})
    return tok, splits


def test_shards_and_manifest_agree(tmp_path):
    docs = collect_documents(["stdlib", "pydoc"], max_documents=15)
    tok, splits = _prepare_in_process(tmp_path, docs)
    manifest = read_manifest(tmp_path)
    assert len(manifest.raw["splits"]["train"]["shards"]) > 1  # shard_tokens is small
    stream = load_tokens(tmp_path, "train")
    assert stream.dtype == np.int32 and len(stream) == manifest.tokens("train")
    assert manifest.documents("train") == len(splits["train"]) and int((stream == tok.eos_id).sum()) >= len(splits["train"])
    first = splits["train"][0]
    n = len(tok.encode(first.text))
    assert tok.decode(stream[:n].tolist()) == first.text and stream[n] == tok.eos_id
    code_only = load_tokens(tmp_path, "train", domains=["code"])
    assert len(code_only) == manifest.tokens("train", "code") < len(stream)
    with pytest.raises(DataError, match=r"domain\(s\) \['math'\]"):
        load_tokens(tmp_path, "train", domains=["math"])


def test_unprepared_folder_is_clear(tmp_path):
    with pytest.raises(DataError, match="run `python -m app prepare-data"):
        read_manifest(tmp_path)


def test_global_order_is_permutation_per_epoch():
    order = GlobalOrder(seed=3, n_samples=50)
    epoch0, epoch1 = order.sample_ids(0, 50), order.sample_ids(50, 100)
    assert sorted(epoch0) == list(range(50)) and sorted(epoch1) == list(range(50))
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, GlobalOrder(seed=4, n_samples=50).sample_ids(0, 50))


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_global_order_same_under_any_world_size(world):
    order, g = GlobalOrder(seed=11, n_samples=37), 8
    for step in range(12):  # crosses epoch boundaries (37 samples, 8 per step)
        ranks = [order.batch_ids(step, g, rank, world) for rank in range(world)]
        assert np.array_equal(np.concatenate(ranks), order.batch_ids(step, g))


def test_global_order_resumable_at_any_step():
    order = GlobalOrder(seed=5, n_samples=40)
    full = np.concatenate([order.batch_ids(s, 6) for s in range(20)])
    resumed = GlobalOrder(seed=5, n_samples=40)  # a new process: nothing carried but seed, n and the step
    tail = np.concatenate([resumed.batch_ids(s, 6, r, 2) for s in range(13, 20) for r in range(2)])
    assert np.array_equal(tail, full[13 * 6:])


def test_global_order_draws_each_epochs_order_once():
    """A big corpus has ~10^6 windows: drawing their permutation at every step was half a small model's step."""
    from app.data import _permutation

    order = GlobalOrder(seed=7, n_samples=1_000_003)
    _permutation.cache_clear()
    first = [order.batch_ids(step, 16) for step in range(50)]
    assert _permutation.cache_info().misses == 1 and _permutation.cache_info().hits == 49
    assert np.array_equal(np.concatenate(first), np.random.default_rng([7, 0]).permutation(1_000_003)[:800])
    with pytest.raises(ValueError):
        _permutation(7, 0, 1_000_003)[0] = 1  # shared between calls: read-only


def test_windows_shift_targets():
    stream = np.arange(100, dtype=np.int32)
    order = GlobalOrder.for_stream(0, len(stream), seq_len=10)
    assert order.n_samples == 9
    x, y = windows(stream, np.array([0, 8]), 10)
    assert x[1].tolist() == list(range(80, 90)) and y[1].tolist() == list(range(81, 91))
    with pytest.raises(DataError, match="shorter than one window"):
        GlobalOrder.for_stream(0, 5, seq_len=10)


def test_global_batch_must_split_over_world():
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        GlobalOrder(0, 10).batch_ids(0, 8, 0, 3)


def test_prepare_data_refuses_impossible_settings_before_any_work(tmp_path):
    from app.errors import DataError
    from pipelines import prepare_data

    for kwargs, message in [({"vocab_size": 10}, "--vocab-size 10: byte-level BPE needs at least 259"),
                            ({"max_documents": 0}, "--max-documents 0: must be at least 1"),
                            ({"max_documents": 1}, "1 document\\(s\\) leave no validation split")]:
        with pytest.raises(DataError, match=message):
            prepare_data.run(["stdlib"], tmp_path / "out", **{"vocab_size": 512, **kwargs})
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
