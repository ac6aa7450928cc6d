"""Prompt templates: how a question becomes prompt token ids (DAPO/NFT, Qwen-Math boxed, plain).

The template decides what the verifier has to find: the DAPO/NFT template asks for a last line
``Answer: $Answer``, the Qwen-Math one for ``\\boxed{}``; ``nft_lit.answers.extract_answer`` understands both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "DAPO_PREFIX",
    "DAPO_SUFFIX",
    "QWEN_MATH_SYSTEM",
    "PromptEncodingError",
    "PromptTemplate",
    "PromptTokenizer",
    "encode_prompt",
]

# DAPO-Math-17k's prompt (the released DAPO/NFT training data wraps every question in it).
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
# Qwen2.5-Math's chain-of-thought system prompt.
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


class PromptTokenizer(Protocol):
    """What a template needs from a tokenizer (Hugging Face tokenizers satisfy it).

    ``chat_template`` and ``apply_chat_template`` are only used when a template asks for chat.
    """

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class PromptEncodingError(ValueError):
    """The tokenizer cannot encode a prompt (e.g. a character-level tokenizer meets a character outside its
    alphabet): names the question and the characters it has no token for."""

    def __init__(self, question: str, missing: list[str]) -> None:
        self.question = question
        self.missing = missing
        short = question if len(question) <= 60 else question[:57] + "..."
        chars = sorted(missing)
        shown = repr(chars[:40])[:-1] + (", ...]" if len(chars) > 40 else "]")
        where = f"this model's tokenizer has no token for the characters {shown} ({len(chars)} distinct)"
        if any(c in question for c in missing):
            verdict = (
                "so this model's tokenizer cannot encode this data set (a character-level tokenizer knows only "
                "its alphabet: evaluate such a model on data of its own task)"
            )
        else:
            where += " of the prompt template's text (the question itself encodes)"
            verdict = "so this prompt template does not fit this model's tokenizer"
        super().__init__(f"cannot encode the prompt of question {short!r}: {where}, {verdict}")


def _encode(tokenizer: Any, text: str, add_special_tokens: bool, question: str) -> list[int]:
    """``tokenizer.encode`` of ``text``; a failure caused by characters it cannot encode becomes a
    ``PromptEncodingError`` (found only after the failure, so the normal path costs nothing extra)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    except Exception as exc:  # the tokenizers library raises a bare Exception ("Missing [UNK] token")
        missing = _unencodable_characters(tokenizer, text)
        if not missing:
            raise
        raise PromptEncodingError(question, missing) from exc


def _unencodable_characters(tokenizer: Any, text: str) -> list[str]:
    """The distinct characters of ``text`` (in order of appearance) that ``tokenizer`` cannot encode alone.

    Special tokens written out in the text (``<eos>``, chat markup) are encoded whole, so they are removed
    first. A vocab of single characters (``models.build_char_tokenizer``) is looked up directly.
    """
    for token in getattr(tokenizer, "all_special_tokens", None) or []:
        text = text.replace(token, "")
    chars = list(dict.fromkeys(text))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    if vocab is not None and all(len(t) == 1 for t in vocab if t not in specials):
        return [c for c in chars if c not in vocab]
    missing = []
    for char in chars:
        try:
            tokenizer.encode(char, add_special_tokens=False)
        except Exception:  # any failure means this character cannot be encoded
            missing.append(char)
    return missing


@dataclass(frozen=True)
class PromptTemplate:
    """Turns a question into prompt text and token ids.

    The user text is ``prefix + template.format(question=question) + suffix``. With ``use_chat_template``
    and a tokenizer that has a chat template, that text becomes the user message (after an optional
    ``system`` message) and the tokenizer's template renders it with the generation prompt; otherwise the
    text is encoded as is (the ``system`` text, if any, leads it).
    """

    template: str = "{question}"
    prefix: str = ""
    suffix: str = ""
    system: str | None = None
    use_chat_template: bool = False
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        if "{question}" not in self.template:
            raise ValueError(f"PromptTemplate.template must contain '{{question}}', got {self.template!r}")
        try:
            self.template.format(question="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"PromptTemplate.template {self.template!r} is not a valid format string with only "
                f"{{question}} (write literal braces as {{{{ and }}}}): {exc!r}"
            ) from exc

    def user_text(self, question: str) -> str:
        """The user turn: prefix, the formatted question, suffix."""
        return f"{self.prefix}{self.template.format(question=question)}{self.suffix}"

    def uses_chat(self, tokenizer: Any) -> bool:
        """Whether ``tokenizer`` will render this template through its chat template."""
        return self.use_chat_template and bool(getattr(tokenizer, "chat_template", None))

    def render(self, question: str, tokenizer: Any = None) -> str:
        """The full prompt text as the model sees it (chat markup included when used)."""
        if tokenizer is not None and self.uses_chat(tokenizer):
            messages = [{"role": "user", "content": self.user_text(question)}]
            if self.system is not None:
                messages.insert(0, {"role": "system", "content": self.system})
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        lead = f"{self.system}\n\n" if self.system else ""
        return lead + self.user_text(question)

    def encode(self, question: str, tokenizer: PromptTokenizer) -> list[int]:
        """Prompt token ids of ``question``.

        A chat rendering already holds its special tokens (BOS, role markers), so it is encoded without
        adding more; plain text gets the tokenizer's own (``add_special_tokens``).
        """
        text = self.render(question, tokenizer)
        add_special = self.add_special_tokens and not self.uses_chat(tokenizer)
        return _encode(tokenizer, text, add_special, question)


def encode_prompt(question: str, template: PromptTemplate | None, tokenizer: Any) -> list[int]:
    """Prompt token ids: through the template when given, else the bare question without special tokens.

    A tokenizer that cannot encode the text raises ``PromptEncodingError`` (a ``ValueError``) naming the
    question and the characters it has no token for.
    """
    if template is None:
        return _encode(tokenizer, question, False, question)
    return template.encode(question, tokenizer)
