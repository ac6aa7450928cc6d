"""Benchmark evaluation: avg@k and pass@k as torchmetrics, per benchmark and averaged.

The paper reports avg@32 on AIME24/AIME25/AMC23 and avg@1 on MATH500/Olympiad/Minerva, sampling with top-p
0.7 at temperature 1.0 (7B) or 0.6 (32B). ``avg@k`` is the mean correctness of k samples per problem;
``pass@k`` is the unbiased estimator 1 − C(n−c, k)/C(n, k) from n ≥ k samples with c correct (Chen et al.,
2021). Problems are sharded over ranks and the metrics' states are summed across them.

``ProbeEntropy`` measures the policy's uncertainty apart from what it samples: the mean per-token entropy of
its next-token distribution over a fixed set of teacher-forced answers (the same at every evaluation).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from tqdm.auto import tqdm

from nft_lit.data import Problem, ProblemSet
from nft_lit.distributed import all_gather_objects, shard_batches
from nft_lit.prompts import PromptTemplate, encode_prompt
from nft_lit.rollout import SamplingParams, pad_left, pad_right
from nft_lit.sampler import Sampler, ScoredAnswers


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k) / C(n, k)."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= n samples, got k={k}, n={num_samples}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def _metric_device() -> torch.device:
    """Where metric states must live so that ``Metric.compute()`` can all-gather them: NCCL (any GPU run
    under a distributed strategy, even on one device) moves only CUDA tensors."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _MeanOverProblems(Metric):
    """A per-problem score averaged over problems; ``compute()`` sums the states over ranks first."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("problems", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.to(_metric_device())

    def _score_sum(self, correct: Tensor) -> float:
        """Sum over problems of the per-problem score; ``correct`` [P, n] as in ``update``."""
        raise NotImplementedError

    def update(self, correct: Tensor) -> None:
        """correct: [P, n] 0/1 of n samples for each of P problems."""
        if correct.dim() != 2:
            name = type(self).__name__
            raise ValueError(f"{name}.update: correct must be [problems, samples], got {tuple(correct.shape)}")
        self.total += self._score_sum(correct)
        self.problems += correct.shape[0]

    def compute(self) -> Tensor:
        return (self.total / self.problems.clamp(min=1)).float()


class AvgAtK(_MeanOverProblems):
    """Mean correctness over all samples of all problems (the paper's avg@k with k samples per problem)."""

    def _score_sum(self, correct: Tensor) -> float:
        return float(correct.double().mean(-1).sum())


class PassAtK(_MeanOverProblems):
    """Unbiased pass@k averaged over problems; needs at least k samples per problem."""

    def __init__(self, k: int, **kwargs: Any) -> None:
        if k < 1:
            raise ValueError(f"PassAtK: k must be >= 1, got {k}")
        super().__init__(**kwargs)
        self.k = k

    def _score_sum(self, correct: Tensor) -> float:
        n = correct.shape[1]
        return sum(pass_at_k(n, int(c), self.k) for c in correct.sum(-1).tolist())


@dataclass
class Benchmark:
    """A problem set with its evaluation protocol.

    Args:
        name: key of the logged metrics (``val/<name>/avg@k``).
        problems: the problems.
        sampling: sampling parameters (paper: top-p 0.7, temperature 1.0 or 0.6); ``temperature=0`` is greedy.
        num_samples: samples per problem (k of avg@k; the paper: 32 for AIME/AMC, 1 elsewhere).
        pass_k: the k values of pass@k to report (each <= num_samples).
    """

    name: str
    problems: ProblemSet | Sequence[Problem]
    sampling: SamplingParams
    num_samples: int = 1
    pass_k: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"benchmark {self.name}: num_samples must be >= 1, got {self.num_samples}")
        for k in self.pass_k:
            if not 1 <= k <= self.num_samples:
                raise ValueError(
                    f"benchmark {self.name}: pass_k value {k} must be in [1, num_samples={self.num_samples}]"
                )
        if len(self.problems) == 0:
            raise ValueError(f"benchmark {self.name}: the problem set is empty")


def evaluate_benchmark(
    benchmark: Benchmark,
    sampler: Sampler,
    batch_prompts: int = 64,
    record: list[dict[str, Any]] | None = None,
    show_progress: bool = False,
) -> dict[str, float]:
    """avg@k and pass@k of ``benchmark`` (all ranks summed), with its seconds and answer tokens.

    The one evaluation path: the in-training held-out curve, Lightning's validation loop (``nft-lit cli
    validate``) and ``nft-lit validate`` all come here. The sampler's engine must already hold the weights
    to evaluate (``Sampler.sync``). Every rank must call this (collectives); each samples its own shard.
    ``record`` receives one dict per graded answer of this rank (problem, answer text, correctness).
    """
    k = benchmark.num_samples
    avg = AvgAtK()
    passes = {j: PassAtK(j) for j in benchmark.pass_k}
    t0 = time.perf_counter()
    tokens = 0
    chunks = shard_batches(benchmark.problems, batch_prompts)
    if show_progress:
        chunks = tqdm(chunks, desc=f"{benchmark.name} ({len(benchmark.problems)} problems x {k})", unit="batch")
    for chunk, real in chunks:
        answers = sampler.sample(chunk, k, benchmark.sampling)
        if real:
            correct = torch.tensor(answers.correct, dtype=torch.float32).view(len(chunk), k)[:real]
            for metric in (avg, *passes.values()):
                metric.update(correct)
            tokens += answers.num_tokens
            if record is not None:
                record.extend(_graded_answers(benchmark.name, chunk[:real], answers, sampler))
    # Metric.compute() sums the states over ranks when torch.distributed is initialised.
    results = {f"avg@{k}": float(avg.compute())}
    results.update({f"pass@{j}": float(m.compute()) for j, m in passes.items()})
    results["seconds"] = time.perf_counter() - t0
    results["tokens"] = float(tokens)
    return results


def _graded_answers(name: str, problems: Sequence[Any], answers: ScoredAnswers, sampler: Sampler) -> list[dict]:
    k = answers.num_samples
    return [
        {
            "benchmark": name,
            "id": getattr(p, "id", None),
            "question": p.question,
            "gold": p.answer,
            "sample": j,
            "response": sampler.tokenizer.decode(answers.response_ids[i * k + j], skip_special_tokens=True),
            "truncated": answers.truncated[i * k + j],
            "correct": answers.correct[i * k + j],
        }
        for i, p in enumerate(problems)
        for j in range(k)
    ]


@dataclass
class Evaluation:
    """Benchmarks and the sampler that evaluates a policy on them: ``run(policy)`` is the whole evaluation.

    Built once per run (``nft-lit fit`` / ``validate``, or the DataModule's ``val_benchmarks`` under
    LightningCLI) and shared with the training rollouts through the same ``Sampler``.
    """

    benchmarks: Sequence[Benchmark]
    sampler: Sampler
    batch_prompts: int = 64
    show_progress: bool = False
    record_answers: bool = False
    answers: list[dict[str, Any]] = field(default_factory=list)  # every graded answer of the last run (all ranks)

    def __post_init__(self) -> None:
        if not self.benchmarks:
            raise ValueError("Evaluation: no benchmark to evaluate")
        if self.batch_prompts < 1:
            raise ValueError(f"eval.batch_prompts must be >= 1, got {self.batch_prompts}")

    def run(self, policy: nn.Module) -> dict[str, float]:
        """Flat ``{"<bench>/avg@k": ..., "average/avg": ...}``; the average is over benchmarks' avg@k."""
        self.sampler.sync(policy)
        out: dict[str, float] = {}
        headline = []
        mine: list[dict[str, Any]] | None = [] if self.record_answers else None
        for b in self.benchmarks:
            res = evaluate_benchmark(b, self.sampler, self.batch_prompts, mine, self.show_progress)
            out.update({f"{b.name}/{key}": value for key, value in res.items()})
            headline.append(res[f"avg@{b.num_samples}"])
        out["average/avg"] = sum(headline) / len(headline)
        if mine is not None:
            self.answers = [a for part in all_gather_objects(mine) for a in part]
        return out


@dataclass(frozen=True)
class ProbeEntropyResult:
    """One measurement of ``ProbeEntropy``: the token mean (the headline), the mean over sequences of each
    sequence's token mean, the counts it averaged over and its seconds."""

    token_mean: float
    sequence_mean: float
    tokens: int
    sequences: int
    seconds: float


class ProbeEntropy:
    """The policy's mean per-token entropy on a fixed probe: teacher-forced, no sampling.

    The sampled-answer entropy (``train/entropy``) moves with what the policy samples (shorter answers, fewer
    high-entropy tokens) whatever its uncertainty; this measure holds the text fixed. The probe is the same
    prompts and the same answers at every evaluation, for every run and seed: the ``problems`` given (the
    front end passes the first ``eval.probe_size`` problems of the held-out set) with their **gold answers**
    as the answer text. Each sequence is the prompt, encoded exactly as the sampler encodes it
    (``encode_prompt`` with the run's prompt template and tokenizer), followed by the answer tokens
    ``tokenizer.encode(gold, add_special_tokens=False) + [eos_token_id]`` (the EOS left out when the tokenizer
    has none), the encoding the demo's SFT warm-up trains on. At every answer position t (the positions whose
    next-token distribution predicts answer token t, the EOS included) it takes

        H_t = −Σ_v p_v log p_v,   p = softmax(logits_t / T)

    in float32, with T the training temperature (the log-prob convention ``log_softmax(logits / T)``), and
    ``run`` returns the mean of H_t over all answer tokens of the probe (token mean); ``measure`` also gives
    the mean over sequences of each sequence's token mean.

    One forward per batch of ``batch_size`` sequences (fixed batches in probe order, so the padding, and the
    number, is the same every time), in eval mode under ``no_grad``, the mode restored after: it draws no
    random number and changes no weight, so it cannot change training. Every rank computes the whole probe on
    its model (no collective of its own): an FSDP2-sharded model all-gathers its parameters in each forward,
    so every rank must run the same forwards, and they do; every rank gets the same number.
    """

    def __init__(
        self,
        problems: Sequence[Any],
        tokenizer: Any,
        prompt_template: PromptTemplate | None = None,
        temperature: float = 1.0,
        batch_size: int = 64,
    ) -> None:
        if len(problems) == 0:
            raise ValueError("ProbeEntropy: the probe has no problem (eval.probe_size)")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"ProbeEntropy: temperature must be > 0 (logits / T), got {temperature!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"eval.probe_batch_size must be an integer >= 1, got {batch_size!r}")
        self.temperature = float(temperature)
        self.batch_size = batch_size
        eos = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else eos if eos is not None else 0)
        self.prompt_ids = [encode_prompt(p.question, prompt_template, tokenizer) for p in problems]
        self.answer_ids = [
            [*tokenizer.encode(p.answer, add_special_tokens=False), *([eos] if eos is not None else [])]
            for p in problems
        ]
        for p, prompt, answer in zip(problems, self.prompt_ids, self.answer_ids, strict=True):
            if not prompt or not answer:
                raise ValueError(
                    f"ProbeEntropy: problem {getattr(p, 'id', p.question)!r} has an empty prompt or answer"
                )

    @classmethod
    def from_sampler(
        cls, sampler: Sampler, problems: Sequence[Any], temperature: float, batch_size: int = 64
    ) -> ProbeEntropy:
        """The probe of ``problems`` encoded as ``sampler`` encodes prompts (its tokenizer and template)."""
        return cls(problems, sampler.tokenizer, sampler.prompt_template, temperature, batch_size)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def run(self, model: nn.Module) -> float:
        """The headline: the mean next-token entropy over every answer token of the probe (nats)."""
        return self.measure(model).token_mean

    def measure(self, model: nn.Module) -> ProbeEntropyResult:
        """Token mean and sequence mean of the probe's answer-position entropies under ``model``."""
        started = time.perf_counter()
        device = next(model.parameters()).device
        total, tokens, per_sequence = 0.0, 0, []
        was_training = model.training
        model.eval()  # dropout would draw random numbers and blur the measure
        try:
            with torch.no_grad():
                for start in range(0, len(self), self.batch_size):
                    end = start + self.batch_size
                    entropy, mask = self._batch(model, self.prompt_ids[start:end], self.answer_ids[start:end], device)
                    total += float(entropy.sum(dtype=torch.float64))
                    tokens += int(mask.sum())
                    per_sequence += (entropy.sum(-1, dtype=torch.float64) / mask.sum(-1)).tolist()
        finally:
            model.train(was_training)
        return ProbeEntropyResult(
            token_mean=total / tokens,
            sequence_mean=math.fsum(per_sequence) / len(per_sequence),
            tokens=tokens,
            sequences=len(per_sequence),
            seconds=time.perf_counter() - started,
        )

    def _batch(
        self, model: nn.Module, prompts: list[list[int]], answers: list[list[int]], device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Entropies [B, A] (zero at padding) and the answer mask [B, A] of one batch: left-padded prompts,
        right-padded answers, positions from the mask, as the training forward builds them."""
        prompt_ids, prompt_mask = pad_left(prompts, self.pad_id)
        answer_ids = pad_right(answers, self.pad_id, torch.long)
        answer_mask = pad_right([[1] * len(a) for a in answers], 0, torch.long)
        input_ids = torch.cat([prompt_ids, answer_ids], 1).to(device)
        attention_mask = torch.cat([prompt_mask, answer_mask], 1).to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        keep = answer_ids.shape[1] + 1  # logits at t predict token t + 1: the answer's from column P - 1 on
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep
        ).logits
        logp = torch.log_softmax(logits[:, -keep:-1].float() / self.temperature, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1).cpu()
        return torch.where(answer_mask.bool(), entropy, 0.0), answer_mask


def write_results(results: dict[str, float], path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the results (and run facts such as the checkpoint) as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, **(extra or {})}, indent=2, sort_keys=True) + "\n")
    return path
