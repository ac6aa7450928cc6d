"""Binary verifiable rewards: math-verify in worker processes, exact match, overlong shaping (answers: answers.py).

The reward is the whole supervision signal of NFT (paper Eq. 10 only sees r ∈ {0, 1}), so a verifier must
neither hang nor crash a run: math-verify runs in a ``pebble.ProcessPool`` of worker processes (its own timeouts
rely on ``signal.alarm`` and therefore need each worker's main thread), and pebble's per-task wall-clock timeout
kills and replaces a worker that is stuck in C code where no signal handler can run. A timed-out or crashed check
scores 0 and is counted in ``VerifyResult.stats``.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
import time
import weakref
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures import TimeoutError as TaskTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from pebble import ProcessExpired, ProcessFuture, ProcessPool

from nft_lit.answers import decide_locally, extract_answer

__all__ = [
    "ExactMatchVerifier",
    "MathVerifier",
    "Verifier",
    "VerifyResult",
    "overlong_penalty",
]


@dataclass
class VerifyResult:
    """Rewards in input order (0.0 or 1.0) and counters of the batch (timeouts, errors, seconds, ...)."""

    rewards: list[float]
    stats: dict[str, float] = field(default_factory=dict)


class Verifier(Protocol):
    """Scores responses against gold answers; a truncated response scores 0 by rule."""

    def score(self, responses: list[str], golds: list[str], truncated: list[bool]) -> VerifyResult: ...


def _check_lengths(responses: list[str], golds: list[str], truncated: list[bool]) -> None:
    if not (len(responses) == len(golds) == len(truncated)):
        raise ValueError(
            f"score: responses, golds and truncated must have the same length, got "
            f"{len(responses)}, {len(golds)} and {len(truncated)}"
        )
    for name, values, kind in (("responses", responses, str), ("golds", golds, str), ("truncated", truncated, bool)):
        for i, value in enumerate(values):
            if not isinstance(value, kind):
                raise TypeError(f"score: {name}[{i}] must be {kind.__name__}, got {type(value).__name__}")


class ExactMatchVerifier:
    """Exact string match of the extracted answer (or the whole response when it states none).

    Used by the synthetic CPU demo, whose answers are plain integers, where a process pool is pure cost.
    """

    def score(self, responses: list[str], golds: list[str], truncated: list[bool]) -> VerifyResult:
        _check_lengths(responses, golds, truncated)
        start = time.perf_counter()
        rewards = []
        for response, gold, cut in zip(responses, golds, truncated, strict=True):
            if cut:
                rewards.append(0.0)
                continue
            pred = extract_answer(response)
            pred = response if pred is None else pred
            rewards.append(float(pred.strip() == gold.strip()))
        stats = {
            "timeouts": 0.0,
            "errors": 0.0,
            "truncated": float(sum(truncated)),
            "seconds": time.perf_counter() - start,
        }
        return VerifyResult(rewards, stats)

    def close(self) -> None:
        """Nothing to release; present so every verifier can be closed the same way."""

    def __enter__(self) -> ExactMatchVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# math-verify worker processes


class _TimeoutFlag(logging.Handler):
    """math-verify reports its own (signal based) timeouts only as log warnings; count them as timeouts."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.fired = False

    def emit(self, record: logging.LogRecord) -> None:
        if "Timeout" in record.getMessage():
            self.fired = True


# State of a worker process, set by ``_init_worker`` before it takes its first task.
_soft_timeout_s = 1
_timeout_flag = _TimeoutFlag()


def _init_worker(soft_timeout_s: int) -> None:
    """Pool initializer: imports math-verify before any task's deadline starts and routes its timeout warnings."""
    global _soft_timeout_s
    # pebble exits a worker on SIGTERM from a Python handler, which never runs while the worker is stuck in C code;
    # the default action ends it at once, so a timed-out worker is gone at its deadline.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _soft_timeout_s = soft_timeout_s
    import math_verify  # noqa: F401

    mv_logger = logging.getLogger("math_verify")
    # math-verify logs the full offending text on a timeout; a 200k-character response would flood stderr.
    mv_logger.propagate = False
    mv_logger.addHandler(_timeout_flag)


@lru_cache(maxsize=8192)
def _parse_gold(gold: str) -> list[Any]:
    from math_verify import parse

    return parse(f"${gold}$", parsing_timeout=_soft_timeout_s)


def _check_pair(pred: str | None, tail: str, gold: str) -> tuple[str, bool]:
    """One check in a worker: (status, correct), status "ok", "timeout" (math-verify's own) or "error"."""
    from math_verify import parse, verify

    _timeout_flag.fired = False
    try:
        gold_parsed = _parse_gold(gold)
        # An extracted answer is a bare LaTeX expression; without one, let math-verify find the last anchored or
        # plain expression in the tail of the response.
        pred_parsed = parse(f"${pred}$" if pred is not None else tail, parsing_timeout=_soft_timeout_s)
        correct = bool(gold_parsed and pred_parsed) and verify(
            gold_parsed, pred_parsed, timeout_seconds=_soft_timeout_s
        )
    except Exception:
        return "error", False
    return ("timeout" if _timeout_flag.fired and not correct else "ok"), bool(correct)


def _stop_pool(pool: ProcessPool) -> None:
    pool.stop()
    pool.join()


class MathVerifier:
    """math-verify in a pool of ``num_workers`` processes with a per-answer wall-clock timeout.

    Each (response, gold) pair gets ``timeout_s`` seconds of wall-clock time in a worker; past that the
    worker is killed, replaced (in the background: the others keep scoring), and the pair scores 0
    (``stats['timeouts']``). A worker that dies scores 0 (``stats['errors']``) and is replaced too. Pairs
    whose extracted answer equals the gold up to spacing, or that are both plain numbers, are decided in the
    parent without a round trip (``stats['fast_path']``, see ``decide_locally``; ``local_fast_path=False``
    sends every pair to math-verify).
    The pool is a ``pebble.ProcessPool`` of ``spawn`` workers: never a fork of a parent that may hold CUDA state or
    threads (a spawned worker imports the caller's ``__main__`` as multiprocessing does, behind its
    ``if __name__ == "__main__"`` guard). Workers start on first use (or on ``__enter__``); use as a context manager
    or call ``close()``.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        strict_box: bool = False,
        strict_box_tail_chars: int = 300,
        start_timeout_s: float = 120.0,
        local_fast_path: bool = True,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"MathVerifier: num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"MathVerifier: timeout_s must be > 0 seconds, got {timeout_s}")
        if strict_box_tail_chars < 1:
            raise ValueError(f"MathVerifier: strict_box_tail_chars must be >= 1, got {strict_box_tail_chars}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.strict_box = strict_box
        self.strict_box_tail_chars = strict_box_tail_chars
        self.start_timeout_s = start_timeout_s
        self.local_fast_path = local_fast_path
        # math-verify's own alarms (whole seconds) end most slow checks cheaply inside the worker, without
        # the cost of a restart; the pool's hard deadline is the guarantee.
        self._soft_timeout_s = max(1, int(self.timeout_s))
        self._pool: ProcessPool | None = None
        self._finalizer: weakref.finalize | None = None
        self._closed = False

    def _start(self) -> ProcessPool:
        if self._closed:
            raise RuntimeError("MathVerifier: used after close()")
        if self._pool is not None and not self._pool.active:
            self._discard_pool()  # pebble gives up on a pool whose worker died while no task ran: build a new one
        if self._pool is None:
            self._pool = ProcessPool(
                self.num_workers,
                initializer=_init_worker,
                initargs=(self._soft_timeout_s,),
                context=multiprocessing.get_context("spawn"),
            )
            self._finalizer = weakref.finalize(self, _stop_pool, self._pool)
            _ = self._pool.active  # pebble starts the workers on the first status check
        return self._pool

    def _discard_pool(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # stops the pool, once
        self._pool = self._finalizer = None

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        self._discard_pool()
        self._closed = True

    def __enter__(self) -> MathVerifier:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score(self, responses: list[str], golds: list[str], truncated: list[bool]) -> VerifyResult:
        _check_lengths(responses, golds, truncated)
        start = time.perf_counter()
        rewards = [0.0] * len(responses)
        stats = {"timeouts": 0.0, "errors": 0.0, "truncated": 0.0, "no_answer": 0.0, "fast_path": 0.0}
        tasks: list[tuple[int, tuple[str | None, str, str]]] = []
        for i, (response, gold, cut) in enumerate(zip(responses, golds, truncated, strict=True)):
            if cut:
                stats["truncated"] += 1
                continue
            pred = extract_answer(response, self.strict_box, self.strict_box_tail_chars)
            if pred is None and self.strict_box:
                stats["no_answer"] += 1
            elif self.local_fast_path and pred is not None and (verdict := decide_locally(pred, gold)) is not None:
                rewards[i] = float(verdict)
                stats["fast_path"] += 1
            else:
                tail = response[-self.strict_box_tail_chars :] if pred is None else ""
                tasks.append((i, (pred, tail, gold)))
        if tasks:
            self._run(tasks, rewards, stats)
        stats["seconds"] = time.perf_counter() - start
        return VerifyResult(rewards, stats)

    def _run(
        self,
        tasks: list[tuple[int, tuple[str | None, str, str]]],
        rewards: list[float],
        stats: dict[str, float],
    ) -> None:
        for attempt in range(2):
            pool = self._start()
            futures = [pool.schedule(_check_pair, payload, timeout=self.timeout_s) for _, payload in tasks]
            self._wait(futures)
            broken = [f.exception() for f in futures if isinstance(f.exception(), BrokenProcessPool)]
            if not broken:
                break
            if attempt:
                raise RuntimeError(
                    f"MathVerifier: the worker processes exited during start-up ({broken[0]}); "
                    f"check that `import math_verify` works in {sys.executable}"
                )
            self._discard_pool()  # pebble gave up on the pool (a worker died while none had a task): once more
        for (index, _), future in zip(tasks, futures, strict=True):
            try:
                status, correct = future.result()
            except TaskTimeout:  # pebble killed the worker at the deadline and starts another
                stats["timeouts"] += 1
            except ProcessExpired:  # the worker died (a crash, the OOM killer); pebble starts another
                stats["errors"] += 1
            else:
                if status == "ok":
                    rewards[index] = float(correct)
                else:
                    stats["timeouts" if status == "timeout" else "errors"] += 1

    def _wait(self, futures: list[ProcessFuture]) -> None:
        """Wait for all checks; fail when for ``start_timeout_s`` none finished and no worker took one."""
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=self.start_timeout_s, return_when=FIRST_COMPLETED)
            if not done and not any(future.running() for future in pending):
                for future in pending:
                    future.cancel()
                raise RuntimeError(
                    f"MathVerifier: no worker started within {self.start_timeout_s:.0f} s (start_timeout_s); "
                    "is the machine overloaded?"
                )


# ----------------------------------------------------------------------------------------------------------
# DAPO overlong reward shaping


def overlong_penalty(lengths: list[int], max_response_len: int, buffer: int, factor: float = 1.0) -> list[float]:
    """DAPO soft overlong punishment: ``min(-(L - (L_max - B)) / B * factor, 0)`` per answer length L.

    Zero up to ``L_max - B`` tokens, then linear down to ``-factor`` at ``L_max``; added to the binary reward
    (which then stops being binary, so NFT/RFT refuse it).
    """
    if max_response_len < 1:
        raise ValueError(f"overlong_penalty: max_response_len must be >= 1, got {max_response_len}")
    if not 0 < buffer <= max_response_len:
        raise ValueError(f"overlong_penalty: buffer must be in (0, max_response_len={max_response_len}], got {buffer}")
    if factor < 0:
        raise ValueError(f"overlong_penalty: factor must be >= 0, got {factor}")
    start = max_response_len - buffer
    return [min(-(length - start) / buffer * factor, 0.0) for length in lengths]
