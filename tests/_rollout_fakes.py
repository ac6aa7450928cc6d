"""Test doubles for the rollout side (a seeded random-token engine, a parity verifier) and the helpers the
rollout, module and CLI tests share (Hydra overrides, logged metric names, the trainer's log-prob recompute).

They implement the ``RolloutEngine`` / ``Verifier`` protocols (docs/ARCHITECTURE.md) with outputs that depend
only on (prompt, answer index, seed), never on the rank or batch layout, so distributed and resumed runs can
be compared exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from nft_lit.reward import VerifyResult

# Hydra overrides that swap the smoke run's data and verifier for these fakes: mixed groups (so real updates)
# from a random-init model.
PARITY_OVERRIDES = [
    "~data.problems",
    "+data.problems={_target_: _rollout_fakes.addition_problems, size: 60}",
    "~eval.heldout",
    "+eval.heldout={_target_: _rollout_fakes.addition_problems, size: 4, seed: 1}",
    "reward.verifier._target_=_rollout_fakes.ParityVerifier",
]

# What every training iteration logs, whatever runs it (Trainer.fit in-process or `nft-lit fit`).
# Every phase of an iteration logs its seconds (docs/PERFORMANCE.md); seconds/eval comes with each evaluation.
PHASES = (
    "sync",
    "generate",
    "verify",
    "verify_wait",
    "filter",
    "plan",
    "old_logprobs",
    "rollout",
    "train",
    "iteration",
)
ITERATION_METRICS = (
    "train/loss",
    "train/entropy",
    "train/grad_norm",
    "train/lr",
    "rollout/pass_rate",
    "rollout/kept_group_fraction",
    "rollout/gen_rounds",
    "rollout/response_length_mean",
    "rollout/response_length_max",
    "rollout/truncation_rate",
    "rollout/logprob_gap",
    "rollout/gen_tokens_per_second",
    "rollout/verify_answers_per_second",
    "rollout/padding_fraction",
    "train/tokens_per_second",
    *(f"seconds/{phase}" for phase in PHASES),
)


@dataclass
class FakeSampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 6
    seed: int | None = None
    first_prompt: int = 0


@dataclass
class FakeRollout:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    truncated: list[bool]
    num_samples: int


@dataclass
class FakeEngine:
    """Answer j of a prompt: 1..max_new_tokens random digits then EOS, seeded by (prompt, j, iteration seed)."""

    vocab: list[int]
    eos: int
    syncs: int = 0
    seeds: list[int | None] = field(default_factory=list)

    def sync_weights(self, model: object) -> dict[str, float]:
        self.syncs += 1
        return {"sync/seconds": 0.0}

    def generate(self, prompt_ids: list[list[int]], num_samples: int, sampling: FakeSampling) -> FakeRollout:
        self.seeds.append(sampling.seed)
        responses, logprobs, truncated = [], [], []
        for p in prompt_ids:
            for j in range(num_samples):
                key = hashlib.sha256(repr((p, j, sampling.seed is None)).encode()).digest()
                g = torch.Generator().manual_seed(int.from_bytes(key[:6], "big"))
                n = int(torch.randint(1, sampling.max_new_tokens + 1, (1,), generator=g))
                toks = [self.vocab[int(i)] for i in torch.randint(len(self.vocab), (n,), generator=g)]
                cut = n == sampling.max_new_tokens
                if not cut:
                    toks.append(self.eos)
                responses.append(toks)
                logprobs.append([-1.0] * len(toks))
                truncated.append(cut)
        return FakeRollout([list(p) for p in prompt_ids], responses, logprobs, truncated, num_samples)


class ParityVerifier:
    """Reward 1 when the response has an odd number of characters (a coin flip independent of the gold)."""

    def score(self, responses: list[str], golds: list[str], truncated: list[bool]) -> VerifyResult:
        rewards = [0.0 if cut else float(len(r) % 2 == 1) for r, cut in zip(responses, truncated, strict=True)]
        return VerifyResult(rewards, {"seconds": 0.0})


class GoldParityVerifier:
    """Reward 1 when the response length plus the gold's last digit is odd, truncated or not: a score inside
    (0, 1) even from a random-init model whose answers are all alike (for comparing evaluation paths)."""

    def score(self, responses: list[str], golds: list[str], truncated: list[bool]) -> VerifyResult:
        rewards = [float((len(r) + int(g[-1])) % 2 == 1) for r, g in zip(responses, golds, strict=True)]
        return VerifyResult(rewards, {"seconds": 0.0})


@dataclass(frozen=True)
class FakeProblem:
    id: str
    question: str
    answer: str
    source: str = "test"


def addition_problems(size: int = 60, seed: int = 0) -> list[FakeProblem]:
    """1-digit additions as plain records (the synthetic module builds the real task)."""
    import random

    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    return [FakeProblem(f"add/{i}", f"{a}+{b}=", str(a + b)) for i, (a, b) in enumerate(pairs[:size])]


def make_sampler(**overrides):
    """A Sampler with the fake engine and parity verifier over the 1-digit addition alphabet."""
    from nft_lit.models import build_char_tokenizer
    from nft_lit.sampler import Sampler

    tok = build_char_tokenizer("0123456789+=")
    engine = FakeEngine([tok.convert_tokens_to_ids(c) for c in "0123456789"], tok.eos_token_id)
    kwargs = dict(engine=engine, tokenizer=tok, verifier=ParityVerifier(), prompt_template=None)
    kwargs.update(overrides)
    return Sampler(**kwargs)


def make_datamodule(**overrides):
    """A RolloutDataModule over 40 problems with the fake engine and parity verifier."""
    from nft_lit.datamodule import RolloutDataModule

    kwargs = dict(
        problems=addition_problems(40),
        sampler=make_sampler(),
        sampling=FakeSampling(),
        prompts_per_step=4,
        num_answers=4,
        num_mini_batches=2,
        micro_batch_size=3,
        seed=1,
        max_logprob_gap=None,  # the fake engine's constant log-probs are no policy's: only log the gap
    )
    kwargs.update(overrides)
    return RolloutDataModule(**kwargs)


def recompute_logprobs(model, prompts, batch, temperature: float) -> list[torch.Tensor]:
    """What the trainer computes for a RolloutBatch: one unpadded teacher-forced forward per answer."""
    out = []
    with torch.no_grad():
        for n, response in enumerate(batch.response_ids):
            prompt = prompts[n // batch.num_samples]
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
            lp = (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]
            out.append(lp)
    return out


def padded_logprobs(batch, model, prompts, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(engine, trainer, mask) log-prob tensors [N, T]: what the training loop feeds to logprob_gap."""
    trainer = recompute_logprobs(model, prompts, batch, temperature)
    width = max(len(r) for r in batch.response_ids)
    eng, ref, mask = (torch.zeros(len(trainer), width) for _ in range(3))
    for n, (lp, r) in enumerate(zip(batch.logprobs, trainer, strict=True)):
        eng[n, : len(lp)], ref[n, : len(r)], mask[n, : len(r)] = torch.tensor(lp), r, 1
    return eng, ref, mask
