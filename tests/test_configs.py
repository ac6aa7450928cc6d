"""Compose every config of every group; instantiate what can be built offline; bad values fail by name."""

import re

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


HEADER_MAX_LINES = 6  # what the file is, the command that runs it, a pointer to the docs (`# @package` not counted)
COMMENT_MAX_CHARS = 120
_QUOTED = re.compile(r'"(?:\\.|[^"\\])*"|\'[^\']*\'')


def _inline_comment(line: str) -> bool:
    return re.search(r"\s#", _QUOTED.sub("", line)) is not None


def _comment_layout_problems(name: str, text: str) -> list[str]:
    """Where a config's comments break "one line per value": a header longer than HEADER_MAX_LINES; after it, a
    comment line that is not directly above the key it describes (same indentation; a run of comment lines, a
    continuation of an inline comment, a comment before a blank line) or above a key with its own inline comment;
    a comment line or commented value line longer than COMMENT_MAX_CHARS."""
    lines = text.splitlines()
    end = 0
    while end < len(lines) and lines[end].startswith("#"):
        end += 1
    problems = []
    header = [line for line in lines[:end] if not line.startswith("# @package")]
    if len(header) > HEADER_MAX_LINES:
        problems.append(f"{name}: a header of {len(header)} comment lines (at most {HEADER_MAX_LINES})")
    for i, line in enumerate(lines):
        comment = line.lstrip().startswith("#")
        if (comment or _inline_comment(line)) and len(line) > COMMENT_MAX_CHARS:
            problems.append(f"{name}:{i + 1}: {len(line)} characters (at most {COMMENT_MAX_CHARS})")
        if not comment or i < end:
            continue
        below = lines[i + 1] if i + 1 < len(lines) else ""
        indent = len(line) - len(line.lstrip())
        if (
            not below.strip()
            or below.lstrip().startswith("#")
            or len(below) - len(below.lstrip()) != indent
            or _inline_comment(below)
        ):
            problems.append(f"{name}:{i + 1}: not one line directly above the value it describes: {line.strip()}")
    return problems


def test_config_comments_say_in_one_line_what_each_value_is():
    """Configs say in one line what a value is and why; measurements and their dates live in docs/RESULTS.md.
    A YAML under configs/ may open with a short header; after it a value's comment is inline on its line or one
    full line directly above its key (not both), and no comment line runs past 120 characters."""
    problems = [
        p
        for path in sorted(CONFIG_DIR.rglob("*.yaml"))
        for p in _comment_layout_problems(str(path.relative_to(CONFIG_DIR)), path.read_text(encoding="utf-8"))
    ]
    assert not problems, "\n".join(problems)
    good = '# @package _global_\n# What it is.\n#   nft-lit fit experiment=x\na: 1  # why\n# why b\nb:\n  c: "#1"\n'
    assert _comment_layout_problems("good", good) == []
    bad = {
        "header": "#\n" * 7 + "a: 1\n",
        "run": "a: 1\n# one\n# two\nb: 2\n",
        "continuation": "a: 1    # one\n        # two\nb: 2\n",
        "both": "a: 0\n# one\nb: 1  # two\n",
        "dangling": "a: 1\n# one\n\nb: 2\n",
        "long": "a: 1  # " + "x" * 120 + "\n",
    }
    for case, text in bad.items():
        assert len(_comment_layout_problems(case, text)) == 1, case
