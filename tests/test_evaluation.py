import math

import pytest
import torch
from _rollout_fakes import FakeEngine, FakeProblem, FakeSampling, ParityVerifier

from nft_lit.evaluation import AvgAtK, Benchmark, PassAtK, evaluate_benchmarks, pass_at_k, write_results
from nft_lit.models import build_char_tokenizer


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
        Benchmark("b", [FakeProblem("1", "1+1=", "2")], num_samples=4, pass_k=(8,))


def test_evaluate_benchmarks_per_benchmark_and_average(tmp_path):
    tok = build_char_tokenizer("0123456789+=")
    engine = FakeEngine([tok.convert_tokens_to_ids(c) for c in "0123456789"], tok.eos_token_id)
    verifier = ParityVerifier()
    probs = [FakeProblem(str(i), f"{i}+{i}=", str(2 * i)) for i in range(10)]
    benches = [Benchmark("a", probs[:6], num_samples=4, pass_k=(1, 4)), Benchmark("b", probs[6:], num_samples=1)]
    res = evaluate_benchmarks(benches, engine, tok, None, verifier, FakeSampling(seed=3), batch_prompts=4)
    # Recompute avg@4 of "a" by hand from the same deterministic engine.
    out = engine.generate(
        [tok.encode(p.question, add_special_tokens=False) for p in probs[:6]], 4, FakeSampling(seed=3)
    )
    texts = [tok.decode(r, skip_special_tokens=True) for r in out.response_ids]
    manual = verifier.score(texts, ["x"] * len(texts), out.truncated).rewards
    assert res["a/avg@4"] == pytest.approx(sum(manual) / len(manual))
    assert res["a/pass@1"] == pytest.approx(res["a/avg@4"])
    assert res["a/pass@4"] >= res["a/avg@4"]
    assert res["average/avg"] == pytest.approx((res["a/avg@4"] + res["b/avg@1"]) / 2)
    path = write_results(res, tmp_path / "r.json", {"ckpt_path": "x"})
    import json

    data = json.loads(path.read_text())
    assert data["ckpt_path"] == "x" and math.isclose(data["results"]["a/avg@4"], res["a/avg@4"])
