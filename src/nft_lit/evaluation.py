"""Benchmark evaluation: avg@k and pass@k as torchmetrics, per benchmark and averaged.

The paper reports avg@32 on AIME24/AIME25/AMC23 and avg@1 on MATH500/Olympiad/Minerva, sampling with top-p
0.7 at temperature 1.0 (7B) or 0.6 (32B). ``avg@k`` is the mean correctness of k samples per problem;
``pass@k`` is the unbiased estimator 1 − C(n−c, k)/C(n, k) from n ≥ k samples with c correct (Chen et al.,
2021). Problems are sharded over ranks and the metrics' states are summed across them.
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
from nft_lit.rollout import SamplingParams
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


def write_results(results: dict[str, float], path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the results (and run facts such as the checkpoint) as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, **(extra or {})}, indent=2, sort_keys=True) + "\n")
    return path
