"""Tokenizers: a Hugging Face folder with its chat template, a sentencepiece model, and the
teacher/student vocabulary check; each bad input names the path or key."""
import pytest

from support.hf_models import CHAT_TEMPLATE, hf_tokenizer
from tropd_megatron.tokenizer import (HFTokenizer, SentencePieceTokenizer, check_same_vocabulary, load_tokenizer,
                                      prompt_encoder)

pytest.importorskip("transformers")
TEXTS = [f"Q: ({a}+{b})*{c} A: {(a + b) * c}" for a in range(10) for b in range(10) for c in range(3)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    hf_tokenizer(root / "student", TEXTS)
    hf_tokenizer(root / "teacher", TEXTS, eos_token="<|endoftext|>")
    hf_tokenizer(root / "other", [t.replace("+", "-") for t in TEXTS])  # another vocabulary, same size
    hf_tokenizer(root / "smaller", TEXTS[:40])
    sp = SentencePieceTokenizer.train(TEXTS, root / "sp.model", vocab_size=40)
    return root, sp


def test_hugging_face_folder_with_its_chat_template(folders):
    root, _ = folders
    tok = load_tokenizer(root / "student")
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == len(tok.tokens()) == 48
    assert tok.tokens()[tok.eos_id] == "<|im_end|>"
    chat = prompt_encoder(tok, "tokenizer")("(1+2)*3")
    assert tok.tok.decode(chat) == "Q: (1+2)*3 A:"  # CHAT_TEMPLATE with the generation prompt
    assert "{{ m['content'] }}" in CHAT_TEMPLATE
    assert prompt_encoder(tok, "Q: {prompt} A:")("(1+2)*3") == chat
    assert tok.decode(tok.encode("(1+2)*3") + [tok.eos_id]) == "(1+2)*3"


def test_vocabulary_check_allows_other_end_tokens_and_names_the_first_difference(folders):
    root, _ = folders
    student, teacher = load_tokenizer(root / "student"), load_tokenizer(root / "teacher")
    assert student.eos_id != teacher.eos_id
    check_same_vocabulary(student, teacher)
    with pytest.raises(ValueError, match=r"teacher_tokenizer=.*other and tokenizer=.*student differ at id \d+ "):
        check_same_vocabulary(student, load_tokenizer(root / "other"))
    with pytest.raises(ValueError, match=r"teacher_tokenizer=.*smaller has \d+ tokens and tokenizer=.*student 48: "
                                         "teacher and student must share one vocabulary"):
        check_same_vocabulary(student, load_tokenizer(root / "smaller"))


def test_bad_tokenizer_inputs_are_named(folders, tmp_path):
    root, sp = folders
    assert isinstance(load_tokenizer(root / "sp.model"), SentencePieceTokenizer)
    with pytest.raises(ValueError, match=r"needs a Hugging Face tokenizer folder; .*sp.model is a sentencepiece"):
        prompt_encoder(sp, "tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer .*empty: not a readable Hugging Face tokenizer folder"):
        (tmp_path / "empty").mkdir()
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"tokenizer .*missing.model: no such file"):
        load_tokenizer(tmp_path / "missing.model")
    plain = tmp_path / "plain"
    tok = hf_tokenizer(plain, TEXTS)
    (plain / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match=r"data.chat_template='tokenizer' but tokenizer .*plain has no chat template"):
        prompt_encoder(load_tokenizer(plain), "tokenizer")("1+1")
    assert tok.chat_template
