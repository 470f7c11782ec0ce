"""Tokenizers: a sentencepiece model (the built-in task trains its own)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

PAD, EOS, BOS, UNK = 0, 1, 2, 3


class SentencePieceTokenizer:
    """encode(text) -> ids, decode(ids) -> text; ``eos_id``, ``vocab_size``."""

    def __init__(self, model_file):
        self.path = str(model_file)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"tokenizer {self.path}: no such file")
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id, self.pad_id = self.sp.eos_id(), self.sp.pad_id()

    def encode(self, text: str) -> list:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([i for i in ids if i != self.eos_id])

    @staticmethod
    def train(texts: Iterable[str], model_file, vocab_size: int) -> "SentencePieceTokenizer":
        """Train a BPE model on ``texts`` (digits split one by one; deterministic with one
        thread) and write it atomically."""
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, split_digits=True, pad_id=PAD, eos_id=EOS, bos_id=BOS, unk_id=UNK,
            minloglevel=2, hard_vocab_limit=False, num_threads=1,
        )
        path = Path(model_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(path)
        return SentencePieceTokenizer(path)


def check_tokenizer(run, tokenizer: SentencePieceTokenizer) -> None:
    """The run's teacher and student must have the tokenizer's vocabulary size (``run`` is a
    RunConfig); a ValueError names the keys and the value to set."""
    for what in ("teacher", "student"):
        model = getattr(run, what).model
        if model.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"tokenizer={run.tokenizer} has {tokenizer.vocab_size} tokens but "
                             f"{what}.model.vocab_size={model.vocab_size}: set {what}.model.vocab_size="
                             f"{tokenizer.vocab_size}")
