"""prepare-data through Ray Data: shards, manifest, reuse, safe replacement, and the CLI's printed total."""

import re

import pyarrow.parquet as pq
import pytest

from app.data import GlobalOrder, load_tokens, read_manifest
from app.errors import DataError
from app.tokenizer import Tokenizer
from pipelines import prepare_data
from tests.conftest import run_cli


def test_manifest_matches_shards(tiny_data):
    manifest = read_manifest(tiny_data)
    for split in ("train", "val"):
        info = manifest.raw["splits"][split]
        tables = [pq.read_table(tiny_data / s["file"]) for s in info["shards"]]
        assert sum(t.num_rows for t in tables) == info["documents"]
        assert sum(sum(len(x) for x in t.column("tokens").to_pylist()) for t in tables) == info["tokens"]
    assert manifest.documents("train") + manifest.documents("val") == 200
    tok = Tokenizer.load(tiny_data)
    assert tok.sha256 == manifest.tokenizer_sha256 and tok.vocab_size == 512


def test_documents_stay_in_order_and_decode(tiny_data):
    tok = Tokenizer.load(tiny_data)
    first = pq.read_table(tiny_data / "train-00000.parquet").slice(0, 3).to_pylist()
    assert [r["doc_id"] for r in first] == sorted(r["doc_id"] for r in first)
    assert tok.decode(first[0]["tokens"][:-1]).startswith(('"""', "#", "import", "from", "'''"))
    stream = load_tokens(tiny_data, "train")
    order = GlobalOrder.for_stream(seed=0, n_tokens=len(stream), seq_len=64)
    assert order.n_samples == (len(stream) - 1) // 64


def test_rerun_reuses_and_conflicting_out_is_refused(tiny_data):
    again = prepare_data.run(["stdlib"], tiny_data, vocab_size=512, max_documents=200, shard_tokens=200_000)
    assert again.reused
    before = sorted(p.name for p in tiny_data.iterdir())
    with pytest.raises(DataError, match="already holds other data; pass --force"):
        prepare_data.run(["pydoc"], tiny_data, vocab_size=512)
    assert sorted(p.name for p in tiny_data.iterdir()) == before  # nothing lost


@pytest.mark.slow
def test_cli_prepare_data_prints_token_count(tmp_path):
    out = tmp_path / "mixed"
    result = run_cli(
        "prepare-data", "--source", "stdlib", "--source", "pydoc", "--out", str(out), "--preset", "tiny",
        "--max-documents", "40", "--num-cpus", "2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = read_manifest(out)
    total = manifest.tokens("train") + manifest.tokens("val")
    printed = re.search(r"([\d,]+) tokens \(train", result.stdout)
    assert printed and int(printed.group(1).replace(",", "")) == total
    assert manifest.domains == ["code", "docs"]
    assert manifest.documents("val", "code") >= 1 and manifest.documents("val", "docs") >= 1
    assert not (tmp_path / "mixed.partial").exists()
