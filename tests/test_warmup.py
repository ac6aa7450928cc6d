import json

import pytest
import torch

from nft_lit.demo.warmup import warmup
from nft_lit.models import ModelSpec, load_model, load_tokenizer


def test_warmup_stops_on_measured_pass_rate_and_is_cached(tmp_path, tiny_warmup):
    config = tiny_warmup()
    first = warmup(config, tmp_path)
    assert not first.reused
    assert first.pass_rate >= 0.2
    assert first.steps < config.max_steps and first.steps % config.eval_every == 0
    assert first.history[-1]["pass_rate"] == first.pass_rate
    assert all(h["pass_rate"] < 0.2 for h in first.history[:-1])
    meta = json.loads((first.path / "warmup.json").read_text())
    assert meta["key"] == config.key()

    # The folder is a plain HF folder that the training loop's ModelSpec loads.
    spec = ModelSpec(pretrained=str(first.path))
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer)
    assert tokenizer.encode("12+3=", add_special_tokens=False) == [3, 4, 12, 5, 15]
    assert sum(p.numel() for p in model.parameters()) > 0

    weights = (first.path / "model.safetensors").stat().st_mtime_ns
    again = warmup(config, tmp_path)
    assert again.reused and again.path == first.path and again.steps == first.steps
    assert (first.path / "model.safetensors").stat().st_mtime_ns == weights


def test_key_changes_with_any_field(tiny_warmup):
    base = tiny_warmup()
    assert base.key() == tiny_warmup().key()
    assert base.key() != tiny_warmup(lr=1e-3).key()
    assert base.key() != tiny_warmup(sft_task={"digits": 1, "max_carries": 0}).key()


def test_unreached_target_is_a_clear_error(tmp_path, tiny_warmup):
    config = tiny_warmup(max_steps=20, target_pass_rate=0.99)
    with pytest.raises(RuntimeError, match=r"below target_pass_rate=0\.99"):
        warmup(config, tmp_path)
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"target_pass_rate": 0.8, "max_pass_rate": 0.7}, "target_pass_rate"),
        ({"lr": 0.0}, "lr"),
        ({"sft_task": {"operation": "/"}}, "operation"),
    ],
)
def test_bad_config(override, match, tiny_warmup):
    with pytest.raises(ValueError, match=match):
        tiny_warmup(**override)


def test_training_is_deterministic(tmp_path, tiny_warmup):
    config = tiny_warmup()
    a = warmup(config, tmp_path / "a", force=True)
    b = warmup(config, tmp_path / "b", force=True)
    wa = load_model(ModelSpec(pretrained=str(a.path))).state_dict()
    wb = load_model(ModelSpec(pretrained=str(b.path))).state_dict()
    assert a.steps == b.steps
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
