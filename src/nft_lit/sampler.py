"""The sampler: problems in, scored answers out (generate, decode, verify).

One ``Sampler`` owns the rollout engine, the tokenizer, the prompt template and the verifier. It is built
once per run and shared by the training rollouts and every evaluation, so both sample through exactly the
same prompt encoding, engine and grading (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from nft_lit.prompts import PromptTemplate, encode_prompt
from nft_lit.reward import Verifier
from nft_lit.rollout import RolloutEngine, SamplingParams


class HasQuestionAndAnswer(Protocol):
    """What the sampler reads of a problem (``data.Problem`` and test doubles)."""

    @property
    def question(self) -> str: ...

    @property
    def answer(self) -> str: ...


@dataclass
class ScoredAnswers:
    """``num_samples`` answers for each of P prompts; answer j of prompt i is at index ``i * num_samples + j``.

    ``correct`` is the verifier's reward (0.0 or 1.0; a truncated answer is 0 by rule); ``engine_logprobs``
    are the engine's log-probs of the sampled tokens, one per response token.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    engine_logprobs: list[list[float]]
    truncated: list[bool]
    correct: list[float]
    num_samples: int
    gen_seconds: float
    verify_seconds: float

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)


class Sampler:
    """Generates answers to problems with a rollout engine and scores them with a verifier.

    Args:
        engine: the rollout engine, or a zero-argument factory called at first use (engines that hold a
            model copy or a vLLM instance are built lazily, once the model folder and the device exist).
        tokenizer: HF-style tokenizer (``encode``, ``decode``).
        verifier: scores decoded answers against the gold answers.
        prompt_template: turns a question into the prompt text; None encodes the bare question.
    """

    def __init__(
        self,
        engine: RolloutEngine | Callable[[], RolloutEngine],
        tokenizer: Any,
        verifier: Verifier,
        prompt_template: PromptTemplate | None = None,
    ) -> None:
        self._engine_or_factory = engine
        self._engine: RolloutEngine | None = engine if hasattr(engine, "generate") else None  # type: ignore[assignment]
        self.tokenizer = tokenizer
        self.verifier = verifier
        self.prompt_template = prompt_template
        self._prompt_cache: dict[str, list[int]] = {}

    @property
    def engine(self) -> RolloutEngine:
        if self._engine is None:
            self._engine = self._engine_or_factory()  # type: ignore[operator]
        return self._engine

    def sync(self, policy: nn.Module) -> dict[str, float]:
        """Make the engine sample from ``policy``'s current weights; returns ``sync/*`` metrics."""
        return dict(self.engine.sync_weights(policy) or {})

    def encode(self, question: str) -> list[int]:
        """Prompt token ids of ``question`` (cached: a prompt is encoded once per run)."""
        ids = self._prompt_cache.get(question)
        if ids is None:
            ids = self._prompt_cache[question] = encode_prompt(question, self.prompt_template, self.tokenizer)
        return ids

    def sample(
        self, problems: Sequence[HasQuestionAndAnswer], num_samples: int, sampling: SamplingParams
    ) -> ScoredAnswers:
        """Generate ``num_samples`` answers per problem from the synced weights and verify them."""
        t0 = time.perf_counter()
        prompts = [self.encode(p.question) for p in problems]
        rollout = self.engine.generate(prompts, num_samples, sampling)
        gen_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rollout.response_ids]
        golds = [p.answer for p in problems for _ in range(num_samples)]
        result = self.verifier.score(texts, golds, list(rollout.truncated))
        return ScoredAnswers(
            prompt_ids=prompts,
            response_ids=[list(r) for r in rollout.response_ids],
            engine_logprobs=[list(lp) for lp in rollout.logprobs],
            truncated=[bool(t) for t in rollout.truncated],
            correct=[float(r) for r in result.rewards],
            num_samples=num_samples,
            gen_seconds=gen_seconds,
            verify_seconds=time.perf_counter() - t0,
        )
