"""The tokenisation boundary on the test model's ChatML template (BOS + multi-token end of turn)."""

import pytest
from transformers import AutoTokenizer

from offdpo import records
from services.refscore.tokenization import BoundaryTokenizer, TokenizationError


@pytest.fixture(scope="module")
def boundary(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    return BoundaryTokenizer(tok, [tok.eos_token_id])


def test_generation_prompt_and_end_of_turn_are_multi_token(boundary):
    tok = boundary.tok
    gen_prompt = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert len(gen_prompt) >= 3, "the test template must have a multi-token boundary"
    assert boundary.end_of_turn_ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok("<|im_end|>\n", add_special_tokens=False).input_ids[1:], "the turn closes with more than one token"


def test_chat_prompt_plus_answer_matches_the_rendered_conversation(boundary):
    tok = boundary.tok
    messages = [("system", "You are helpful."), ("user", "What is 2+2? Explain step by step.")]
    prompt = boundary.encode_prompt(records.chat_prompt(messages))
    answer = "First add two and two: the result is 4."
    answer_ids = boundary.encode_answer_text(answer, after_chat_prompt=prompt.is_chat)
    full_text = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages] + [{"role": "assistant", "content": answer}], tokenize=False
    )
    full_ids = tok(full_text, add_special_tokens=False).input_ids
    # Exactly the conversation's tokens up to and including <|im_end|>; the trailing "\n" is not scored.
    assert prompt.ids + answer_ids == full_ids[: len(prompt.ids) + len(answer_ids)]
    assert answer_ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(full_ids[len(prompt.ids) + len(answer_ids) :]) == ["Ċ"]
    assert (prompt.ids + answer_ids).count(tok.bos_token_id) == 1, "never a second BOS"
    assert prompt.ids[0] == tok.bos_token_id


def test_plain_text_prompt_gets_one_bos_even_if_the_text_has_one(boundary):
    tok = boundary.tok
    plain = boundary.encode_prompt(records.text_prompt("hello world"))
    assert plain.ids[0] == tok.bos_token_id and plain.ids.count(tok.bos_token_id) == 1
    with_bos = boundary.encode_prompt(records.text_prompt(tok.bos_token + "hello world"))
    assert with_bos.ids == plain.ids
    # Plain answers are scored as given: no end-of-turn appended.
    assert (
        boundary.encode_answer_text(" more", after_chat_prompt=False)
        == tok(" more", add_special_tokens=False).input_ids
    )


def test_bad_inputs_say_what_is_wrong(boundary):
    with pytest.raises(TokenizationError, match="prompt is missing"):
        boundary.encode_prompt(records.Prompt())
    with pytest.raises(TokenizationError, match="outside the vocabulary"):
        boundary.encode_prompt(records.Prompt(token_ids={"ids": [1, 10**6]}))
    with pytest.raises(TokenizationError, match="no role"):
        boundary.encode_prompt(records.chat_prompt([("", "x")]))
    with pytest.raises(TokenizationError, match="empty"):
        boundary.encode_answer_text("", after_chat_prompt=True)


def test_a_template_that_is_not_prefix_stable_is_refused(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    # Renders the generation prompt differently from how the answered turn starts.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT>' }}{% endif %}"
    )
    with pytest.raises(TokenizationError, match="not prefix-stable"):
        BoundaryTokenizer(tok, [tok.eos_token_id])


def test_fast_path_gives_exactly_the_tokenizers_ids(boundary):
    """The Rust-backend encode (and its prompt cache) equals tokenizer(text, add_special_tokens=False)."""
    from localdev.testmodel import corpus

    assert boundary._backend is not None, "the test model's tokenizer is fast: the fast path must be in use"
    texts = corpus(300, seed=5) + ["<|im_end|> inside text", "  leading spaces", "emoji \U0001f600 and 中文", ""]
    for text in texts:
        want = boundary.tok(text, add_special_tokens=False).input_ids
        assert list(boundary._plain_ids(text)) == want, text
        assert list(boundary._prompt_ids(text)) == want, text
