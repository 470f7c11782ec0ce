"""Prompt data: JSONL, Parquet or a Hugging Face ``datasets`` folder of prompts, shuffled per
epoch from a seed, resumable.

A prompt is a string or a list of chat messages (``{"role", "content"}``, rendered with the
tokenizer's chat template: ``data.chat_template=tokenizer``); fields are read by dotted path,
so verl's layout (``prompt`` a message list, ``reward_model.ground_truth`` the answer) reads
with ``answer_field=reward_model.ground_truth``.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from .logs import logger
from .seeds import stream_seed
from . import ConfigError

TOKENIZER_TEMPLATE = "tokenizer"  # the data.chat_template value that selects the tokenizer's own


@dataclass
class PromptDataConfig:
    # a JSONL file, a Parquet file (.parquet) or a folder written by datasets' save_to_disk
    path: str
    prompt_field: str = "prompt"  # dotted path into a record: a string or a list of chat messages
    answer_field: Optional[str] = "answer"  # dotted path; kept for evaluation; may be absent from a record
    # a str.format template with {prompt}, or "tokenizer": the Hugging Face tokenizer's chat template
    chat_template: str = "{prompt}"
    max_prompt_tokens: int = 512
    seed: Optional[int] = None  # the per-epoch shuffle; None: the run's schedule.seed (0 outside a run)
    split: str = "train"  # the split of a datasets folder holding several (a DatasetDict)


@dataclass
class Prompt:
    index: int  # order among the kept prompts
    line: int  # 1-based line (JSONL) or row (Parquet, datasets) in the file
    text: Union[str, list]  # the prompt as the file holds it: a string or chat messages
    token_ids: list
    answer: Optional[str]


def field(record: dict, path: str):
    """``record``'s value at the dotted ``path`` (``reward_model.ground_truth``); KeyError if absent."""
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


def _has_rows(config: PromptDataConfig) -> bool:
    """Parquet and datasets folders number rows; JSONL numbers lines."""
    return os.path.isdir(config.path) or config.path.endswith(".parquet")


def location(config: PromptDataConfig, line: int) -> str:
    """Where record ``line`` (``Prompt.line``) is, as errors name it: ``FILE:LINE`` for JSONL,
    ``PATH row N`` for Parquet and datasets folders."""
    return f"{config.path} row {line}" if _has_rows(config) else f"{config.path}:{line}"


def records(config: PromptDataConfig) -> Iterator[tuple[str, int, object]]:
    """(where, 1-based line or row, record) of every record in ``config.path``, whatever its format."""
    path = config.path
    if os.path.isdir(path):
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"data.path={path} is a folder (a datasets save_to_disk folder?): reading it needs "
                             "the datasets package (pip install datasets)") from None
        try:
            data = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise ConfigError(f"data.path={path}: not a datasets folder written by save_to_disk ({e})") from None
        if isinstance(data, datasets.DatasetDict):
            if config.split not in data:
                raise ConfigError(f"data.path={path} has splits {sorted(data)}; data.split={config.split!r} is not one")
            data = data[config.split]
        for row, record in enumerate(data, 1):
            yield location(config, row), row, record
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"data.path={path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        row = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for record in batch.to_pylist():
                row += 1
                yield location(config, row), row, record
    else:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = location(config, line_no)
                try:
                    yield where, line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None


def checked_prompt(prompt, config: PromptDataConfig, where: str):
    """``prompt`` if it is a non-empty string, or a list of chat messages with the tokenizer's
    chat template; a ValueError naming ``where`` otherwise."""
    name = config.prompt_field
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ConfigError(f"{where}: empty prompt")
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise ConfigError(f"{where}: field {name!r} must be a string or a non-empty list of chat messages")
    for i, message in enumerate(prompt):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ConfigError(f"{where}: field {name!r} message {i} must be {{'role': str, 'content': str}}, "
                             f"not {message!r}")
    if config.chat_template != TOKENIZER_TEMPLATE:
        raise ConfigError(f"{where}: field {name!r} is a list of chat messages, which only the tokenizer's chat "
                         f"template renders: set data.chat_template={TOKENIZER_TEMPLATE}")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


class PromptStream:
    """Prompts in a seeded random order, epoch after epoch; ``state_dict`` records where it is.

    Over-length prompts are reported once and skipped (``skipped_too_long``); a malformed line,
    a missing or ill-typed prompt field and an empty prompt are errors naming file and line / row.
    """

    def __init__(self, config: PromptDataConfig, tokenize: Callable[[Union[str, list]], list]):
        """``tokenize``: a prompt (text or chat messages) -> token ids, chat template included
        (tokenizer.prompt_encoder)."""
        self.config = config
        self.prompts: list[Prompt] = []
        too_long = []
        for where, line_no, record in records(config):
            try:
                prompt = field(record, config.prompt_field) if isinstance(record, dict) else None
            except KeyError:
                prompt = None
            if prompt is None:
                raise ConfigError(f"{where}: missing field {config.prompt_field!r}")
            prompt = checked_prompt(prompt, config, where)
            ids = list(tokenize(prompt))
            if len(ids) > config.max_prompt_tokens:
                too_long.append(line_no)
                continue
            try:
                answer = field(record, config.answer_field) if config.answer_field else None
            except KeyError:
                answer = None
            self.prompts.append(Prompt(len(self.prompts), line_no, prompt, ids, answer))
        self.skipped_too_long = len(too_long)
        if too_long:
            logger.warning(f"{config.path}: skipped {len(too_long)} prompts longer than max_prompt_tokens="
                           f"{config.max_prompt_tokens} ({'rows' if _has_rows(config) else 'lines'} "
                           f"{too_long[:10]}{' ...' if len(too_long) > 10 else ''})")
        if not self.prompts:
            raise ConfigError(f"{config.path}: no usable prompts")
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list:
        order = list(range(len(self.prompts)))
        seed = 0 if self.config.seed is None else self.config.seed
        random.Random(stream_seed(seed, "prompt_order", epoch=epoch)).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Prompt]:
        batch = []
        while len(batch) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            batch.append(self.prompts[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
