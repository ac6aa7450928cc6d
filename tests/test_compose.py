"""The composition root: every front end builds its Sampler from the same options, so a Sampler option
(`sampler.chunk_prompts`) reaches the Sampler in `fit`, `validate`, the in-band screen and the LightningCLI."""

import argparse
from pathlib import Path

from hydra import compose, initialize_config_dir

from nft_lit import band, lightning_cli
from nft_lit.compose import CONFIG_DIR, build_fit, build_validation
from nft_lit.models import ModelSpec, build_char_tokenizer, load_model, save_hf_folder
from nft_lit.synthetic import arithmetic_problems

CHUNK = 3


def _compose(tmp_path: Path, *overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"run_dir={tmp_path}", "experiment=smoke", *overrides])


def test_fit_builds_the_sampler_from_the_sampler_node(tmp_path):
    _, datamodule, evaluation = build_fit(_compose(tmp_path, f"sampler.chunk_prompts={CHUNK}"))
    assert datamodule.sampler.chunk_prompts == CHUNK
    assert evaluation.sampler is datamodule.sampler  # one sampler for rollouts and the held-out curve


def test_validate_builds_the_sampler_from_the_sampler_node(tmp_path):
    """`nft-lit validate sampler.chunk_prompts=N` used to build its own Sampler without the option."""
    built = build_validation(_compose(tmp_path, f"sampler.chunk_prompts={CHUNK}"), prompt_from_command_line=False)
    assert built.evaluation.sampler.chunk_prompts == CHUNK


def test_the_in_band_screen_builds_the_sampler_from_the_sampler_node(tmp_path):
    alphabet = "0123456789+="
    spec = ModelSpec(tokenizer=f"char:{alphabet}", config={"hidden_size": 32, "num_layers": 1, "num_heads": 1})
    tokenizer = build_char_tokenizer(alphabet)
    folder = save_hf_folder(load_model(spec, tokenizer), tokenizer, tmp_path / "model")
    args = argparse.Namespace(
        model=str(folder),
        prompt="plain",
        template=None,
        reward="exact_match",
        engine="hf",
        chunk_prompts=CHUNK,
        batch_prompts=4,
        samples=2,
        max_new_tokens=3,
        seed=0,
    )
    sampler, policy = band._build_sampler(args, list(arithmetic_problems(size=4, digits=1).problems))
    assert sampler.chunk_prompts == CHUNK and policy is not None


def test_the_lightning_cli_passes_the_option_to_the_sampler(tmp_path):
    config = CONFIG_DIR / "lightning_cli" / "smoke.yaml"
    cli = lightning_cli.build(
        ["--config", str(config), "--data.sampler.init_args.chunk_prompts", str(CHUNK)], run=False
    )
    assert cli.datamodule.sampler.chunk_prompts == CHUNK
