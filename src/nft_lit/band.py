"""In-band question selection: keep the questions a base policy sometimes, but not always, answers right.

Online RL with group-relative losses (NFT, RFT, GRPO, ...) learns only from mixed groups (0 < r̂ < 1 over
the K answers of a question). A real pretrained model on a shipped data set is mostly out of that band (all
wrong on hard questions, all right on easy ones), so a run spends its rollouts on groups it throws away.
This stage measures the base policy's sampled pass rate r̂ per question and keeps the in-band ones:

1. ``screen``: sample K answers per question with a ``Sampler`` (the training engine, prompt and verifier)
   and count the correct ones;
2. ``assign_part``: split the in-band questions into ``train`` and ``heldout`` by a seeded hash of the
   question id (deterministic, disjoint, independent of screening order and of the other questions);
3. ``write_selection``: ``screen.jsonl`` (every screened question with its r̂), ``selection.jsonl`` (the
   in-band ones with their part) and ``summary.json`` (pass rates of the whole screen and of the
   selection, r̂ histogram, in-band fraction, settings, seconds);
4. a data config loads only the selected ids of one part with ``nft_lit.selection.selected_problems``.

Command line (no Hydra; see ``python -m nft_lit.band --help``)::

    python -m nft_lit.band --data gsm8k --split train --questions 64 --samples 4 --max-new-tokens 320

Note the selection effect: r̂ of a selected question is conditioned on 0 < r̂ < 1, so re-sampling the
selection gives a pass rate pulled towards the whole screen's. The first training iteration's
``rollout/pass_rate`` and the held-out avg@k at iteration 0 are the unbiased re-measurements.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nft_lit.data import Problem
from nft_lit.selection import _REPO_ROOT, PARTS, SELECTION_FILE, SUMMARY_FILE, SelectionError

__all__ = [
    "PARTS",
    "QuestionRate",
    "assign_part",
    "in_band",
    "main",
    "screen",
    "select",
    "summarize",
    "write_selection",
]

SCREEN_FILE = "screen.jsonl"
_HASH_BUCKETS = 2**64


@dataclass(frozen=True)
class QuestionRate:
    """``correct`` of ``samples`` sampled answers to question ``id`` were right (r̂ = correct / samples)."""

    id: str
    correct: int
    samples: int
    truncated: int = 0  # answers cut at max_new_tokens (scored wrong)
    tokens: int = 0  # response tokens of the K answers

    def __post_init__(self) -> None:
        if self.samples < 1 or not 0 <= self.correct <= self.samples:
            raise ValueError(f"QuestionRate {self.id!r}: need 0 <= correct <= samples >= 1, got {self}")

    @property
    def r_hat(self) -> float:
        return self.correct / self.samples


def in_band(rate: QuestionRate) -> bool:
    """Mixed group: at least one right and one wrong answer (0 < r̂ < 1)."""
    return 0 < rate.correct < rate.samples


def assign_part(question_id: str, seed: int, heldout_fraction: float) -> str:
    """``"heldout"`` iff a seeded hash of the id falls below ``heldout_fraction``, else ``"train"``.

    Depends only on (id, seed, fraction): a question lands in the same part whatever else was screened,
    so two screens of overlapping questions never put one question in both parts.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    digest = hashlib.blake2b(f"{seed}\x00{question_id}".encode(), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "big") < heldout_fraction * _HASH_BUCKETS else "train"


def screen(
    problems: Sequence[Problem],
    sampler: Any,
    sampling: Any,
    num_samples: int,
    policy: Any | None = None,
    batch_prompts: int = 16,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[QuestionRate]:
    """Sample ``num_samples`` answers to each problem with ``sampler`` and count the correct ones.

    Args:
        problems: records with ``id``, ``question`` and ``answer`` (ids must be unique).
        sampler: a ``nft_lit.sampler.Sampler`` (engine + tokenizer + prompt template + verifier).
        sampling: ``nft_lit.rollout.SamplingParams`` of the screen (temperature 1.0 to match training).
        num_samples: K, answers per question.
        policy: the model the engine samples from, synced first (``Sampler.sync``); None for an engine that
            already holds the weights to screen (e.g. a vLLM engine started from the model folder).
        batch_prompts: problems per ``Sampler.sample`` call (progress granularity; the engine batches inside).
        progress: called after each batch with (problems done, total, seconds so far).
    """
    if num_samples < 1:
        raise ValueError(f"screen: num_samples (K) must be >= 1, got {num_samples}")
    if batch_prompts < 1:
        raise ValueError(f"screen: batch_prompts must be >= 1, got {batch_prompts}")
    ids = [str(p.id) for p in problems]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"screen: problem ids must be unique, repeated: {duplicates[:10]}")
    if policy is not None:
        sampler.sync(policy)
    rates: list[QuestionRate] = []
    t0 = time.perf_counter()
    for start in range(0, len(problems), batch_prompts):
        chunk = list(problems[start : start + batch_prompts])
        answers = sampler.sample(chunk, num_samples, sampling)
        if len(answers.correct) != len(chunk) * num_samples:
            raise RuntimeError(
                f"screen: the sampler returned {len(answers.correct)} scores for {len(chunk)} problems x "
                f"{num_samples} samples"
            )
        for i, problem in enumerate(chunk):
            rows = slice(i * num_samples, (i + 1) * num_samples)
            rates.append(
                QuestionRate(
                    str(problem.id),
                    correct=sum(1 for s in answers.correct[rows] if s > 0.5),
                    samples=num_samples,
                    truncated=sum(1 for t in answers.truncated[rows] if t),
                    tokens=sum(len(r) for r in answers.response_ids[rows]),
                )
            )
        if progress is not None:
            progress(len(rates), len(problems), time.perf_counter() - t0)
    return rates


def select(rates: Sequence[QuestionRate], heldout_fraction: float, seed: int) -> list[dict[str, Any]]:
    """The in-band questions as selection records ``{id, r_hat, correct, samples, part}``, in screen order."""
    return [
        {
            "id": r.id,
            "r_hat": r.r_hat,
            "correct": r.correct,
            "samples": r.samples,
            "part": assign_part(r.id, seed, heldout_fraction),
        }
        for r in rates
        if in_band(r)
    ]


def _pass_rate(rates: Sequence[QuestionRate]) -> float | None:
    answers = sum(r.samples for r in rates)
    return None if answers == 0 else sum(r.correct for r in rates) / answers


def summarize(rates: Sequence[QuestionRate], selection: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pass rates (correct answers / answers) of the whole screen, of the selection and of each part; the
    histogram of correct answers per question; the in-band fraction."""
    by_id = {r.id: r for r in rates}
    chosen = [by_id[s["id"]] for s in selection]
    k_values = sorted({r.samples for r in rates})
    histogram = {}
    if len(k_values) == 1:  # "c/K": number of questions with c of K answers correct
        k = k_values[0]
        histogram = {f"{c}/{k}": sum(1 for r in rates if r.correct == c) for c in range(k + 1)}
    out: dict[str, Any] = {
        "questions": len(rates),
        "answers": sum(r.samples for r in rates),
        "pass_rate": _pass_rate(rates),
        "pass_rate_selected": _pass_rate(chosen),
        "in_band": len(chosen),
        "in_band_fraction": len(chosen) / len(rates) if rates else None,
        "all_wrong": sum(1 for r in rates if r.correct == 0),
        "all_right": sum(1 for r in rates if r.correct == r.samples),
        "histogram": histogram,
        "truncation_rate": sum(r.truncated for r in rates) / max(sum(r.samples for r in rates), 1),
        "response_tokens_mean": sum(r.tokens for r in rates) / max(sum(r.samples for r in rates), 1),
    }
    for part in PARTS:
        members = [by_id[s["id"]] for s in selection if s["part"] == part]
        out[f"{part}_questions"] = len(members)
        out[f"pass_rate_{part}"] = _pass_rate(members)
    return out


def write_selection(
    out_dir: str | os.PathLike[str],
    rates: Sequence[QuestionRate],
    heldout_fraction: float,
    seed: int,
    facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``screen.jsonl``, ``selection.jsonl`` and ``summary.json`` under ``out_dir``; returns the summary.

    ``facts`` (data set, model, prompt, sampling, seconds, ...) are stored in the summary as they are.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    selection = select(rates, heldout_fraction, seed)
    with (out / SCREEN_FILE).open("w", encoding="utf-8") as handle:
        for r in rates:
            record = {
                "id": r.id,
                "r_hat": r.r_hat,
                "correct": r.correct,
                "samples": r.samples,
                "truncated": r.truncated,
                "tokens": r.tokens,
                "in_band": in_band(r),
            }
            handle.write(json.dumps(record) + "\n")
    with (out / SELECTION_FILE).open("w", encoding="utf-8") as handle:
        for record in selection:
            handle.write(json.dumps(record) + "\n")
    summary = {
        **summarize(rates, selection),
        "heldout_fraction": heldout_fraction,
        "split_seed": seed,
        **(facts or {}),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


# ---------------------------------------------------------------------------------------------- command line
def _config_node(group: str, name_or_path: str) -> Any:
    """``configs/<group>/<name>.yaml`` or a yaml file path, loaded with OmegaConf."""
    from omegaconf import OmegaConf

    from nft_lit.compose import CONFIG_DIR

    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / group / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise SelectionError(f"--{group}: {name_or_path!r} is neither a yaml file nor one of configs/{group}: {known}")
    return OmegaConf.load(path)


def _load_base_problems(data: str, split: str | None, data_dir: str | None) -> Sequence[Problem]:
    from hydra.utils import instantiate

    node = _config_node("data", data)
    if node.get("problems") is None:
        raise SelectionError(f"--data {data}: the data config has no 'problems' node")
    if data_dir is not None:
        node.data_dir = data_dir
    if split is not None:
        if "split" not in node.problems:
            raise SelectionError(f"--split {split}: the data config {data!r} has no problems.split to set")
        node.problems.split = split
    return instantiate(node.problems, _convert_="object")


def _parser() -> argparse.ArgumentParser:
    from nft_lit.models import default_smollm2_dir

    p = argparse.ArgumentParser(
        prog="python -m nft_lit.band",
        description="Screen a data set with a base model: sample K answers per question, keep the questions with "
        "0 < r̂ < 1 and split them into train / held-out parts (seeded hash of the id). Writes screen.jsonl, "
        "selection.jsonl and summary.json under --out.",
    )
    p.add_argument("--model", default=str(default_smollm2_dir()), help="HF model folder (default: %(default)s)")
    p.add_argument("--data", default="gsm8k", help="configs/data name or yaml path (default: %(default)s)")
    p.add_argument("--split", default="train", help="set the data node's split (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="data root (default: the config's / NFT_DATA_DIR)")
    p.add_argument("--questions", type=int, default=64, help="questions to screen, a seeded random sample; 0: all")
    p.add_argument("--samples", "-k", type=int, default=4, help="K answers per question (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=320, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument("--prompt", default="qwen_math", help="configs/prompt name or yaml path (default: %(default)s)")
    p.add_argument("--template", default=None, help="replace the prompt's template, e.g. 'What is {question}?'")
    p.add_argument("--reward", default="math_verify", help="configs/reward name or yaml path (default: %(default)s)")
    p.add_argument("--engine", choices=("hf", "vllm"), default="vllm", help="(default: %(default)s)")
    p.add_argument("--heldout-fraction", type=float, default=0.25, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the question sample and of sampling")
    p.add_argument(
        "--split-seed", type=int, default=0, help="seed of the train/held-out hash: keep it fixed across screens"
    )
    p.add_argument("--batch-prompts", type=int, default=16, help="questions per sampler call (progress)")
    p.add_argument(
        "--chunk-prompts",
        type=int,
        default=None,
        help="sampler.chunk_prompts: verify each chunk while the next generates",
    )
    p.add_argument("--out", default=None, help="output folder (default: .cache/nft-lit/band/<data>_<split>_<model>)")
    return p


def _sampler_options(chunk_prompts: int | None) -> Any:
    """configs/train.yaml composed with this screen's sampler options: the Sampler is built from the same
    ``sampler`` node as in ``nft-lit fit`` (``compose.build_sampler``), so an option means the same here."""
    from hydra import compose, initialize_config_dir

    from nft_lit.compose import CONFIG_DIR

    chunk = "null" if chunk_prompts is None else str(chunk_prompts)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=["run_dir=.", f"sampler.chunk_prompts={chunk}"])


def _build_sampler(args: argparse.Namespace, problems: Sequence[Problem]) -> tuple[Any, Any]:
    """(Sampler, policy or None) for the command line's engine, prompt and verifier."""
    from hydra.utils import instantiate

    from nft_lit.compose import build_sampler
    from nft_lit.models import ModelSpec, load_model, load_tokenizer
    from nft_lit.prompts import encode_prompt
    from nft_lit.rollout import HFGenerateEngine, VLLMEngine

    spec = ModelSpec(pretrained=args.model)
    tokenizer = load_tokenizer(spec)
    prompt = _config_node("prompt", args.prompt)
    if args.template is not None:
        prompt.template = args.template
    parts = {
        "tokenizer": tokenizer,
        "verifier": instantiate(_config_node("reward", args.reward).verifier, _convert_="object"),
        "prompt_template": instantiate(prompt, _convert_="object"),
    }
    options = _sampler_options(args.chunk_prompts)
    if args.engine == "hf":
        return build_sampler(options, HFGenerateEngine(), **parts), load_model(spec, tokenizer).eval()
    # Sized to this screen: its longest prompt plus the answer budget, batch_prompts x K sequences at once.
    longest = max(len(encode_prompt(p.question, parts["prompt_template"], tokenizer)) for p in problems)
    engine = VLLMEngine(
        model_path=args.model,
        dtype=spec.dtype,  # started from the folder in its own dtype (float32, as the trained policy)
        max_model_len=longest + args.max_new_tokens,
        max_num_seqs=max(args.batch_prompts * args.samples, 1),
        seed=args.seed,  # VLLMEngine schedules whole prompts on CPU (the seeded chunked-prefill crash)
    )
    return build_sampler(options, engine, **parts), None


def _check_args(args: argparse.Namespace) -> None:
    if args.questions < 0 or args.samples < 1 or args.max_new_tokens < 1:
        raise SelectionError("--questions must be >= 0, --samples >= 1 and --max-new-tokens >= 1")
    if not 0 < args.heldout_fraction < 1:
        raise SelectionError(f"--heldout-fraction must be in (0, 1), got {args.heldout_fraction}")


def _subsample(base: list[Problem], questions: int, seed: int) -> list[Problem]:
    """``questions`` of ``base`` drawn with ``seed``, kept in their order; all of them for 0 or too many."""
    import random

    if not questions or questions >= len(base):
        return base
    return [base[i] for i in sorted(random.Random(seed).sample(range(len(base)), questions))]


def _facts(args: argparse.Namespace, base: int, screened: int, startup: float, seconds: float) -> dict[str, Any]:
    """The settings and seconds ``summary.json`` records beside the pass rates."""
    return {
        "data": args.data,
        "split": args.split,
        "base_questions": base,
        "model": str(args.model),
        "prompt": args.prompt,
        "template": args.template,
        "reward": args.reward,
        "engine": args.engine,
        "samples": args.samples,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "seconds_startup": startup,
        "seconds_screen": seconds,
        "seconds_per_question": seconds / max(screened, 1),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _print_summary(summary: dict[str, Any], samples: int, seconds: float, startup: float, out: Path) -> None:
    def pct(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}%"

    print(
        f"{summary['questions']} questions x {samples}: pass rate {pct(summary['pass_rate'])}; in band "
        f"{summary['in_band']} ({pct(summary['in_band_fraction'])}): train {summary['train_questions']}, held-out "
        f"{summary['heldout_questions']}; pass rate on the selection {pct(summary['pass_rate_selected'])}; "
        f"r̂ histogram {summary['histogram']}; {seconds:.0f} s (+{startup:.0f} s start-up)\nwrote {out}"
    )


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import InstantiationException

    from nft_lit.rollout import SamplingParams

    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        sampling = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed
        )
        t_load = time.perf_counter()
        base = list(_load_base_problems(args.data, args.split, args.data_dir))
        problems = _subsample(base, args.questions, args.seed)
        sampler, policy = _build_sampler(args, problems)
        startup = time.perf_counter() - t_load
    except (SelectionError, ValueError, FileNotFoundError, InstantiationException) as exc:
        print(f"nft-lit band: {exc}", file=sys.stderr)
        return 2
    model_name = Path(args.model).name
    default_out = _REPO_ROOT / ".cache" / "nft-lit" / "band" / f"{Path(args.data).stem}_{args.split}_{model_name}"
    out = Path(args.out) if args.out else default_out

    def report(done: int, total: int, seconds: float) -> None:
        print(f"screened {done}/{total} questions x {args.samples} in {seconds:.0f} s", flush=True)

    t0 = time.perf_counter()
    try:
        rates = screen(problems, sampler, sampling, args.samples, policy, args.batch_prompts, report)
    finally:
        close = getattr(sampler.verifier, "close", None)
        if callable(close):
            close()
    seconds = time.perf_counter() - t0
    facts = _facts(args, len(base), len(rates), startup, seconds)
    summary = write_selection(out, rates, args.heldout_fraction, args.split_seed, facts)
    _print_summary(summary, args.samples, seconds, startup, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
