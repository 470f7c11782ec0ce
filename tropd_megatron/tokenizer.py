"""Tokenizers: a Hugging Face tokenizer folder (tokenizer.json / tokenizer_config.json with its
chat template) or a sentencepiece model (the built-in task trains its own).

Both expose ``encode``, ``decode``, ``eos_id``, ``vocab_size`` (the true number of tokens,
without embedding padding) and ``tokens()``; ``load_tokenizer`` picks one from the path.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Iterable

import sentencepiece as spm

from .data import TOKENIZER_TEMPLATE
from . import ConfigError

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

    def tokens(self) -> list:
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

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


class HFTokenizer:
    """A Hugging Face tokenizer folder, read offline. ``vocab_size`` counts added tokens too."""

    def __init__(self, folder):
        from transformers import AutoTokenizer

        self.path = str(folder)
        try:
            self.tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"tokenizer {self.path}: not a readable Hugging Face tokenizer folder "
                             f"({str(e).splitlines()[0][:200]})") from None
        if self.tok.eos_token_id is None:
            raise ConfigError(f"tokenizer {self.path}: no eos_token in its tokenizer_config.json")
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.eos_id if self.tok.pad_token_id is None else self.tok.pad_token_id

    def encode(self, text: str) -> list:
        return self.tok(text)["input_ids"]  # with the tokenizer's own special tokens (Llama 3's BOS)

    def decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def tokens(self) -> list:
        return self.tok.convert_ids_to_tokens(list(range(self.vocab_size)))

    def apply_chat_template(self, prompt: str | list) -> list:
        """``prompt`` (a text: one user turn; or chat messages) followed by the assistant's turn header."""
        if not self.tok.chat_template:
            raise ConfigError(f"data.chat_template={TOKENIZER_TEMPLATE!r} but tokenizer {self.path} has no chat "
                             "template (tokenizer_config.json chat_template, or chat_template.jinja)")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return list(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))


Tokenizer = SentencePieceTokenizer | HFTokenizer


def load_tokenizer(path) -> Tokenizer:
    """A Hugging Face tokenizer from a folder, a sentencepiece model from a file."""
    if Path(path).is_dir():
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def prompt_encoder(tokenizer: Tokenizer, chat_template: str) -> Callable[[str], list]:
    """Prompt text -> token ids through ``data.chat_template``: a str.format template with
    ``{prompt}``, or "tokenizer" for the tokenizer's own chat template."""
    if chat_template == TOKENIZER_TEMPLATE:
        if not isinstance(tokenizer, HFTokenizer):
            raise ConfigError(f"data.chat_template={TOKENIZER_TEMPLATE!r} needs a Hugging Face tokenizer folder; "
                             f"{tokenizer.path} is a sentencepiece model")
        return tokenizer.apply_chat_template
    return lambda text: tokenizer.encode(chat_template.format(prompt=text))


def check_same_vocabulary(student: Tokenizer, teacher: Tokenizer) -> None:
    """Teacher and student tokenizers must map every id to the same token (their end tokens
    may differ: the rollouts remap them)."""
    if student.vocab_size != teacher.vocab_size:
        raise ConfigError(f"teacher_tokenizer={teacher.path} has {teacher.vocab_size} tokens and tokenizer="
                         f"{student.path} {student.vocab_size}: teacher and student must share one vocabulary")
    for i, (s, t) in enumerate(zip(student.tokens(), teacher.tokens())):
        if s != t:
            raise ConfigError(f"teacher_tokenizer={teacher.path} and tokenizer={student.path} differ at id {i} "
                             f"({t!r} vs {s!r}): teacher and student must share one vocabulary")


def check_tokenizer(run, tokenizer: Tokenizer) -> None:
    """The run's teacher and student must have the tokenizer's vocabulary size (``run`` is a
    RunConfig); a ValueError names the keys and the value to set."""
    for what in ("teacher", "student"):
        model = getattr(run, what).model
        if model.vocab_size != tokenizer.vocab_size:
            raise ConfigError(f"tokenizer={run.tokenizer} has {tokenizer.vocab_size} tokens but "
                             f"{what}.model.vocab_size={model.vocab_size}: set {what}.model.vocab_size="
                             f"{tokenizer.vocab_size}")
