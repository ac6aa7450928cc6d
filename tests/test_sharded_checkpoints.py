"""Sharded (DCP) checkpoint folders (`strategy.save_distributed_checkpoint=true`, the `trainer=gpu_fsdp` default):
complete ones are told from cut-short ones, `ckpt_path=last` resumes from them exactly, `nft-lit export` and
`validate` consolidate them. The unit tests write real DCP folders in one process; the end-to-end test runs
`nft-lit fit trainer=cpu_fsdp2` (2 processes, FSDP2)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_runs import SMOKE, _csv_epochs, _nft_lit

from nft_lit.runs import LastCheckpoint, RunError, checkpoint_step, read_checkpoint, resolve_checkpoint

# DCP in one process warns that it assumes one process: that is the point here
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is .*assuming the intent")
SHARDED = [*SMOKE, "trainer=cpu_fsdp2", "trainer.strategy.save_distributed_checkpoint=true"]


def _sharded_checkpoint(path: Path, step: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A folder laid out as Lightning's ModelParallelStrategy writes it: DCP shards + `.metadata`, then `meta.pt`."""
    gen = torch.Generator().manual_seed(seed)
    weights = {"model.w": torch.randn(4, 3, generator=gen), "model.b": torch.randn(3, generator=gen)}
    optimizer = {"state": {"model.w": {"exp_avg": torch.ones(4, 3)}}, "param_groups": [{"lr": 0.1}]}
    dcp.save({"state_dict": weights, "optimizer_0": optimizer}, checkpoint_id=path, no_dist=True)
    torch.save({"global_step": step, "epoch": step // 2, "nft_lit_config": {"seed": seed}}, path / "meta.pt")
    return weights


def test_a_complete_sharded_folder_gives_its_step_config_and_full_weights(tmp_path):
    weights = _sharded_checkpoint(tmp_path / "last.ckpt", 6)
    assert checkpoint_step(tmp_path / "last.ckpt") == 6
    meta = read_checkpoint(tmp_path / "last.ckpt")  # no tensor read
    assert meta["nft_lit_config"] == {"seed": 0} and "state_dict" not in meta
    full = read_checkpoint(tmp_path / "last.ckpt", weights=True)
    assert full["global_step"] == 6 and "optimizer_0" not in full  # the optimizer shards are not read
    assert full["state_dict"].keys() == weights.keys()  # the LightningModule's keys, as load_state_dict takes them
    assert all(torch.equal(full["state_dict"][k], v) for k, v in weights.items())
    assert resolve_checkpoint(str(tmp_path / "last.ckpt"), tmp_path) == tmp_path / "last.ckpt"


@pytest.mark.parametrize("cut", ["no .metadata", "no meta.pt", "truncated meta.pt", "missing shard", "short shard"])
def test_a_sharded_folder_cut_short_is_incomplete_and_last_skips_it(tmp_path, cut):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    older = folder / "epoch=0-step=2.ckpt"
    _sharded_checkpoint(older, 2)
    newer = folder / "last.ckpt"
    _sharded_checkpoint(newer, 4, seed=1)
    shards = sorted(newer.glob("*.distcp"))
    assert shards
    if cut == "no .metadata":  # killed before DCP's coordinator renamed it in: the shards may be whole or not
        (newer / ".metadata").unlink()
    elif cut == "no meta.pt":  # killed between the DCP save and rank 0's torch.save
        (newer / "meta.pt").unlink()
    elif cut == "truncated meta.pt":
        (newer / "meta.pt").write_bytes((newer / "meta.pt").read_bytes()[:100])
    elif cut == "missing shard":  # a deletion cut short
        shards[0].unlink()
    else:
        shards[0].write_bytes(shards[0].read_bytes()[:10])
    assert checkpoint_step(newer) is None
    assert resolve_checkpoint("last", tmp_path) == older
    with pytest.raises(RunError, match=r"not a complete checkpoint \(a sharded folder"):
        resolve_checkpoint(str(newer), tmp_path)
    (older / ".metadata").unlink()
    with pytest.raises(RunError, match=r"no complete checkpoint .*only incomplete ones"):
        resolve_checkpoint("last", tmp_path)


def test_last_prefers_the_newest_complete_checkpoint_whether_file_or_folder(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"global_step": 4, "epoch": 1}, folder / "epoch=1-step=4.ckpt")
    _sharded_checkpoint(folder / "last.ckpt", 2)
    assert resolve_checkpoint("last", tmp_path) == folder / "epoch=1-step=4.ckpt"
    # a run killed between LastCheckpoint's two renames: the new state is whole under its staging name
    _sharded_checkpoint(folder / "last.partial.ckpt", 6)
    assert resolve_checkpoint("last", tmp_path) == folder / "last.partial.ckpt"


class _Killed(Exception):
    pass


def _fake_trainer(step: int, die: bool = False) -> SimpleNamespace:
    """What LastCheckpoint uses of a one-process trainer whose strategy writes sharded folders."""

    def save_checkpoint(path, weights_only=False):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if die:  # a kill half-way through: a shard written, no .metadata, no meta.pt
            (path / "__0_0.distcp").write_bytes(b"half")
            raise _Killed
        _sharded_checkpoint(path, step, seed=step)

    strategy = SimpleNamespace(_save_distributed_checkpoint=True, barrier=lambda name=None: None)
    return SimpleNamespace(
        strategy=strategy, is_global_zero=True, save_checkpoint=save_checkpoint, global_step=step, loggers=[]
    )


def test_last_checkpoint_replaces_a_sharded_folder_atomically(tmp_path):
    folder = tmp_path / "checkpoints"
    callback = LastCheckpoint(str(folder))
    last = str(folder / "last.ckpt")
    callback._save_checkpoint(_fake_trainer(2), last)
    callback._save_checkpoint(_fake_trainer(4), last)
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]  # no staging folder, no old copy left
    assert checkpoint_step(folder / "last.ckpt") == 4 and callback._last_checkpoint_saved == last
    with pytest.raises(_Killed):
        callback._save_checkpoint(_fake_trainer(6, die=True), last)
    assert checkpoint_step(folder / "last.ckpt") == 4  # the previous iteration's folder is untouched
    assert resolve_checkpoint("last", tmp_path) == folder / "last.ckpt"
    callback._save_checkpoint(_fake_trainer(6), last)  # the next save clears the cut-short staging folder
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"] and checkpoint_step(folder / "last.ckpt") == 6


def _optimizer_state(path: Path) -> list:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    return torch.utils._pytree.tree_leaves(_load_state_dict_from_keys({"optimizer_0"}, checkpoint_id=str(path)))


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_checkpoints_resume_exactly_and_export(tmp_path):
    """2-process FSDP2 with DCP folders: 2 iterations + a resume to 3 == 3 uninterrupted; export consolidates."""
    full, part = tmp_path / "full", tmp_path / "part"
    _nft_lit("fit", *SHARDED, "iterations=3", f"hydra.run.dir={full}")
    _nft_lit("fit", *SHARDED, "iterations=2", f"hydra.run.dir={part}")
    last = part / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file() and (last / "meta.pt").is_file()
    assert len(list(last.glob("*.distcp"))) == 2  # one shard file per rank
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch=1-step=4.ckpt", "last.ckpt"]
    mid = read_checkpoint(last, weights=True)
    assert mid["global_step"] == 4

    # another experiment on this folder is refused (the config is read from meta.pt), then the same one resumes
    refused = _nft_lit(
        "fit", *SHARDED, "algorithm=grpo", "iterations=3", "ckpt_path=last", f"hydra.run.dir={part}", ok=False
    )
    assert "algorithm.name: 'nft' -> 'grpo'" in refused.stderr
    proc = _nft_lit("fit", *SHARDED, "iterations=3", "ckpt_path=last", f"hydra.run.dir={part}")
    assert f"resuming {last} at global step 4 (iteration 2)" in proc.stdout + proc.stderr
    assert _csv_epochs(part) == [0, 1, 2]

    a = read_checkpoint(full / "checkpoints" / "last.ckpt", weights=True)
    b = read_checkpoint(last, weights=True)
    assert a["global_step"] == b["global_step"] == 6
    moved = False
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
        moved |= not torch.equal(value, mid["state_dict"][name])
    assert moved
    dm_key = next(k for k in a if "RolloutDataModule" in k)
    assert a[dm_key] == b[dm_key] and a[dm_key]["cursor"] > mid[dm_key]["cursor"]
    assert a["lr_schedulers"] == b["lr_schedulers"]
    for x, y in zip(_optimizer_state(full / "checkpoints" / "last.ckpt"), _optimizer_state(last), strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y

    # export consolidates the folder in one process; the HF folder holds exactly the checkpoint's weights
    from transformers import AutoModelForCausalLM

    _nft_lit("export", f"ckpt_path={last}", f"out={tmp_path / 'hf'}", f"hydra.run.dir={tmp_path / 'export'}")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert exported and exported.keys() == {k.removeprefix("model.") for k in b["state_dict"]}
    for name, value in exported.items():
        assert torch.equal(value, b["state_dict"][f"model.{name}"]), name
