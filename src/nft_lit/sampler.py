"""The sampler: problems in, scored answers out (generate, decode, verify).

One ``Sampler`` owns the rollout engine, the tokenizer, the prompt template and the verifier. It is built
once per run and shared by the training rollouts and every evaluation, so both sample through exactly the
same prompt encoding, engine and grading (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

from torch import nn

from nft_lit.distributed import derive_seed
from nft_lit.prompts import PromptTemplate, encode_prompt
from nft_lit.reward import Verifier
from nft_lit.rollout import RolloutEngine, SamplingParams

log = logging.getLogger(__name__)


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
    are the engine's log-probs of the sampled tokens, one per response token. Times: ``gen_seconds`` the
    engine's, ``verify_seconds`` the decoding and verifier's (busy time, which overlaps generation when it
    runs in chunks), ``verify_wait_seconds`` the part of it generation did not hide.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    engine_logprobs: list[list[float]]
    truncated: list[bool]
    correct: list[float]
    num_samples: int
    gen_seconds: float
    verify_seconds: float
    verify_wait_seconds: float

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
        chunk_prompts: generate at most this many prompts per engine call and verify each chunk in a
            background thread while the next one generates, so scoring (math-verify's worker processes)
            hides behind generation. None: one call, then verification. Chunking trades some batching of
            the engine for the overlap: worth it when verification is slow.
    """

    def __init__(
        self,
        engine: RolloutEngine | Callable[[], RolloutEngine],
        tokenizer: Any,
        verifier: Verifier,
        prompt_template: PromptTemplate | None = None,
        chunk_prompts: int | None = None,
    ) -> None:
        if chunk_prompts is not None and not (isinstance(chunk_prompts, int) and chunk_prompts >= 1):
            raise ValueError(f"sampler.chunk_prompts must be a positive int or null, got {chunk_prompts!r}")
        self.chunk_prompts = chunk_prompts
        self._engine_or_factory = engine
        self._engine: RolloutEngine | None = engine if hasattr(engine, "generate") else None  # type: ignore[assignment]
        self.tokenizer = tokenizer
        self.verifier = verifier
        self.prompt_template = prompt_template
        self._prompt_cache: dict[str, list[int]] = {}
        self._said_chunks_differ = False

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
        """Generate ``num_samples`` answers per problem from the synced weights and verify them.

        In chunks (``chunk_prompts``), each chunk is verified in a background thread while the next generates.
        An engine that seeds per prompt (``seeds_per_prompt``: vLLM) is told each chunk's offset in the request
        (``SamplingParams.first_prompt``), so the samples are those of one call whatever the chunking. Others
        (HF ``generate``: one random stream per call) get chunk c's seed ``derive_seed(seed, c)``: chunking then
        draws other samples from the same distribution, which the run's log says once.
        """
        prompts = [self.encode(p.question) for p in problems]
        size = self.chunk_prompts or max(len(prompts), 1)
        starts = list(range(0, len(prompts), size))
        gen_seconds = 0.0
        pending: list[tuple[Any, Future[tuple[list[float], float]]]] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nft-lit-verify") as verify_thread:
            per_prompt = getattr(self.engine, "seeds_per_prompt", False)
            if len(starts) > 1 and sampling.seed is not None and not per_prompt and not self._said_chunks_differ:
                self._said_chunks_differ = True
                log.warning(
                    "sampler.chunk_prompts=%d: %s seeds each call, so chunked rollouts draw other samples (from "
                    "the same distribution) than unchunked ones; an engine seeding per prompt (vLLM) does not",
                    size,
                    type(self.engine).__name__,
                )
            for c, start in enumerate(starts):
                chunk_sampling = sampling
                if len(starts) > 1 and sampling.seed is not None:
                    chunk_sampling = (
                        replace(sampling, first_prompt=sampling.first_prompt + start)
                        if per_prompt
                        else replace(sampling, seed=derive_seed(sampling.seed, c))
                    )
                t0 = time.perf_counter()
                rollout = self.engine.generate(prompts[start : start + size], num_samples, chunk_sampling)
                gen_seconds += time.perf_counter() - t0
                golds = [p.answer for p in problems[start : start + size] for _ in range(num_samples)]
                pending.append((rollout, verify_thread.submit(self._score, rollout, golds)))
            waited = time.perf_counter()
            scored = [(rollout, future.result()) for rollout, future in pending]
            verify_wait = time.perf_counter() - waited
        return ScoredAnswers(
            prompt_ids=prompts,
            response_ids=[list(r) for rollout, _ in scored for r in rollout.response_ids],
            engine_logprobs=[list(lp) for rollout, _ in scored for lp in rollout.logprobs],
            truncated=[bool(t) for rollout, _ in scored for t in rollout.truncated],
            correct=[r for _, (rewards, _) in scored for r in rewards],
            num_samples=num_samples,
            gen_seconds=gen_seconds,
            verify_seconds=sum(seconds for _, (_, seconds) in scored),
            verify_wait_seconds=verify_wait,
        )

    def _score(self, rollout: Any, golds: list[str]) -> tuple[list[float], float]:
        """Decode and verify one chunk: (rewards, seconds). Runs in the verification thread."""
        t0 = time.perf_counter()
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rollout.response_ids]
        result = self.verifier.score(texts, golds, list(rollout.truncated))
        return [float(r) for r in result.rewards], time.perf_counter() - t0
