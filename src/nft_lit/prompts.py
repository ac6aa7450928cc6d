"""Prompt templates: how a question becomes prompt token ids (DAPO/NFT, Qwen-Math boxed, plain).

The template decides what the verifier has to find: the DAPO/NFT template asks for a last line
``Answer: $Answer``, the Qwen-Math one for ``\\boxed{}``; ``nft_lit.reward.extract_answer`` understands both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["DAPO_PREFIX", "DAPO_SUFFIX", "QWEN_MATH_SYSTEM", "PromptTemplate", "PromptTokenizer"]

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
        return list(tokenizer.encode(text, add_special_tokens=add_special))


def encode_prompt(question: str, template: PromptTemplate | None, tokenizer: Any) -> list[int]:
    """Prompt token ids: through the template when given, else the bare question without special tokens."""
    if template is None:
        return list(tokenizer.encode(question, add_special_tokens=False))
    return template.encode(question, tokenizer)
