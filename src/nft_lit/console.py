"""What the console shows: each message once, and only what a user can act on.

Lightning's loggers print through their own handler and through Hydra's root handler (every line twice), so
Hydra's is kept, which also writes the run's log file; Lightning's advertising tips and warnings that carry no
information for a run of this package are dropped.
"""

from __future__ import annotations

import logging
import warnings


def _no_advertising(record: logging.LogRecord) -> bool:
    return "💡 Tip:" not in record.getMessage()


def quiet_lightning() -> None:
    """Route Lightning's log lines through the root handler only and silence what needs no action."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if type(h) is not logging.StreamHandler]
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_advertising)  # added once
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    # Epoch-level rollout/held-out metrics are computed from data gathered over all ranks: identical everywhere,
    # so syncing them (what this warning recommends, under cpu_fsdp2 20 times a run) would change nothing.
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level")
