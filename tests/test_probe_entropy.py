"""The probe entropy (issue "Comparisons that resolve", item 4): the policy's mean next-token entropy on a fixed
set of teacher-forced gold answers, measured with every held-out evaluation (``evaluation.ProbeEntropy``)."""

import csv
import hashlib
import math
import os
import subprocess
import sys

import pytest
import torch
from _rollout_fakes import FakeProblem, FakeSampling, addition_problems, make_sampler
from omegaconf import OmegaConf
from test_runs import SMOKE, TESTS

from nft_lit.evaluation import Benchmark, Evaluation, ProbeEntropy
from nft_lit.metrics import PROBE_ENTROPY, PROBE_ENTROPY_SEQUENCE_MEAN, PROBE_SECONDS
from nft_lit.models import build_char_tokenizer, tiny_causal_lm
from nft_lit.prompts import PromptTemplate, encode_prompt
from nft_lit.rollout import HFGenerateEngine, SamplingParams

ALPHABET = "0123456789+="
# questions and answers of different lengths, so the batches have left-padded prompts and right-padded answers
PROBLEMS = [
    FakeProblem("a", "1+2", "3"),
    FakeProblem("b", "12+34", "46"),
    FakeProblem("c", "7+8", "15"),
    FakeProblem("d", "123+456", "579"),
    FakeProblem("e", "9+9", "18"),
]
TEMPLATE = PromptTemplate(suffix="=")  # "1+2" -> "1+2="


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(ALPHABET)


@pytest.fixture
def model(tok):
    return tiny_causal_lm(
        vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3
    ).train()


def _hand_entropies(model, tok, problems, temperature):
    """Per problem, the entropies of the answer positions: one unpadded sequence at a time, float64."""
    out = []
    for p in problems:
        prompt = tok.encode(TEMPLATE.render(p.question), add_special_tokens=True)
        answer = [*tok.encode(p.answer, add_special_tokens=False), tok.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].double()
        rows = logits[len(prompt) - 1 : len(prompt) + len(answer) - 1] / temperature  # predict each answer token
        probs = torch.softmax(rows, -1)
        out.append([float(-(q * q.log()).sum()) for q in probs])
    return out


def test_probe_is_prompt_plus_gold_answer_plus_eos_encoded_as_the_sampler_encodes(tok):
    probe = ProbeEntropy(PROBLEMS, tok, TEMPLATE, temperature=1.0)
    sampler = make_sampler(prompt_template=TEMPLATE)
    assert probe.prompt_ids == [sampler.encode(p.question) for p in PROBLEMS]
    assert probe.prompt_ids[0] == encode_prompt("1+2", TEMPLATE, tok)
    assert probe.answer_ids[3] == [tok.convert_tokens_to_ids(c) for c in "579"] + [tok.eos_token_id]
    assert ProbeEntropy.from_sampler(sampler, PROBLEMS, 1.0).answer_ids == probe.answer_ids


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_probe_entropy_equals_a_hand_computation(model, tok, temperature):
    hand = _hand_entropies(model, tok, PROBLEMS, temperature)
    result = ProbeEntropy(PROBLEMS, tok, TEMPLATE, temperature, batch_size=2).measure(model)
    tokens = [h for seq in hand for h in seq]
    assert result.tokens == len(tokens) == 2 + 3 + 3 + 4 + 3 and result.sequences == len(PROBLEMS)
    assert result.token_mean == pytest.approx(sum(tokens) / len(tokens), abs=1e-5)
    assert result.sequence_mean == pytest.approx(sum(sum(s) / len(s) for s in hand) / len(hand), abs=1e-5)
    assert result.token_mean != pytest.approx(result.sequence_mean, abs=1e-7)  # two different averages
    assert 0 < result.token_mean < math.log(len(tok)) and result.seconds > 0
    # the batch layout moves only rounding
    whole = ProbeEntropy(PROBLEMS, tok, TEMPLATE, temperature, batch_size=64).run(model)
    assert whole == pytest.approx(result.token_mean, abs=1e-5)


def _weights_hash(model) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode() + value.numpy().tobytes())
    return h.hexdigest()


def test_probe_entropy_is_deterministic_and_draws_no_random_number(model, tok):
    probe = ProbeEntropy(PROBLEMS, tok, TEMPLATE, temperature=1.0, batch_size=2)
    weights, rng = _weights_hash(model), torch.get_rng_state()
    first = probe.run(model)
    assert probe.run(model) == first  # bit for bit
    assert torch.equal(torch.get_rng_state(), rng)  # the training's random stream is untouched
    assert _weights_hash(model) == weights and model.training  # no update, train mode restored
    assert all(p.grad is None for p in model.parameters())


def test_probe_entropy_does_not_change_with_answer_sampling(model, tok):
    """The probe's text is fixed: whatever the policy samples between two measurements, same weights give the same
    number (unlike train/entropy, which is measured on the sampled answers)."""
    probe = ProbeEntropy(PROBLEMS, tok, TEMPLATE, temperature=1.0, batch_size=2)
    before = probe.run(model)
    engine = HFGenerateEngine(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    engine.sync_weights(model)
    prompts = [encode_prompt(p.question, TEMPLATE, tok) for p in PROBLEMS]
    lengths = set()
    for seed, max_new in ((0, 2), (1, 8), (None, 8)):  # short and long answers, seeded and not
        batch = engine.generate(prompts, 4, SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=seed))
        lengths.add(sum(len(r) for r in batch.response_ids))
        assert probe.run(model) == before
    assert len(lengths) > 1


def test_flatter_logits_raise_the_probe_entropy(model, tok):
    by_temperature = [ProbeEntropy(PROBLEMS, tok, TEMPLATE, t).run(model) for t in (0.5, 1.0, 2.0, 100.0)]
    assert by_temperature == sorted(by_temperature) and len(set(by_temperature)) == 4
    assert by_temperature[-1] == pytest.approx(math.log(len(tok)), abs=1e-3)  # near-uniform: log |V|
    # the same through the weights: a scaled-down output layer flattens every distribution
    probe = ProbeEntropy(PROBLEMS, tok, TEMPLATE, 1.0)
    before = probe.run(model)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(0.2)  # tied: the input embeddings shrink too
    assert probe.run(model) > before


def _fsdp2_probe(rank, world, out):
    """One rank: the test model sharded with FSDP2 as PolicyModule shards it; every rank computes the whole probe."""
    from torch.distributed.device_mesh import init_device_mesh

    from nft_lit.module import apply_fsdp2

    os.environ["OMP_NUM_THREADS"] = "1"
    # a file rendezvous: no TCP port to race other processes of the machine for
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        tok = build_char_tokenizer(ALPHABET)
        model = tiny_causal_lm(
            vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3
        ).train()
        apply_fsdp2([model], init_device_mesh("cpu", (world,)), reshard_after_forward=True)
        value = ProbeEntropy(PROBLEMS, tok, TEMPLATE, 1.0, batch_size=2).run(model)
        (out / f"{rank}.txt").write_text(repr(value))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_every_fsdp2_rank_measures_the_unsharded_value(model, tok, tmp_path):
    torch.multiprocessing.spawn(_fsdp2_probe, args=(2, tmp_path), nprocs=2)
    ranks = [float((tmp_path / f"{r}.txt").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0] == pytest.approx(ProbeEntropy(PROBLEMS, tok, TEMPLATE, 1.0, batch_size=2).run(model), abs=1e-5)


def test_probe_rejects_what_cannot_work(tok):
    with pytest.raises(ValueError, match="no problem"):
        ProbeEntropy([], tok)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ProbeEntropy(PROBLEMS, tok, temperature=0.0)
    with pytest.raises(ValueError, match=r"eval\.probe_batch_size"):
        ProbeEntropy(PROBLEMS, tok, batch_size=0)


def _callbacks_cfg(tmp_path, **eval_keys):
    return OmegaConf.create(
        {
            "run_dir": str(tmp_path),
            "checkpoint": {"every_n_iterations": 1},
            "sampling": {"_target_": "nft_lit.rollout.SamplingParams", "temperature": 0.8, "max_new_tokens": 4},
            "eval": {"every_n_iterations": 2, "at_start": True, **eval_keys},
        }
    )


def test_build_callbacks_adds_the_probe_only_when_configured(tmp_path):
    from nft_lit.callbacks import HeldOutEvaluation
    from nft_lit.compose import ConfigError, build_callbacks

    evaluation = Evaluation([Benchmark("heldout", addition_problems(10), FakeSampling(), 1)], make_sampler())

    def held_out(cfg):
        return next(c for c in build_callbacks(cfg, evaluation) if isinstance(c, HeldOutEvaluation))

    assert held_out(_callbacks_cfg(tmp_path)).probe is None  # no key: off
    assert held_out(_callbacks_cfg(tmp_path, probe_size=0)).probe is None
    probe = held_out(_callbacks_cfg(tmp_path, probe_size=4, probe_batch_size=3)).probe
    questions = [p.question for p in addition_problems(10)[:4]]  # the set's first problems
    assert probe.prompt_ids == [evaluation.sampler.encode(q) for q in questions]
    assert (probe.temperature, probe.batch_size) == (0.8, 3)  # the training temperature
    assert len(held_out(_callbacks_cfg(tmp_path, probe_size=64)).probe) == 10  # all of a smaller set
    with pytest.raises(ConfigError, match="needs a held-out set"):
        build_callbacks(_callbacks_cfg(tmp_path, probe_size=4), None)
    with pytest.raises(ConfigError, match=r"eval\.probe_size"):
        build_callbacks(_callbacks_cfg(tmp_path, probe_size=-1), evaluation)


def _write_run(root, seed, probe):
    run = root / f"{seed}_seed={seed}"
    (run / ".hydra").mkdir(parents=True)
    (run / "csv").mkdir()
    (run / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nalgorithm: {{name: nft}}\neval: {{at_start: true}}\n")
    (run / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
    with open(run / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "val/heldout/avg@1", "train/entropy", *([PROBE_ENTROPY] if probe else [])])
        w.writerow([0, 0, 0.2, "", *([probe[0]] if probe else [])])
        w.writerow([0, 1, "", 0.4, *([""] if probe else [])])
        w.writerow([1, 2, "", 0.2, *([""] if probe else [])])
        w.writerow([1, 2, 0.5, "", *([probe[1]] if probe else [])])


def test_report_shows_the_probe_entropy_beside_the_sampled_answer_entropy(tmp_path):
    from nft_lit.report import load_run, report

    _write_run(tmp_path / "with", 0, (1.5, 1.75))
    _write_run(tmp_path / "with", 1, (1.25, 2.25))
    run = load_run(tmp_path / "with" / "0_seed=0")
    assert run.curves[PROBE_ENTROPY] == [(0, 1.5), (2, 1.75)]  # x: before training (0), after iteration 2
    table, pngs = report([tmp_path / "with"], tmp_path / "out")
    assert "| entropy first → last iteration | probe entropy first → last evaluation |" in table
    row = next(line for line in table.splitlines() if line.startswith("| nft |"))
    assert row.endswith("| 0.400 → 0.200 | 1.375 → 2.000 |")  # means over the seeds
    # a run without the probe: no column; its entropy.png has only the sampled-answer curve
    _write_run(tmp_path / "without", 0, None)
    _write_run(tmp_path / "without", 1, None)
    table, pngs_without = report([tmp_path / "without"], tmp_path / "out2")
    assert "probe" not in table
    entropy = [next(p for p in found if p.name == "entropy.png").read_bytes() for found in (pngs, pngs_without)]
    assert entropy[0] != entropy[1]  # the dashed probe curves
    assert [p.name for p in pngs] == [p.name for p in pngs_without]  # no PNG of its own


def _fit(run_dir, *overrides):
    cmd = [sys.executable, "-m", "nft_lit.cli", "fit", *SMOKE, "iterations=2", f"hydra.run.dir={run_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=TESTS.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _column(rows, key):
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.slow
def test_a_smoke_fit_logs_the_probe_entropy_and_trains_as_without_it(tmp_path):
    with_probe = _fit(tmp_path / "probe", "eval.probe_size=3")
    without = _fit(tmp_path / "plain")
    # measured with each held-out evaluation: before training and after iteration 2 (eval.every_n_iterations=2)
    entropy = _column(with_probe, PROBE_ENTROPY)
    assert len(entropy) == 2 == len(_column(with_probe, "val/heldout/avg@1"))
    assert all(0 < h < math.log(16) for h in entropy)  # the smoke run's char tokenizer: <pad>, <eos> and 14 chars
    assert len(_column(with_probe, PROBE_ENTROPY_SEQUENCE_MEAN)) == 2 and len(_column(with_probe, PROBE_SECONDS)) == 2
    assert PROBE_ENTROPY not in without[0]
    # no random number drawn and no weight touched: the training is the same to the bit
    for key in ("train/loss", "train/grad_norm", "train/entropy", "val/heldout/avg@1"):
        assert _column(with_probe, key) == _column(without, key), key
    from nft_lit.report import report

    table, pngs = report([tmp_path / "probe"], tmp_path / "report")
    assert "probe entropy first → last evaluation" in table and any(p.name == "entropy.png" for p in pngs)
