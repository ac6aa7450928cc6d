"""Model building: tiny random-init causal LMs, a character tokenizer, HF folders and the SmolLM2 conversion.

Everything here builds from plain values so Hydra `_target_`, LightningCLI, tests and notebooks construct
the same objects; nothing is fetched from the HF hub at run time unless a config names a hub model.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tok_models
from transformers import PreTrainedModel, PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
CHAR_PAD_ID = 0
CHAR_EOS_ID = 1

_ARCHS = ("llama", "qwen2")


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: `<pad>`=0, `<eos>`=1 (also BOS), then one id per character of `alphabet`.

    Built on the `tokenizers` library (WordLevel over single characters) so `save_pretrained` writes a
    `tokenizer.json` that transformers' AutoTokenizer and vLLM load from the folder. Characters outside
    the alphabet have no id: encoding them raises (there is deliberately no unknown token, so a task
    that produces an unexpected character fails loudly instead of training on `<unk>`).
    """
    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError(f"build_char_tokenizer: alphabet must be a non-empty string, got {alphabet!r}")
    duplicates = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if duplicates:
        raise ValueError(f"build_char_tokenizer: alphabet has repeated characters {duplicates!r}")
    vocab = {PAD_TOKEN: CHAR_PAD_ID, EOS_TOKEN: CHAR_EOS_ID}
    for char in alphabet:
        vocab[char] = len(vocab)
    backend = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token=None))
    # [\s\S] rather than "." so newlines are characters too (Oniguruma has no (?s) flag here).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN
    )


def tiny_causal_lm(
    arch: str = "llama",
    vocab_size: int = 16,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 512,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 512,
    seed: int = 0,
    *,
    pad_token_id: int = CHAR_PAD_ID,
    eos_token_id: int = CHAR_EOS_ID,
    bos_token_id: int = CHAR_EOS_ID,
) -> PreTrainedModel:
    """Random-init `LlamaForCausalLM` / `Qwen2ForCausalLM` in float32, deterministic in `seed`.

    Special-token ids default to the char tokenizer's. vLLM needs head size >= 32 (hidden_size / num_heads).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in _ARCHS:
        raise ValueError(f"tiny_causal_lm: arch must be one of {_ARCHS}, got {arch!r}")
    for name, value in (
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("intermediate_size", intermediate_size),
        ("max_position_embeddings", max_position_embeddings),
    ):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"tiny_causal_lm: {name} must be a positive int, got {value!r}")
    if hidden_size % num_heads:
        raise ValueError(f"tiny_causal_lm: hidden_size={hidden_size} not divisible by num_heads={num_heads}")
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if kv_heads <= 0 or num_heads % kv_heads:
        raise ValueError(f"tiny_causal_lm: num_heads={num_heads} not divisible by num_kv_heads={kv_heads}")
    for name, value in (("pad", pad_token_id), ("eos", eos_token_id), ("bos", bos_token_id)):
        if not 0 <= value < vocab_size:
            raise ValueError(f"tiny_causal_lm: {name}_token_id={value} outside vocab of size {vocab_size}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        dtype="float32",
    )
    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    )
    config = config_cls(**common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.float()
