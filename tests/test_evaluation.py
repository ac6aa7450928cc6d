import math

import pytest
import torch
from _rollout_fakes import FakeProblem, FakeSampling, make_sampler

from nft_lit.evaluation import AvgAtK, Benchmark, Evaluation, PassAtK, pass_at_k, write_results


def test_pass_at_k_matches_combinatorial_definition():
    # n=4 samples, c=1 correct: P(at least one of 2 draws without replacement is correct) = 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert pass_at_k(4, 0, 3) == 0.0
    assert pass_at_k(4, 2, 3) == 1.0  # fewer than k wrong answers: always passes
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # pass@1 = mean correctness
    with pytest.raises(ValueError, match="k=5, n=4"):
        pass_at_k(4, 1, 5)


def test_avg_and_pass_metrics_accumulate_over_updates():
    avg, p2 = AvgAtK(), PassAtK(2)
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    for batch in (a, b):
        avg.update(batch)
        p2.update(batch)
    assert float(avg.compute()) == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert float(p2.compute()) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError, match="problems, samples"):
        avg.update(torch.ones(3))


def test_benchmark_rejects_pass_k_above_samples():
    with pytest.raises(ValueError, match="pass_k value 8"):
        Benchmark("b", [FakeProblem("1", "1+1=", "2")], FakeSampling(), num_samples=4, pass_k=(8,))


def test_evaluation_per_benchmark_and_average(tmp_path):
    sampler = make_sampler()
    probs = [FakeProblem(str(i), f"{i}+{i}=", str(2 * i)) for i in range(10)]
    sampling = FakeSampling(seed=3)
    benches = [Benchmark("a", probs[:6], sampling, 4, (1, 4)), Benchmark("b", probs[6:], sampling, 1)]
    res = Evaluation(benches, sampler, batch_prompts=4).run(policy=object())
    assert sampler.engine.syncs == 1  # the policy reached the engine before sampling
    # Recompute avg@4 of "a" by hand from the same deterministic engine.
    tok = sampler.tokenizer
    out = sampler.engine.generate([tok.encode(p.question, add_special_tokens=False) for p in probs[:6]], 4, sampling)
    texts = [tok.decode(r, skip_special_tokens=True) for r in out.response_ids]
    manual = sampler.verifier.score(texts, ["x"] * len(texts), out.truncated).rewards
    assert res["a/avg@4"] == pytest.approx(sum(manual) / len(manual))
    assert res["a/pass@1"] == pytest.approx(res["a/avg@4"])
    assert res["a/pass@4"] >= res["a/avg@4"]
    assert res["average/avg"] == pytest.approx((res["a/avg@4"] + res["b/avg@1"]) / 2)
    path = write_results(res, tmp_path / "r.json", {"ckpt_path": "x"})
    import json

    data = json.loads(path.read_text())
    assert data["ckpt_path"] == "x" and math.isclose(data["results"]["a/avg@4"], res["a/avg@4"])
