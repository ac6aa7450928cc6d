"""SFT warm-up of the demo's base policy, stopped by a measured pass rate, cached as an HF folder.

Why a warm-up: a random-init model never samples a correct answer, so every group is all-negative and
no algorithm in the paper gets a gradient (NFT, RFT and DAPO filter such groups; GRPO's advantages are 0).
Why stop by measurement: SFT on this task plateaus and then jumps within a few dozen steps
(/work/shared/DEMO_FACTS.md), so a step count cannot place the base inside the pass-rate band where RL
has mixed groups (the paper's r̂_q ∈ (0, 1), Sec. 4).

The warm-up uses labels of an EASIER distribution (``sft_task``, e.g. at most one carry); the pass rate is
measured, by sampling at temperature 1 as RL does, on the training split of the HARDER distribution RL
then trains on without labels (``rl_task``). The folder is keyed by the whole config: the demo and every
compare/ablation run start from the same base, and re-running reuses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from nft_lit.data import Problem
from nft_lit.models import build_char_tokenizer, save_hf_folder, tiny_causal_lm
from nft_lit.prompts import encode_prompt
from nft_lit.reward import ExactMatchVerifier
from nft_lit.rollout import HFGenerateEngine, SamplingParams
from nft_lit.sampler import Sampler
from nft_lit.synthetic import ALPHABET, ArithmeticTask, sample_problems

_META = "warmup.json"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    """Tiny Llama of DEMO_FACTS.md: 0.8M parameters, head size 32 (vLLM needs >= 32)."""

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 512


@dataclass(frozen=True)
class WarmupConfig:
    """Everything that determines the base policy (and so its cache key).

    Attributes:
        sft_task / rl_task: keyword arguments of :class:`~nft_lit.synthetic.ArithmeticTask`.
        target_pass_rate: stop at the first evaluation whose sampled pass rate on ``rl_task`` reaches it.
        max_pass_rate: an evaluation above it means the band was overshot: an error, not a silent base.
        eval_size: ``rl_task`` training-split problems sampled once each at temperature 1 per evaluation.
    """

    name: str = "demo"
    sft_task: dict = field(default_factory=lambda: {"digits": 3, "operation": "+", "max_carries": 1})
    rl_task: dict = field(default_factory=lambda: {"digits": 3, "operation": "+"})
    model: ModelShape = field(default_factory=ModelShape)
    seed: int = 0
    lr: float = 1e-3
    batch_size: int = 128
    train_size: int = 50_000
    max_steps: int = 4000
    eval_every: int = 25
    eval_size: int = 256
    target_pass_rate: float = 0.3
    max_pass_rate: float = 0.7
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.target_pass_rate <= self.max_pass_rate <= 1.0:
            raise ValueError(
                "WarmupConfig: need 0 < target_pass_rate <= max_pass_rate <= 1, got "
                f"{self.target_pass_rate} and {self.max_pass_rate}"
            )
        for name in ("lr", "batch_size", "train_size", "max_steps", "eval_every", "eval_size", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"WarmupConfig.{name} must be > 0, got {getattr(self, name)}")
        ArithmeticTask(**self.sft_task)
        ArithmeticTask(**self.rl_task)

    def key(self) -> str:
        blob = json.dumps({"version": _FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class WarmupResult:
    path: Path
    steps: int
    pass_rate: float
    greedy_pass_rate: float
    seconds: float
    reused: bool
    history: list[dict[str, float]]


def default_cache_dir() -> Path:
    return Path(os.environ.get("NFT_LIT_CACHE", ".cache/nft-lit")) / "warmup"


def _encode(tokenizer: PreTrainedTokenizerFast, problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing batch: prompt + answer + EOS, loss on the answer and EOS only (right-padded)."""
    rows, labels = [], []
    for p in problems:
        prompt = encode_prompt(p.question, None, tokenizer)
        answer = [*tokenizer.encode(p.answer, add_special_tokens=False), tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, lab


def pass_rate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[Problem],
    *,
    greedy: bool,
    max_new_tokens: int,
    seed: int,
) -> float:
    """Fraction of ``problems`` answered exactly, one answer each, through the RL loop's own engine and
    verifier (a truncated answer is negative)."""
    # A fixed batch: the warm-up stops at a measured pass rate, and the samples drawn depend on how the
    # answers are batched, so the engine's automatic choice must not move the demo's base.
    engine = HFGenerateEngine(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, batch_size=64)
    sampler = Sampler(engine, tokenizer, ExactMatchVerifier())
    sampler.sync(model)
    sampling = SamplingParams(temperature=0.0 if greedy else 1.0, max_new_tokens=max_new_tokens, seed=seed)
    return sum(sampler.sample(problems, 1, sampling).correct) / len(problems)


def _cached(config: WarmupConfig, folder: Path) -> WarmupResult | None:
    """The result stored in ``folder`` by an earlier warm-up of this very config, if there is one."""
    meta_path = folder / _META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == config.key():
            return WarmupResult(path=folder, reused=True, **meta["result"])
    return None


def _base_model(config: WarmupConfig, vocab_size: int) -> PreTrainedModel:
    """The random-init tiny Llama of ``config.model`` the warm-up trains."""
    return tiny_causal_lm(
        arch="llama",
        vocab_size=vocab_size,
        hidden_size=config.model.hidden_size,
        num_layers=config.model.num_layers,
        num_heads=config.model.num_heads,
        intermediate_size=config.model.intermediate_size,
        seed=config.seed,
    )


def _sft_step(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    optimizer: torch.optim.Optimizer,
    problems: list[Problem],
) -> torch.Tensor:
    """One teacher-forcing step on ``problems``; returns its loss."""
    model.train()
    ids, labels = _encode(tokenizer, problems)
    loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def _save(folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, meta: dict) -> None:
    """Write the HF folder and ``warmup.json`` beside ``folder``, then swap them in, so an interrupted warm-up
    never leaves a folder that looks complete."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_folder(model, tokenizer, tmp)
    (tmp / _META).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def warmup(
    config: WarmupConfig, cache_dir: Path | None = None, *, force: bool = False, verbose: bool = False
) -> WarmupResult:
    """Train (or reuse) the base policy for ``config``; returns its HF folder and measured pass rates."""
    folder = (cache_dir or default_cache_dir()) / config.name
    cached = None if force else _cached(config, folder)
    if cached is not None:
        return cached

    start = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = build_char_tokenizer(ALPHABET)
    model = _base_model(config, len(tokenizer))
    train = sample_problems(ArithmeticTask(**config.sft_task), "train", config.train_size, config.seed)
    # The stop rule is measured on RL's own training distribution (its prompts, not its labels' use).
    probe = sample_problems(ArithmeticTask(**config.rl_task), "train", config.eval_size, config.seed + 10_000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    history: list[dict[str, float]] = []
    rate = greedy_rate = 0.0
    for step in range(1, config.max_steps + 1):
        loss = _sft_step(model, tokenizer, optimizer, rng.sample(train, config.batch_size))
        if step % config.eval_every:
            continue
        kw = {"max_new_tokens": config.max_new_tokens, "seed": config.seed + step}
        rate = pass_rate(model, tokenizer, probe, greedy=False, **kw)
        greedy_rate = pass_rate(model, tokenizer, probe, greedy=True, **kw)
        history.append({"step": step, "loss": loss.item(), "pass_rate": rate, "greedy_pass_rate": greedy_rate})
        if rate > config.max_pass_rate:
            raise RuntimeError(
                f"warm-up {config.name!r}: pass rate {rate:.3f} at step {step} overshot max_pass_rate "
                f"{config.max_pass_rate}; lower lr or eval_every, or use an easier sft_task"
            )
        if verbose:
            print("warm-up", ", ".join(f"{k} {v:.4g}" for k, v in history[-1].items()), flush=True)
        if rate >= config.target_pass_rate:
            break
    else:
        raise RuntimeError(
            f"warm-up {config.name!r}: pass rate {rate:.3f} after max_steps={config.max_steps} is below "
            f"target_pass_rate={config.target_pass_rate}; raise max_steps or lr, or widen sft_task"
        )

    result = {
        "steps": step,
        "pass_rate": rate,
        "greedy_pass_rate": greedy_rate,
        "seconds": time.perf_counter() - start,
        "history": history,
    }
    _save(folder, model, tokenizer, {"key": config.key(), "config": asdict(config), "result": result})
    return WarmupResult(path=folder, reused=False, **result)


def warmup_command(argv: list[str]) -> int:
    """`nft-lit warmup [--name demo] [--sft-task JSON] [--rl-task JSON] [--lr ...]`: prints the folder."""
    defaults = WarmupConfig()
    parser = argparse.ArgumentParser(prog="nft-lit warmup", description=__doc__.splitlines()[0])
    for f in dataclasses.fields(WarmupConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, dict):
            parser.add_argument(flag, type=json.loads, default=value, help=f"JSON object (default {value})")
        elif isinstance(value, ModelShape):
            parser.add_argument(flag, type=json.loads, default=asdict(value), help="JSON object of ModelShape")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"(default {value})")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"(default {default_cache_dir()})")
    parser.add_argument("--force", action="store_true", help="retrain even if a matching folder exists")
    args = vars(parser.parse_args(argv))
    cache_dir, force = args.pop("cache_dir"), args.pop("force")
    args["model"] = ModelShape(**args["model"])
    result = warmup(WarmupConfig(**args), cache_dir, force=force, verbose=True)
    how = "reused" if result.reused else f"trained in {result.seconds:.0f} s"
    print(
        f"warm-up {how}: {result.steps} steps, pass rate on RL task {result.pass_rate:.3f} (T=1), "
        f"{result.greedy_pass_rate:.3f} (greedy)"
    )
    print(result.path)
    return 0
