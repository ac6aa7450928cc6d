"""What the console shows: each message once, and only what a user can act on.

Lightning's loggers print through their own handler and through Hydra's root handler (every line twice), so
Hydra's is kept, which also writes the run's log file; Lightning's advertising tips and warnings that carry no
information for a run of this package are dropped.
"""

from __future__ import annotations

import logging
import os
import warnings


def _no_advertising(record: logging.LogRecord) -> bool:
    return "💡 Tip:" not in record.getMessage()


def _not_vllm_chatter(record: logging.LogRecord) -> bool:
    """vLLM's INFO and WARNING lines (engine start-up, every weight sync's reload, CPU thread binding) are for
    the run's log file; its errors still reach the console."""
    return not (record.name.startswith("vllm") and record.levelno < logging.ERROR)


def quiet_lightning() -> None:
    """Route Lightning's and vLLM's log lines through the root handlers only (Hydra's console and the run's log
    file), keep vLLM's below errors off the console, and silence what needs no action."""
    # vLLM installs its own stdout handler at import unless told not to; then its records reach the root
    # handlers like everyone else's (the engine is imported later, lazily).
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and _not_vllm_chatter not in handler.filters:
            handler.addFilter(_not_vllm_chatter)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if type(h) is not logging.StreamHandler]
        logger.propagate = True
    silence_noise()


def silence_noise() -> None:
    """Drop the lines that need no action, whatever handlers print (also under the LightningCLI)."""
    if _no_advertising not in logging.getLogger("lightning.pytorch.utilities.rank_zero").filters:
        logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_advertising)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    # Epoch-level rollout/held-out metrics are computed from data gathered over all ranks: identical everywhere,
    # so syncing them (what this warning recommends, under cpu_fsdp2 20 times a run) would change nothing.
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level")
    # vLLM's CPU build, imported lazily by the engine: a deprecated torch alias in its triton shim, and torch's note
    # that triton is absent (scripts/setup.sh removes the CUDA triton on purpose).
    warnings.filterwarnings("ignore", message=r".*distributed\.reduce_op.* is deprecated", category=FutureWarning)
    logging.getLogger("torch._library.triton").setLevel(logging.ERROR)
    # The policy trains in train mode (PolicyModule.configure_model); what stays in eval mode is the frozen KL
    # reference, on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # last.ckpt is rewritten after every iteration on purpose, and a resume continues in its own folder.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
