"""Prompt templates: plain text for the char-level demo, chat rendering for instruct models, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nft_lit.answers import extract_answer
from nft_lit.models import build_char_tokenizer
from nft_lit.prompts import (
    DAPO_PREFIX,
    DAPO_SUFFIX,
    QWEN_MATH_SYSTEM,
    PromptEncodingError,
    PromptTemplate,
    encode_prompt,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "prompt"
CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class CharTokenizer:
    """The demo's shape of tokenizer: characters to ids, no chat template."""

    vocab = "0123456789+-*="

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.vocab.index(c) for c in text]


def _hf_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    chars = sorted(set("".join([DAPO_PREFIX, DAPO_SUFFIX, QWEN_MATH_SYSTEM, CHAT, "What is 2+3?<|>"])))
    vocab = {"[UNK]": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>")
    tok.chat_template = chat_template
    return tok


def test_plain_template_is_exactly_the_question():
    plain = instantiate(OmegaConf.load(CONFIGS / "plain.yaml"))
    assert plain.render("045+123=") == "045+123="
    assert plain.encode("045+123=", CharTokenizer()) == [0, 4, 5, 10, 1, 2, 3, 13]


def test_prefix_suffix_and_format_string():
    t = PromptTemplate(template="Q: {question}", prefix="[", suffix="]")
    assert t.render("1+1=") == "[Q: 1+1=]"
    with pytest.raises(ValueError, match=r"must contain '\{question\}'"):
        PromptTemplate(template="no slot")
    with pytest.raises(ValueError, match="not a valid format string"):
        PromptTemplate(template="{question} {other}")


def test_chat_template_renders_system_and_user_with_generation_prompt():
    tok = _hf_tokenizer(CHAT)
    qwen = instantiate(OmegaConf.load(CONFIGS / "qwen_math.yaml"))
    text = qwen.render("What is 2+3?", tok)
    assert text == f"<|system|>{QWEN_MATH_SYSTEM}<|end|><|user|>What is 2+3?<|end|><|assistant|>"
    ids = qwen.encode("What is 2+3?", tok)
    # The chat text is encoded as is: no extra BOS on top of the template's own markup.
    assert ids == tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids).replace(" ", "") == text.replace(" ", "")


def test_chat_requested_but_tokenizer_has_none_falls_back_to_plain_text():
    tok = _hf_tokenizer(None)
    dapo = instantiate(OmegaConf.load(CONFIGS / "dapo.yaml"))
    assert dapo.render("What is 2+3?", tok) == DAPO_PREFIX + "What is 2+3?" + DAPO_SUFFIX
    assert dapo.encode("What is 2+3?", tok) == tok.encode(dapo.render("What is 2+3?"), add_special_tokens=True)


def test_configs_match_the_reference_texts():
    dapo = instantiate(OmegaConf.load(CONFIGS / "dapo.yaml"))
    assert (dapo.prefix, dapo.suffix, dapo.use_chat_template) == (DAPO_PREFIX, DAPO_SUFFIX, True)
    qwen = instantiate(OmegaConf.load(CONFIGS / "qwen_math.yaml"))
    assert qwen.system == QWEN_MATH_SYSTEM and qwen.use_chat_template


def test_verifier_extracts_what_each_template_asks_for():
    # DAPO asks for a last line "Answer: $Answer"; Qwen-Math for \boxed{}.
    assert "Answer: $Answer" in DAPO_PREFIX and "\\boxed{}" in QWEN_MATH_SYSTEM
    assert extract_answer("Step 1: ...\nStep 2: ...\nAnswer: 42") == "42"
    assert extract_answer("so the result is $\\boxed{\\frac{3}{4}}$.") == "\\frac{3}{4}"


MATH500_QUESTION = (
    "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.  Enter your answer in the form "
    "$(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$"
)


@pytest.mark.parametrize("template", [None, PromptTemplate()])
def test_char_tokenizer_on_a_foreign_data_set_names_the_question_and_characters(template):
    tok = build_char_tokenizer("0123456789+-*=")  # the demo's tokenizer, asked to encode a MATH-500 question
    with pytest.raises(PromptEncodingError) as info:
        encode_prompt(MATH500_QUESTION, template, tok)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "WordLevel" not in message
    assert repr(MATH500_QUESTION[:57] + "...") in message
    assert "cannot encode this data set" in message
    missing = sorted(set(MATH500_QUESTION) - set("0123456789+-*="))
    assert sorted(info.value.missing) == missing and repr(missing) in message


def test_unencodable_template_text_blames_the_template():
    tok = build_char_tokenizer("0123456789+=")
    with pytest.raises(PromptEncodingError, match=r"\[' ', ':', 'Q'\] .* prompt template's text"):
        PromptTemplate(prefix="Q: ").encode("1+2=", tok)


def test_encoding_that_works_is_unchanged_and_other_errors_pass_through():
    tok = build_char_tokenizer("0123456789+=")
    assert encode_prompt("12+3=<eos>", None, tok) == tok.encode("12+3=<eos>", add_special_tokens=False)
    assert encode_prompt("12+3=", PromptTemplate(), tok) == tok.encode("12+3=", add_special_tokens=True)
    assert encode_prompt("045+123=", None, CharTokenizer()) == [0, 4, 5, 10, 1, 2, 3, 13]
    with pytest.raises(PromptEncodingError, match=r"\['\?', 'x'\]"):
        encode_prompt("x1+1=?", None, CharTokenizer())  # any tokenizer: characters probed one by one

    class Broken(CharTokenizer):
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            if len(text) > 1:
                raise RuntimeError("not about characters")
            return super().encode(text, add_special_tokens)

    with pytest.raises(RuntimeError, match="not about characters"):
        encode_prompt("1+1=", None, Broken())
