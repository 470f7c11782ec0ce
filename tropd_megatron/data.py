"""Prompt data: a JSONL file of prompts, shuffled per epoch from a seed, resumable."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable, Optional

from .logs import logger
from .seeds import stream_seed


@dataclass
class PromptDataConfig:
    path: str
    prompt_field: str = "prompt"
    answer_field: Optional[str] = "answer"  # kept for evaluation; may be absent from a line
    # a str.format template with {prompt}, or "tokenizer": the Hugging Face tokenizer's chat template
    chat_template: str = "{prompt}"
    max_prompt_tokens: int = 512
    seed: int = 0


@dataclass
class Prompt:
    index: int  # line order among the kept prompts
    line: int  # 1-based line in the file
    text: str
    token_ids: list
    answer: Optional[str]


class PromptStream:
    """Prompts in a seeded random order, epoch after epoch; ``state_dict`` records where it is.

    Over-length prompts are reported once and skipped (``skipped_too_long``); a malformed line,
    a missing or non-string prompt field and an empty prompt are errors naming file and line.
    """

    def __init__(self, config: PromptDataConfig, tokenize: Callable[[str], list]):
        """``tokenize``: prompt text -> token ids, chat template included (tokenizer.prompt_encoder)."""
        self.config = config
        self.prompts: list[Prompt] = []
        too_long = []
        with open(config.path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{config.path}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict) or config.prompt_field not in record:
                    raise ValueError(f"{where}: missing field {config.prompt_field!r}")
                text = record[config.prompt_field]
                if not isinstance(text, str):
                    raise ValueError(f"{where}: field {config.prompt_field!r} must be a string")
                if not text.strip():
                    raise ValueError(f"{where}: empty prompt")
                ids = list(tokenize(text))
                if len(ids) > config.max_prompt_tokens:
                    too_long.append(line_no)
                    continue
                answer = record.get(config.answer_field) if config.answer_field else None
                self.prompts.append(Prompt(len(self.prompts), line_no, text, ids, answer))
        self.skipped_too_long = len(too_long)
        if too_long:
            logger.warning(f"{config.path}: skipped {len(too_long)} prompts longer than max_prompt_tokens="
                           f"{config.max_prompt_tokens} (lines {too_long[:10]}{' ...' if len(too_long) > 10 else ''})")
        if not self.prompts:
            raise ValueError(f"{config.path}: no usable prompts")
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list:
        order = list(range(len(self.prompts)))
        random.Random(stream_seed(self.config.seed, "prompt_order", epoch=epoch)).shuffle(order)
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
