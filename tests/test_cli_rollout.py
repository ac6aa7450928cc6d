"""`rollout=<engine>` works with every experiment by one override (no vLLM needed here; tests/test_vllm.py runs
the real engine end to end):

- experiment files set no engine option, and HFGenerateEngine picks its generate() batch from a memory budget
  for the logits it keeps (`batch_size: null`), so the demo still samples a whole round in one call;
- an engine that starts from an HF folder (`model_path`, VLLMEngine) gets the policy's folder, or one that
  `nft-lit fit` / `validate` / `cli` save under the run dir for a policy without (random init), through a
  test double that takes the same folder arguments.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nft_lit.cli import run_validate
from nft_lit.compose import CONFIG_DIR, ConfigError, build_fit
from nft_lit.engine_folder import ENGINE_FOLDER
from nft_lit.models import ModelSpec, build_char_tokenizer, load_model, load_tokenizer, save_hf_folder, tiny_causal_lm
from nft_lit.rollout import HFGenerateEngine, SamplingParams
from nft_lit.synthetic import ALPHABET

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# The paper set-ups are vLLM runs by design (their defaults select it) and tune it; every other experiment
# file (eps_sweep and omega_sweep inherit paper_7b's) leaves the engine to the `rollout` group.
TUNES_VLLM = {"paper_7b", "paper_32b"}


def _compose(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# ---------------------------------------------------------------------------------------------- HF batch size
@pytest.mark.parametrize("experiment", sorted(set(EXPERIMENTS) - TUNES_VLLM))
def test_experiment_files_set_no_engine_option(experiment):
    raw = OmegaConf.load(CONFIG_DIR / "experiment" / f"{experiment}.yaml")
    assert "rollout" not in raw, f"{experiment}.yaml sets rollout.* (an engine's own option)"


@pytest.mark.parametrize(
    ("sequences", "new_tokens", "vocab", "expected"),
    [
        (512, 6, 16, 512),  # the demo's round: 64 prompts x 8 answers of <= 6 tokens, char vocab
        (256, 3, 16, 256),  # the smoke's round
        (32, 64, 49152, 32),  # demo_smollm2's round: 8 x 4 answers of <= 64 tokens, 12 MiB of logits each
        (200, 64, 49152, 67),  # 85 fit in 1 GiB: 3 calls, evened out to 67 + 67 + 66
        (8192, 3584, 152064, 1),  # Qwen2.5 at 3584 tokens: 2 GiB of logits per sequence, one at a time
    ],
)
def test_automatic_batch_keeps_the_logits_within_the_budget(sequences, new_tokens, vocab, expected):
    engine = HFGenerateEngine()
    assert engine.batch_size is None and engine.logits_budget_mib == 1024
    assert engine.sequences_per_call(sequences, new_tokens, vocab) == expected
    assert HFGenerateEngine(batch_size=5).sequences_per_call(sequences, new_tokens, vocab) == 5


def test_bad_batch_options_fail_by_name():
    with pytest.raises(ValueError, match="batch_size"):
        HFGenerateEngine(batch_size=0)
    with pytest.raises(ValueError, match="logits_budget_mib"):
        HFGenerateEngine(logits_budget_mib=0)


class _CountingGenerate:
    """Wraps a model's generate() and records the batch of every call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.batches: list[int] = []
        self._generate = model.generate
        model.generate = self

    def __call__(self, **kwargs: Any) -> Any:
        self.batches.append(int(kwargs["input_ids"].shape[0]))
        return self._generate(**kwargs)


def test_demo_round_and_heldout_are_one_generate_call_each():
    """The demo's engine as configured (configs/rollout/hf.yaml, nothing in demo.yaml): its 64 x 8 training
    round and its 500-problem held-out evaluation each take one generate() call, as batch_size 512 did."""
    cfg = _compose("experiment=demo", "run_dir=/tmp/unused")
    engine = instantiate(cfg.rollout)
    assert isinstance(engine, HFGenerateEngine) and engine.batch_size is None
    tokenizer = build_char_tokenizer(ALPHABET)  # the demo's (and warm-up's) char vocab: 16
    model = tiny_causal_lm(vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64)
    calls = _CountingGenerate(model)
    engine.sync_weights(model)
    prompts = [tokenizer(f"{a}+{b}=").input_ids for a, b in zip(range(100, 164), range(300, 364), strict=True)]
    batch = engine.generate(prompts, cfg.algorithm.num_answers, instantiate(cfg.sampling, seed=0))
    assert len(batch.response_ids) == 512 and calls.batches == [512]
    heldout = [tokenizer(f"{a}+{a}=").input_ids for a in range(100, 600)]
    engine.generate(heldout, 1, instantiate(cfg.sampling, temperature=0.0))
    assert calls.batches == [512, 500]


def test_automatic_batch_samples_as_the_same_explicit_batch():
    """A fixed seed gives the same tokens (and log-probs) whether the batch is chosen or given: here a budget
    that splits 12 answers of <= 8 tokens over 3 calls (4 each) against batch_size=4, and one call each."""
    tokenizer = build_char_tokenizer("0123456789+=")
    model = tiny_causal_lm("qwen2", vocab_size=len(tokenizer), hidden_size=64, num_heads=2, seed=0)
    prompts = [tokenizer(t).input_ids for t in ("12+34=", "1+2=", "999+1=")]
    sampling = SamplingParams(max_new_tokens=8, seed=3)
    per_sequence_mib = 8 * len(tokenizer) * 4 / 2**20
    auto = HFGenerateEngine(logits_budget_mib=5 * per_sequence_mib)  # 5 fit: 3 calls, evened out to 4
    assert auto.sequences_per_call(12, 8, len(tokenizer)) == 4
    calls = _CountingGenerate(model)
    batches = {}
    for name, engine in [("auto", auto), ("explicit", HFGenerateEngine(batch_size=4))]:
        engine.sync_weights(model)
        batches[name] = engine.generate(prompts, 4, sampling)
    assert calls.batches == [4, 4, 4] * 2
    assert batches["auto"] == batches["explicit"]
    one_call = {}
    for name, engine in [("auto", HFGenerateEngine()), ("explicit", HFGenerateEngine(batch_size=12))]:
        engine.sync_weights(model)
        one_call[name] = engine.generate(prompts, 4, sampling)
    assert calls.batches[6:] == [12, 12]
    assert one_call["auto"] == one_call["explicit"]


# ---------------------------------------------------------------------------------------------- engine folders
class FolderEngine(HFGenerateEngine):
    """A stand-in for VLLMEngine: takes the same folder options (and swallows its others), checks that the folder
    loads as an HF model folder with its tokenizer, then samples with the live model like HFGenerateEngine."""

    folders: ClassVar[list[tuple[str, str | None]]] = []
    syncs: ClassVar[int] = 0

    def __init__(self, model_path: str | None = None, tokenizer_path: str | None = None, **_: Any) -> None:
        from transformers import AutoConfig, AutoTokenizer

        assert model_path is not None and Path(model_path, "config.json").is_file(), model_path
        AutoConfig.from_pretrained(model_path)
        AutoTokenizer.from_pretrained(tokenizer_path or model_path)
        FolderEngine.folders.append((model_path, tokenizer_path))
        super().__init__()

    def sync_weights(self, model: torch.nn.Module) -> dict[str, float]:
        FolderEngine.syncs += 1
        return super().sync_weights(model)


FOLDER_ENGINE = ["rollout=vllm", f"rollout._target_={__name__}.FolderEngine"]


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_fit_saves_a_folder_for_a_random_init_policy(tmp_path):
    """smoke + rollout=vllm: the initial model and the run's tokenizer are saved as <run_dir>/engine_init, the
    engine is pointed at it, and it is built only when first used (a partial)."""
    FolderEngine.folders.clear()
    cfg = _compose("experiment=smoke", f"run_dir={tmp_path}", *FOLDER_ENGINE)
    assert cfg.rollout.model_path is None
    _, datamodule, evaluation = build_fit(cfg)
    folder = tmp_path / ENGINE_FOLDER
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    factory = datamodule.sampler._engine_or_factory
    assert isinstance(factory, functools.partial) and factory.keywords["model_path"] == str(folder)
    assert FolderEngine.folders == []  # not built yet
    assert isinstance(datamodule.sampler.engine, FolderEngine) and evaluation.sampler is datamodule.sampler
    assert FolderEngine.folders == [(str(folder), None)]
    initial = load_model(instantiate(cfg.model))
    saved = _state(folder)
    for name, tensor in initial.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], tensor), name
    assert not list(tmp_path.glob(f"{ENGINE_FOLDER}.partial-*"))


def test_a_refused_configuration_saves_no_folder(tmp_path):
    cfg = _compose("experiment=smoke", f"run_dir={tmp_path}", *FOLDER_ENGINE, "algorithm.num_answers=1")
    with pytest.raises(ConfigError, match="num_answers"):
        build_fit(cfg)
    assert not (tmp_path / ENGINE_FOLDER).exists()


def test_fit_uses_the_policys_own_folder_or_the_given_one(tmp_path):
    """A pretrained policy's folder is the engine's (nothing saved); an explicit rollout.model_path stays."""
    spec = ModelSpec(tokenizer="char:0123456789+-*=", config={"hidden_size": 64, "num_heads": 2, "num_layers": 1})
    base = save_hf_folder(load_model(spec), load_tokenizer(spec), tmp_path / "base")
    pretrained = ["~model.config", f"+model.pretrained={base}", "model.tokenizer=null"]
    cfg = _compose("experiment=smoke", f"run_dir={tmp_path / 'run'}", *FOLDER_ENGINE, *pretrained)
    _, datamodule, _ = build_fit(cfg)
    assert datamodule.sampler._engine_or_factory.keywords["model_path"] == str(base)
    assert not (tmp_path / "run" / ENGINE_FOLDER).exists()
    cfg = _compose("experiment=smoke", f"run_dir={tmp_path / 'run2'}", *FOLDER_ENGINE, f"rollout.model_path={base}")
    _, datamodule, _ = build_fit(cfg)
    assert datamodule.sampler._engine_or_factory.keywords["model_path"] == str(base)
    assert not (tmp_path / "run2" / ENGINE_FOLDER).exists()
    # the HF engine needs no folder: nothing is written
    _, datamodule, _ = build_fit(_compose("experiment=smoke", f"run_dir={tmp_path / 'run3'}"))
    assert isinstance(datamodule.sampler.engine, HFGenerateEngine) and not (tmp_path / "run3").exists()


def test_validate_exports_a_random_init_checkpoint_for_the_engine(tmp_path):
    """validate ckpt_path=<random-init run> rollout=vllm: the checkpoint's weights (not the initial model's) are
    what the engine's folder holds, and the evaluation runs through that engine."""
    FolderEngine.folders.clear()
    cfg = _compose("experiment=smoke", f"run_dir={tmp_path / 'run'}")
    module = instantiate(cfg.module, _convert_="object")
    module.configure_model()
    with torch.no_grad():
        module.model.lm_head.weight.add_(1.0)  # a "trained" policy, unlike the initial model
    ckpt = tmp_path / "last.ckpt"
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.save({"nft_lit_config": config, "state_dict": module.state_dict(), "global_step": 1}, ckpt)
    vcfg = _compose("experiment=smoke", f"run_dir={tmp_path / 'val'}", f"ckpt_path={ckpt}", *FOLDER_ENGINE)
    vcfg.eval.out = str(tmp_path / "val" / "validate.json")
    results = run_validate(vcfg)
    folder = tmp_path / "val" / ENGINE_FOLDER
    assert FolderEngine.folders == [(str(folder), None)]
    assert torch.equal(_state(folder)["model.embed_tokens.weight"], module.model.lm_head.weight)
    assert 0.0 <= results["heldout/avg@1"] <= 1.0


SMOKE_LIGHTNING_CLI = CONFIG_DIR / "lightning_cli" / "smoke.yaml"


def test_lightning_cli_gives_the_engine_a_folder(tmp_path, monkeypatch):
    """`nft-lit cli fit --data.sampler.init_args.engine <folder engine>`: the smoke's random-init policy is saved
    under trainer.default_root_dir, as `nft-lit fit` saves it under the run dir."""
    from nft_lit.cli import main

    monkeypatch.setattr("sys.argv", ["nft-lit"])  # LightningCLI warns when pytest's own arguments are there
    FolderEngine.folders.clear()
    syncs = FolderEngine.syncs
    root = tmp_path / "logs"
    args = ["--config", str(SMOKE_LIGHTNING_CLI), "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1"]
    engine = ["--data.sampler.init_args.engine", f"{__name__}.FolderEngine"]
    assert main(["cli", "fit", *args, *engine, "--data.max_gen_rounds", "1"]) == 0
    assert FolderEngine.folders == [(str(root / ENGINE_FOLDER), None)]
    assert (root / ENGINE_FOLDER / "model.safetensors").is_file()
    assert FolderEngine.syncs > syncs  # the run sampled through it
