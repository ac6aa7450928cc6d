"""The HF folder an engine with its own copy of the weights (``VLLMEngine``) starts from.

Such an engine loads its architecture, config and tokenizer from a folder and has its weights replaced at the
first sync, which precedes any sampling, so the initial model (or a checkpoint's) serves. The contract with a
rollout config node: an engine that takes a ``model_path`` option and leaves it null gets "the policy's
folder" (``engine_model_path``): the policy's own ``pretrained`` folder when it has one, else the policy saved
as ``<run_dir>/engine_init`` (``write_engine_folder``) before the engine starts. Any engine class can opt in by
taking ``model_path`` (and, optionally, ``tokenizer_path``).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENGINE_FOLDER = "engine_init"
"""Sub-folder of the run dir holding the HF folder an engine starts from when the policy has none."""


def engine_needs_folder(rollout: Mapping[str, Any] | None) -> bool:
    """The ``rollout`` node names an engine that starts from an HF folder (a ``model_path`` option, as
    ``VLLMEngine``) and leaves it null: "the policy's folder", filled in by ``engine_model_path``."""
    return rollout is not None and "model_path" in rollout and rollout.get("model_path") is None


def policy_folder(spec: Any) -> tuple[str, str | None] | None:
    """(model folder, separate tokenizer folder or None) an engine can load the policy's architecture and
    tokenizer from, or None when the policy has no such folder: random init, a GGUF file, a ``char:``
    tokenizer, or a ``pretrained`` folder that is not on this machine (a checkpoint from elsewhere)."""
    from nft_lit.models import CHAR_PREFIX

    if spec.pretrained is None or spec.gguf_file is not None or not Path(spec.pretrained, "config.json").is_file():
        return None
    if spec.tokenizer is not None and spec.tokenizer.startswith(CHAR_PREFIX):
        return None
    return str(spec.pretrained), spec.tokenizer


def engine_model_path(
    rollout: Mapping[str, Any] | None, spec: Any, run_dir: str | os.PathLike[str]
) -> tuple[dict[str, str], Path | None]:
    """(keyword arguments the engine lacks, folder to save the policy to or None) for a ``rollout`` node that
    starts from a folder but names none (``engine_needs_folder``); ({}, None) for every other node.

    The policy's own folder (``model.pretrained``, with ``model.tokenizer`` when that is a separate folder
    and ``rollout.tokenizer_path`` is null) when it has one (``policy_folder``); else ``<run_dir>/engine_init``,
    which the caller fills with ``write_engine_folder`` before the engine starts.
    """
    if not engine_needs_folder(rollout):
        return {}, None
    assert rollout is not None
    found = policy_folder(spec)
    if found is not None:
        folder, tokenizer_folder = found
        if tokenizer_folder is not None and rollout.get("tokenizer_path") is None:
            return {"model_path": folder, "tokenizer_path": tokenizer_folder}, None
        return {"model_path": folder}, None
    path = Path(run_dir) / ENGINE_FOLDER
    return {"model_path": str(path)}, path


def save_engine_folder(model: Any, tokenizer: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` and ``tokenizer`` as an HF folder at ``path``, replacing what is there: written beside it
    and renamed into place, so an engine never reads a half-written folder."""
    from nft_lit.models import save_hf_folder

    out = Path(path)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_folder(model, tokenizer, tmp)
    shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another node's first process put the same folder there in between
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_local_rank_zero() -> bool:
    """The first process of this node (Lightning's launcher and torchrun set LOCAL_RANK, SLURM SLURM_LOCALID)."""
    return all(os.environ.get(var, "0") == "0" for var in ("LOCAL_RANK", "SLURM_LOCALID"))


def write_engine_folder(path: Path | None, policy: Callable[[], tuple[Any, Any]]) -> None:
    """Save ``policy()`` (model, tokenizer) as the HF folder ``path`` from the first process of the node (the
    others start their engine after the processes have met, in fit); a no-op for None."""
    if path is None or not _is_local_rank_zero():
        return
    model, tokenizer = policy()
    save_engine_folder(model, tokenizer, path)
    log.info("rollout engine: the policy has no HF folder of its own; saved it as %s", path)
