import sysconfig
from pathlib import Path

import pytest

from app.tokenizer import Tokenizer, train_tokenizer

SAMPLES = [
    "plain ASCII text, with punctuation!",
    "Unicode: héllo wörld — ✓ 日本語 Ελληνικά עברית 🙂🚀",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tclass A: pass\r\n",
    "   leading and trailing spaces   ",
    "\x00\x01 control bytes \u200b zero-width",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    return train_tokenizer((f.read_text(errors="replace") for f in files), vocab_size=400)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_vocab_size_honoured(tok):
    assert tok.vocab_size == 400
    assert max(max(tok.encode(s), default=0) for s in SAMPLES) < 400


def test_special_ids_and_skipping(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    ids = [tok.bos_id, *tok.encode("abc"), tok.eos_id]
    assert tok.decode(ids) == "abc"
    assert tok.decode(ids, skip_special=False) == "<|bos|>abc<|eos|>"


def test_bpe_compresses_code(tok):
    text = "def __init__(self):\n        return self\n"
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_save_load_identical(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.sha256 == tok.sha256
    assert loaded.encode(SAMPLES[1]) == tok.encode(SAMPLES[1])


def test_load_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        Tokenizer.load(tmp_path)


def test_too_small_vocab_rejected():
    with pytest.raises(ValueError, match="model.vocab_size=100"):
        train_tokenizer(["abc"], vocab_size=100)
