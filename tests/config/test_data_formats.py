"""Prompt data in the formats datasets ship: JSONL (a string or chat messages), Parquet in
verl's layout (``prompt`` a message list, ``reward_model.ground_truth``), and Hugging Face
``datasets`` folders (a Dataset or a DatasetDict's split); the same prompts read the same
token ids and answers from each, and bad rows name the file and row."""
import json

import pytest

from support.hf_models import hf_tokenizer
from tropd_megatron.data import PromptDataConfig, PromptStream
from tropd_megatron.evaluation.avg_at_n import load_problems
from tropd_megatron.tokenizer import load_tokenizer, prompt_encoder

pytest.importorskip("transformers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

PROBLEMS = [(f"({a}+{b})*3", str((a + b) * 3)) for a in range(4) for b in range(3)]
SYSTEM = "Compute."


def verl_rows():
    """verl's RL parquet layout: chat messages, the answer nested under reward_model."""
    return [{"data_source": "tiny", "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": a},
             "extra_info": {"index": i}} for i, (q, a) in enumerate(PROBLEMS)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    hf_tokenizer(root / "tok", [f"Q: {q} A: {a} {SYSTEM}" for q, a in PROBLEMS])
    with open(root / "plain.jsonl", "w") as f:
        for q, a in PROBLEMS:
            f.write(json.dumps({"prompt": q, "answer": a}) + "\n")
    with open(root / "messages.jsonl", "w") as f:
        for row in verl_rows():
            f.write(json.dumps({"messages": row["prompt"], "answer": row["reward_model"]["ground_truth"]}) + "\n")
    pq.write_table(pa.Table.from_pylist(verl_rows()), root / "verl.parquet", row_group_size=5)  # 3 batches
    datasets.Dataset.from_list(verl_rows()).save_to_disk(str(root / "dataset"))
    rows = verl_rows()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]),
                          "test": datasets.Dataset.from_list(rows[8:])}).save_to_disk(str(root / "splits"))
    return root


def read(root, path, **settings):
    encode = prompt_encoder(load_tokenizer(root / "tok"), settings.get("chat_template", "tokenizer"))
    return PromptStream(PromptDataConfig(str(root / path), **{"chat_template": "tokenizer", **settings}), encode)


def test_every_format_reads_the_same_prompts_and_answers(files):
    tok = load_tokenizer(files / "tok")
    verl = dict(prompt_field="prompt", answer_field="reward_model.ground_truth")
    streams = {
        "messages.jsonl": read(files, "messages.jsonl", prompt_field="messages"),
        "verl.parquet": read(files, "verl.parquet", **verl),
        "dataset": read(files, "dataset", **verl),
    }
    for name, stream in streams.items():
        prompts = stream.prompts
        assert [p.answer for p in prompts] == [a for _, a in PROBLEMS], name
        assert [p.line for p in prompts] == list(range(1, len(PROBLEMS) + 1)), name
        # the system turn and the user turn, rendered by the tokenizer's chat template
        assert tok.tok.decode(prompts[4].token_ids) == f"Q: {SYSTEM}Q: {PROBLEMS[4][0]} A:", name
        assert prompts[4].text == verl_rows()[4]["prompt"]
        assert [p.token_ids for p in prompts] == [p.token_ids for p in streams["messages.jsonl"].prompts], name
    # a plain string prompt through a format template, as before
    plain = read(files, "plain.jsonl", chat_template="Q: {prompt} A:").prompts
    assert tok.tok.decode(plain[4].token_ids) == f"Q: {PROBLEMS[4][0]} A:" and plain[4].answer == PROBLEMS[4][1]


def test_a_datasets_split_and_evaluation_problems(files):
    verl = dict(prompt_field="prompt", answer_field="reward_model.ground_truth")
    assert len(read(files, "splits", **verl).prompts) == 8  # data.split defaults to train
    test = read(files, "splits", split="test", **verl).prompts
    assert [p.answer for p in test] == [a for _, a in PROBLEMS[8:]]
    encode = prompt_encoder(load_tokenizer(files / "tok"), "tokenizer")
    problems = load_problems(PromptDataConfig(str(files / "verl.parquet"), chat_template="tokenizer", **verl), encode)
    assert len(problems) == len(PROBLEMS) and problems[0].answer == PROBLEMS[0][1]
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]; data.split='validation' is not one"):
        read(files, "splits", split="validation", **verl)


def test_bad_rows_name_the_file_and_row(files, tmp_path):
    rows = verl_rows()
    rows[6]["prompt"] = [{"role": "user"}]  # no content
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet", row_group_size=4)
    encode = prompt_encoder(load_tokenizer(files / "tok"), "tokenizer")
    with pytest.raises(ValueError, match=r"bad.parquet row 7: field 'prompt' message 0 must be"):
        PromptStream(PromptDataConfig(str(tmp_path / "bad.parquet"), chat_template="tokenizer"), encode)
    with pytest.raises(ValueError, match=r"dataset row 1: missing field 'question'"):
        PromptStream(PromptDataConfig(str(files / "dataset"), prompt_field="question", chat_template="tokenizer"),
                     encode)
    with pytest.raises(ValueError, match=r"messages.jsonl:1: field 'messages' is a list of chat messages, which only "
                                         r"the tokenizer's chat template renders: set data.chat_template=tokenizer"):
        PromptStream(PromptDataConfig(str(files / "messages.jsonl"), prompt_field="messages"),
                     prompt_encoder(load_tokenizer(files / "tok"), "Q: {prompt} A:"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="not a datasets folder written by save_to_disk"):
        PromptStream(PromptDataConfig(str(tmp_path / "empty_dir")), encode)
    # a missing nested answer is allowed for training, refused for evaluation, naming the row
    rows = verl_rows()
    del rows[2]["reward_model"]["ground_truth"]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "no_answer.parquet")
    config = PromptDataConfig(str(tmp_path / "no_answer.parquet"), chat_template="tokenizer",
                              answer_field="reward_model.ground_truth")
    assert PromptStream(config, encode).prompts[2].answer is None
    with pytest.raises(ValueError, match=r"no_answer.parquet row 3: missing reference answer field"):
        load_problems(config, encode)
