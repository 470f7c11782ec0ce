"""avg@n evaluation on a JSONL of problems with reference answers, through Megatron inference.

Each problem is sampled n times (greedy when n = 1); a sample is correct when its extracted
final answer (boxed, "answer is", "####", else the last number) equals the reference
(``answers.answers_match``). avg@n is the mean over problems of the share of correct samples,
as reported in the TrOPD paper; pass@n (any sample correct) is reported beside it.
Data-parallel ranks split the problems; a JSONL results file keeps every sample.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from ..data import Prompt, PromptDataConfig, PromptStream, location
from ..megatron.inference import Generator, SamplingConfig
from ..seeds import stream_seed
from .answers import answers_match, extract_answer
from .. import ConfigError


def load_problems(config: PromptDataConfig, tokenize, max_problems: int = 0) -> list[Prompt]:
    """The file's problems in file order (over-length prompts skipped and reported); every
    problem needs a reference answer."""
    if not config.answer_field:
        raise ConfigError(f"{config.path}: evaluation needs answer_field (the reference answer's key)")
    problems = PromptStream(config, tokenize).prompts
    for p in problems:
        if p.answer is None or str(p.answer).strip() == "":
            raise ConfigError(f"{location(config, p.line)}: missing reference answer field {config.answer_field!r}")
    return problems[:max_problems] if max_problems else problems


@dataclass
class EvalResult:
    avg_at_n: float
    pass_at_n: float
    problems: int
    samples: int  # n

    def as_dict(self) -> dict:
        return {"avg_at_n": self.avg_at_n, "pass_at_n": self.pass_at_n, "problems": self.problems, "n": self.samples}


def evaluate(generator: Generator, problems: list[Prompt], decode, *, samples: int = 1, temperature: float = 1.0,
             max_new_tokens: int = 256, seed: int = 0, results_path: str | None = None, progress: bool = True,
             chunk: int = 0) -> EvalResult:
    """avg@n of ``generator``'s model on ``problems``. Collective over the whole job: every
    rank calls it; data-parallel ranks take every dp_size-th problem. ``decode`` maps token ids
    to text. ``results_path``: a JSONL line per problem (prompt, reference, samples, score)."""
    if samples < 1:
        raise ConfigError(f"samples={samples}; avg@n needs n >= 1")
    sampling = (SamplingConfig(top_k=1, max_new_tokens=max_new_tokens) if samples == 1
                else SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens))
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    mine = problems[dp_rank::dp_size]
    # several engine batches per call: the dynamic engine refills a finished sequence's slot at once
    chunk = chunk or max(4 * generator.max_batch_size // samples, 1)
    printer = dist.get_rank() == 0
    records = []
    bar = tqdm(total=len(problems), desc=f"eval avg@{samples}", disable=not (progress and printer), file=sys.stderr,
               leave=False)
    for start in range(0, len(mine), chunk):
        batch = mine[start : start + chunk]
        outs = generator.generate([p.token_ids for p in batch for _ in range(samples)], sampling,
                                  seed=stream_seed(seed, "evaluation", start=start))
        for i, p in enumerate(batch):
            texts = [decode(o.tokens) for o in outs[i * samples : (i + 1) * samples]]
            extracted = [extract_answer(t) for t in texts]
            correct = [answers_match(e, str(p.answer)) for e in extracted]
            records.append({"index": p.index, "line": p.line, "prompt": p.text, "reference": str(p.answer),
                            "samples": [{"text": t, "extracted": e, "correct": c}
                                        for t, e, c in zip(texts, extracted, correct)],
                            "score": sum(correct) / samples})
        bar.update(len(batch) * dp_size)
    bar.close()
    gathered = [None] * dp_size
    dist.all_gather_object(gathered, records, group=parallel_state.get_data_parallel_group())
    records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    result = EvalResult(sum(r["score"] for r in records) / len(records),
                        sum(r["score"] > 0 for r in records) / len(records), len(records), samples)
    if results_path and printer:
        os.makedirs(os.path.dirname(results_path) or ".", exist_ok=True)
        with open(results_path + ".tmp", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(results_path + ".tmp", results_path)
    return result
