"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): train, save, load; any Unicode text round-trips."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Tokenizer:
    """A trained byte-level BPE; special tokens take ids 0 (bos), 1 (eos), 2 (pad)."""

    hf: _HFTokenizer

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def bos_id(self) -> int:
        return self.hf.token_to_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.hf.token_to_id(EOS)

    @property
    def pad_id(self) -> int:
        return self.hf.token_to_id(PAD)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def to_json(self) -> str:
        return self.hf.to_str()

    @property
    def sha256(self) -> str:
        """Hash of the serialised tokenizer; shards record it so a mismatched tokenizer is caught."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        return cls(_HFTokenizer.from_str(text))

    @classmethod
    def load(cls, directory_or_file: str | Path) -> "Tokenizer":
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}; run `python -m app prepare-data` first")
        return cls(_HFTokenizer.from_file(str(path)))


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE of at most `vocab_size` tokens (fewer if the corpus runs out of merges)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"model.vocab_size={vocab_size} is too small for byte-level BPE; use at least {MIN_VOCAB_SIZE}"
        )
    hf = _HFTokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(x)) == x exactly; ByteLevel covers every byte, so no UNK exists.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)
