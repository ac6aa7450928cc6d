"""Compose every config of every group; instantiate what can be built offline; bad values fail by name."""

import pytest
from _data_marks import needs_data
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nft_lit.compose import CONFIG_DIR, ConfigError, build_fit, check_config
from nft_lit.losses import NFTLoss

ALGORITHMS = sorted(p.stem for p in (CONFIG_DIR / "algorithm").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml"))
REWARDS = sorted(p.stem for p in (CONFIG_DIR / "reward").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        # ${hydra:runtime.output_dir} needs a running Hydra job; tests give the run dir explicitly.
        return compose("train", overrides=["run_dir=/tmp/nft-lit-test-configs", *overrides])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_smoke_with_every_algorithm_instantiates_module_and_loss(algorithm):
    cfg = _compose("experiment=smoke", f"algorithm={algorithm}")
    if algorithm == "dapo":  # DAPO's overlong buffer must fit the smoke's 3-token answers
        cfg.algorithm.overlong_buffer = 2
    check_config(cfg)
    module = instantiate(cfg.module, _convert_="object")
    assert type(module.loss_fn).__name__ == OmegaConf.select(cfg, "algorithm.loss._target_").rsplit(".", 1)[1]
    module.configure_model()
    assert module.model.config.vocab_size == 16
    sampling = instantiate(cfg.sampling)
    assert sampling.max_new_tokens == 3


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_passes_the_checks(experiment):
    cfg = _compose(f"experiment={experiment}")
    check_config(cfg)
    assert cfg.datamodule.num_answers == cfg.algorithm.num_answers
    instantiate(cfg.algorithm.loss)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_every_experiment_runs_with_either_engine_by_one_override(experiment, engine):
    """`rollout=<engine>` composes with every experiment and the engine takes every option the composed node
    gives it: no engine's option leaks from an experiment file. Nothing is loaded (the vLLM engine is a
    partial, built at the first sync once its folder is filled in). The paper set-ups tune vLLM itself."""
    import functools
    import inspect

    from nft_lit.rollout import HFGenerateEngine, VLLMEngine

    if engine == "hf" and experiment in {"paper_7b", "paper_32b", "eps_sweep", "omega_sweep"}:
        pytest.skip("a vLLM set-up: its rollout options are vLLM's")
    cfg = _compose(f"experiment={experiment}", f"rollout={engine}")
    check_config(cfg)
    built = instantiate(cfg.rollout, _convert_="object")
    if engine == "vllm":
        assert isinstance(built, functools.partial) and built.func is VLLMEngine
        inspect.signature(VLLMEngine).bind(**built.keywords)  # TypeError on an option it does not take
        assert cfg.rollout.model_path is None  # the policy's folder, filled in by `fit` / `validate`
    else:
        assert isinstance(built, HFGenerateEngine)
    instantiate(cfg.sampling)


def test_paper_7b_has_the_paper_hyperparameters():
    cfg = _compose("experiment=paper_7b")
    assert cfg.datamodule.prompts_per_step == 512 and cfg.algorithm.num_answers == 16
    assert cfg.datamodule.num_mini_batches == 16 and cfg.module.lr == 1e-6 and cfg.module.warmup_steps == 10
    assert cfg.sampling.max_new_tokens == 3584
    cfg32 = _compose("experiment=paper_32b")
    assert cfg32.sampling.max_new_tokens == 14336 and cfg32.eval.temperature == 0.6
    assert cfg32.model.pretrained == "Qwen/Qwen2.5-32B" and cfg.model.pretrained == "Qwen/Qwen2.5-Math-7B"


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_config_composes(trainer):
    cfg = _compose("experiment=smoke", f"trainer={trainer}")
    assert cfg.trainer.reload_dataloaders_every_n_epochs == 1
    assert cfg.trainer.use_distributed_sampler is False
    if trainer == "cpu":
        t = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert t.max_epochs == cfg.iterations


@pytest.mark.parametrize("reward", REWARDS)
def test_every_reward_config_instantiates_a_verifier(reward):
    cfg = _compose("experiment=smoke", f"reward={reward}")
    verifier = instantiate(cfg.reward.verifier)
    result = verifier.score(["12"], ["12"], [False])
    assert result.rewards == [1.0]
    getattr(verifier, "close", lambda: None)()


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        (["algorithm.loss.epsilon=0"], "epsilon"),
        (["algorithm.loss.epsilon=-1"], "epsilon"),
        (["algorithm.num_answers=1"], "algorithm.num_answers"),
        (["algorithm=grpo", "algorithm.num_answers=1"], "algorithm.num_answers"),
        (["algorithm.overlong_buffer=2"], "algorithm.overlong_buffer"),
        (["algorithm=rft", "algorithm.overlong_buffer=2"], "algorithm.overlong_buffer"),
        (["algorithm.dynamic_sampling=false"], "algorithm.dynamic_sampling"),
        (["algorithm.loss._target_=nft_lit.rollout.SamplingParams"], "algorithm.loss._target_"),
        (["+data.data_dir=/does/not/exist"], "data.data_dir"),
        (["algorithm=infonca", "datamodule.whole_groups=false"], "datamodule.whole_groups"),
        (["datamodule.num_mini_batches=0"], "datamodule.num_mini_batches"),
        (["sampling.temperature=0"], "sampling.temperature"),
        (["algorithm=dapo"], r"algorithm.overlong_buffer=512 must be in (0, sampling.max_new_tokens=3]"),
        (["rollout=vllm", "rollout.tensor_parallel_size=2"], "rollout.tensor_parallel_size=2"),
        (["seed=abc"], "seed='abc': expected an integer"),
        (["iterations=0"], "iterations=0: expected an integer >= 1"),
        (["eval.every_n_iterations=0"], "eval.every_n_iterations=0: expected an integer >= 1"),
        (["eval.num_samples=0"], "eval.num_samples=0: expected an integer >= 1 or null"),
        (["ckpt_path="], "ckpt_path is empty"),
        (["datamodule.max_prompt_tokens=2"], "more than datamodule.max_prompt_tokens=2"),
        (["trainer=cpu_fsdp2", "datamodule.gen_prompts_per_round=33"], "gen_prompts_per_round=33 must be a multiple"),
        (["datamodule.max_logprob_gap=abc"], "datamodule.max_logprob_gap='abc'"),
        (["datamodule.max_logprob_gap=-1"], "datamodule.max_logprob_gap=-1"),
    ],
)
def test_bad_configuration_fails_at_start_naming_the_option(overrides, option):
    """Every rule is checked once, by the object that takes the value, when `nft-lit fit` builds the run."""
    cfg = _compose("experiment=smoke", *overrides)
    with pytest.raises(ConfigError, match=option.replace(".", r"\.").replace("(", r"\(").replace("]", r"\]")):
        build_fit(cfg)


class UserLoss(NFTLoss):
    """A loss written outside the package (NFT's knobs, another class)."""


def test_a_new_loss_needs_no_registration():
    """Adding a loss is one class plus one YAML: any PolicyLoss subclass is accepted by its _target_."""
    cfg = _compose("experiment=smoke", "algorithm.name=my_variant", "algorithm.loss._target_=test_configs.UserLoss")
    module, _, _ = build_fit(cfg)
    assert type(module.loss_fn).__name__ == "UserLoss"


def test_fit_shares_one_sampler_between_rollouts_and_evaluation():
    _, datamodule, evaluation = build_fit(_compose("experiment=smoke"))
    assert evaluation is not None and evaluation.sampler is datamodule.sampler
    assert [b.name for b in evaluation.benchmarks] == ["heldout"]
    assert evaluation.benchmarks[0].sampling.temperature == 0.0


def test_unknown_algorithm_group_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="algorithm"):
        _compose("experiment=smoke", "algorithm=ppo")


def test_missing_data_file_fails_naming_the_data_dir(tmp_path):
    cfg = _compose("data=math500", f"data.data_dir={tmp_path}")
    with pytest.raises(InstantiationException, match=r"data\.data_dir"):
        instantiate(cfg.data.problems)


def test_validate_benchmarks_follow_each_data_config_protocol():
    from nft_lit.compose import build_benchmarks

    cfg = _compose("experiment=paper_7b")  # AIME/AMC avg@32, the rest avg@1, top-p 0.7, T 1.0
    benches = {b.name: b for b in build_benchmarks(cfg, fallback_to_data=True)}
    assert set(benches) == {"aime24", "aime25", "amc23", "math500", "olympiadbench", "minerva_math"}
    assert benches["aime24"].num_samples == 32 and len(benches["aime24"].problems) == 30
    assert benches["math500"].num_samples == 1 and len(benches["math500"].problems) == 500
    assert all(b.sampling.top_p == 0.7 and b.sampling.temperature == 1.0 for b in benches.values())
    cfg32 = _compose("experiment=paper_32b", "eval.benchmarks=[amc23]", "eval.pass_k=[1,16,64]")
    (amc,) = build_benchmarks(cfg32, fallback_to_data=True)
    assert amc.sampling.temperature == 0.6 and amc.sampling.max_new_tokens == 14336 and amc.pass_k == (1, 16)
    single = build_benchmarks(_compose("data=math500", "eval.num_samples=4"), fallback_to_data=True)
    assert [(b.name, b.num_samples) for b in single] == [("math500", 4)]
    assert build_benchmarks(_compose("data=math500"), fallback_to_data=False) == []  # fit: nothing to evaluate
    with pytest.raises(ConfigError, match=r"eval\.benchmarks: no data config 'nope'"):
        build_benchmarks(_compose("eval.benchmarks=[nope]"), fallback_to_data=True)


@needs_data
def test_gsm8k_trains_on_train_and_is_evaluated_on_test():
    from nft_lit.compose import build_benchmarks

    cfg = _compose("data=gsm8k")
    assert cfg.data.problems.split == "train"
    (bench,) = build_benchmarks(cfg, fallback_to_data=True)
    assert bench.name == "gsm8k" and len(bench.problems) == 1319  # the test split


LAUNCH_SHAPES = [(1, 1), (1, 2), (2, 1), (2, 2), (4, 8)]  # (nodes, devices per node)


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_parallel_sizes_follow_the_launch(experiment, trainer):
    """Every trainer config has `num_nodes`, and a sharded one sizes its data-parallel mesh from the launch:
    data_parallel_size x tensor_parallel_size = num_nodes x devices, for any shape, without launching."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    for nodes, devices in LAUNCH_SHAPES:
        cfg = _compose(
            f"experiment={experiment}", f"trainer={trainer}", f"trainer.num_nodes={nodes}", f"trainer.devices={devices}"
        )
        check_config(cfg)
        strategy = cfg.trainer.strategy
        if strategy == "auto":  # one process per device, Lightning's choice of strategy
            assert cfg.trainer.num_nodes == nodes
            continue
        built = instantiate(strategy)
        assert isinstance(built, ModelParallelStrategy)
        assert built._data_parallel_size * built._tensor_parallel_size == nodes * devices, (nodes, devices)


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        (["trainer.strategy.tensor_parallel_size=3"], {}, "tensor_parallel_size=3 does not divide the world size 2"),
        (["trainer.num_nodes=2"], {"WORLD_SIZE": "2", "RANK": "0"}, r"launcher started 2 processes .* = 4"),
        (["trainer.devices=0"], {}, r"trainer\.devices=0: expected at least 1"),
    ],
)
def test_sizes_that_do_not_fit_the_launch_fail_at_start_in_one_line(monkeypatch, overrides, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = _compose("experiment=smoke", "trainer=cpu_fsdp2", *overrides)
    with pytest.raises(ConfigError, match=message) as raised:
        check_config(cfg)
    assert "\n" not in str(raised.value)
