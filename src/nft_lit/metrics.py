"""The names of the metrics a run logs, declared once (docs/ARCHITECTURE.md, "One rollout iteration").

Every logger (TensorBoard, CSV, W&B, MLflow), ``nft-lit report`` and the progress bar read these names:

- ``rollout/*``: the data side of an iteration, computed from what every rank gathered (identical on all):
  ``iteration.rollout_statistics`` and the iteration stage (``driver.RolloutIteration``);
- ``train/*``: the optimizer steps (``module.PolicyModule``), with the loss's own metrics under ``train/<name>``;
- ``seconds/*``: where an iteration's time goes, one name per phase (``seconds_of``);
- ``val/<benchmark>/avg@k`` and ``pass@k``: evaluation (``val_avg_at``, ``val_metric``);
- ``val/probe/*``: the policy's entropy on a fixed teacher-forced probe (``evaluation.ProbeEntropy``), logged
  with the evaluation when ``eval.probe_size`` > 0.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------------------------- rollout/*
REWARD_MEAN = "rollout/reward_mean"  # mean (shaped) reward of every generated answer
PASS_RATE = "rollout/pass_rate"  # share of generated answers the verifier accepts
KEPT_GROUP_FRACTION = "rollout/kept_group_fraction"  # share of generated groups with 0 < r̂ < 1
KEPT_GROUPS = "rollout/kept_groups"  # groups the iteration trains on
KEPT_REWARD_MEAN = "rollout/kept_reward_mean"  # mean reward of the kept groups' answers
ALL_CORRECT_FRACTION = "rollout/all_correct_fraction"
GEN_ROUNDS = "rollout/gen_rounds"
RESPONSE_LENGTH_MEAN = "rollout/response_length_mean"
RESPONSE_LENGTH_MAX = "rollout/response_length_max"
TRUNCATION_RATE = "rollout/truncation_rate"  # answers cut at max_new_tokens
GEN_TOKENS_PER_SECOND = "rollout/gen_tokens_per_second"
VERIFY_ANSWERS_PER_SECOND = "rollout/verify_answers_per_second"
PADDING_FRACTION = "rollout/padding_fraction"  # padded share of the positions the forwards compute
LOGPROB_GAP = "rollout/logprob_gap"  # mean |engine - trainer| log-prob per response token
OPTIMIZER_STEPS = "rollout/optimizer_steps"


def engine_metric(name: str) -> str:
    """An engine's own counter returned by ``sync_weights`` (``sync/tensors``, ...): ``rollout/sync/tensors``."""
    return f"rollout/{name}"


# ------------------------------------------------------------------------------------------------ train/*
TRAIN_LOSS = "train/loss"
ENTROPY = "train/entropy"
GRAD_NORM = "train/grad_norm"
LEARNING_RATE = "train/lr"
TRAIN_TOKENS_PER_SECOND = "train/tokens_per_second"


def train_metric(name: str) -> str:
    """A loss's own metric (``LossOutput.metrics``, e.g. ``loss/positive``) as logged: ``train/loss/positive``."""
    return f"train/{name}"


ITERATION = "iteration"  # the iteration index, logged with each iteration's metrics

# ---------------------------------------------------------------------------------------------- seconds/*
SECONDS_SYNC = "seconds/sync"  # weight sync into the engine
SECONDS_GENERATE = "seconds/generate"
SECONDS_VERIFY = "seconds/verify"  # the verifier's busy time
SECONDS_VERIFY_WAIT = "seconds/verify_wait"  # the part of verification generation did not hide
SECONDS_FILTER = "seconds/filter"  # prompt checks, grouping, shaping, gathering, dynamic sampling
SECONDS_PLAN = "seconds/plan"
SECONDS_OLD_LOGPROBS = "seconds/old_logprobs"
SECONDS_ROLLOUT = "seconds/rollout"  # the whole data side of an iteration
SECONDS_TRAIN = "seconds/train"
SECONDS_EVAL = "seconds/eval"
SECONDS_ITERATION = "seconds/iteration"  # data side + training + the epoch-end callbacks
# every seconds/<phase> a run logs, in the order of an iteration (rollout and iteration are totals)
PHASES = (
    "sync", "generate", "verify", "verify_wait", "filter", "plan", "old_logprobs",
    "rollout", "train", "eval", "iteration",
)  # fmt: skip


def seconds_of(phase: str) -> str:
    """The seconds metric of a phase of ``PHASES``: ``seconds/<phase>``."""
    return f"seconds/{phase}"


# -------------------------------------------------------------------------------------------------- val/*
VAL_PREFIX = "val/"
_VAL_AVG_AT = re.compile(r"^val/(?P<name>.+)/avg@(?P<k>\d+)$")


def val_metric(key: str) -> str:
    """An evaluation result (``Evaluation.run``'s ``<benchmark>/avg@k``, ``average/avg``) as logged: ``val/<key>``."""
    return VAL_PREFIX + key


def val_avg_at(name: str, k: int) -> str:
    """The avg@k of benchmark ``name`` as logged: ``val/<name>/avg@<k>``."""
    return f"{VAL_PREFIX}{name}/avg@{k}"


# The probe entropy (evaluation.ProbeEntropy), measured with each held-out evaluation (callbacks.HeldOutEvaluation):
# the mean next-token entropy (nats) over the answer tokens of a fixed set of teacher-forced gold answers, at the
# training temperature. Unlike train/entropy (over the answers the policy sampled) the text it is measured on
# never changes, so answer length cannot move it.
PROBE_ENTROPY = "val/probe/entropy"  # the headline: mean over every answer token of the probe
PROBE_ENTROPY_SEQUENCE_MEAN = "val/probe/entropy_sequence_mean"  # mean over sequences of each one's token mean
PROBE_SECONDS = "val/probe/seconds"  # the probe's share of seconds/eval


def parse_val_avg_at(metric: str) -> tuple[str, int] | None:
    """(benchmark, k) of a ``val/<name>/avg@<k>`` metric; None for any other name."""
    match = _VAL_AVG_AT.match(metric)
    return None if match is None else (match["name"], int(match["k"]))


# ---------------------------------------------------------------------------------- progress bar (not logged)
BAR_REWARD = "reward"  # the iteration's rollout/reward_mean
BAR_LOSS = "loss"  # the step's train/loss
BAR_SECONDS_PER_ITERATION = "s/it"  # the last iteration's seconds/iteration
