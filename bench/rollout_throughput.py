"""Rollout throughput on CPU: HF generate vs colocated vLLM, at ~1M and ~30M parameters.

K = 8 answers per prompt, up to 64 new tokens, temperature 1. Reports generated tokens/s (tokens actually
sampled, EOS included; random models stop at EOS at random) and the vLLM weight-sync time per update.
Each (size, engine) runs in its own subprocess so a vLLM instance never outlives its measurement.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 .venv/bin/python bench/rollout_throughput.py [--quick]

Writes bench/results/rollout_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import meta, print_table, run_worker, write_json

SIZES = {
    # name: tiny_causal_lm arguments (head size >= 32 for vLLM's CPU attention)
    "1M": {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "intermediate_size": 512},
    "30M": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 2048},
}
ALPHABET = "0123456789+-*="
K = 8
NEW_TOKENS = 64


def measure(size: str, engine_name: str, num_prompts: int, repeats: int) -> dict[str, float]:
    import torch

    from nft_lit.models import build_char_tokenizer, save_hf_folder, tiny_causal_lm
    from nft_lit.rollout import HFGenerateEngine, SamplingParams, VLLMEngine

    tokenizer = build_char_tokenizer(ALPHABET)
    model = tiny_causal_lm("qwen2", vocab_size=len(tokenizer), seed=0, **SIZES[size])
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    prompts = [
        tokenizer(f"{a:03d}+{b:03d}=").input_ids
        for a, b in torch.randint(0, 1000, (num_prompts, 2), generator=gen).tolist()
    ]
    start = time.perf_counter()
    if engine_name == "hf":
        engine = HFGenerateEngine(batch_size=num_prompts * K)
    else:
        folder = save_hf_folder(model, tokenizer, tempfile.mkdtemp(prefix="nft_bench_"))
        engine = VLLMEngine(str(folder), dtype="float32", max_model_len=128, max_num_seqs=num_prompts * K)
    startup = time.perf_counter() - start
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, seed=0)
    engine.sync_weights(model)
    engine.generate(prompts, K, sampling)  # warm-up: first-call allocation and kernel selection
    tokens, seconds, syncs = 0, 0.0, []
    for r in range(repeats):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=gen))  # an "update" to sync
        syncs.append(engine.sync_weights(model)["sync/seconds"])
        start = time.perf_counter()
        batch = engine.generate(prompts, K, SamplingParams(max_new_tokens=NEW_TOKENS, seed=r))
        seconds += time.perf_counter() - start
        tokens += sum(len(ids) for ids in batch.response_ids)
    return {
        "size": size,
        "engine": engine_name,
        "params": params,
        "prompts": num_prompts,
        "answers_per_generate": num_prompts * K,
        "tokens_per_s": tokens / seconds,
        "mean_tokens_per_answer": tokens / (repeats * num_prompts * K),
        "generate_s": seconds / repeats,
        "sync_s": sum(syncs) / len(syncs),
        "startup_s": startup,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer prompts and repeats (< 2 min)")
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rollout_throughput.json")
    parser.add_argument("--worker", nargs=4, metavar=("SIZE", "ENGINE", "PROMPTS", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        size, engine, prompts, repeats = args.worker
        args.worker_out.write_text(json.dumps(measure(size, engine, int(prompts), int(repeats))))
        return 0
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ("hf", "vllm")]
    if bad:
        parser.error(f"--engines: unknown {bad}; expected hf and/or vllm")
    num_prompts, repeats = (4, 1) if args.quick else (16, 3)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the workers inherit it: vLLM in-process
    rows = []
    for size in SIZES:
        for engine in engines:
            rows.append(run_worker(Path(__file__), ["--worker", size, engine, str(num_prompts), str(repeats)], 900))
            print(f"done {size}/{engine}", file=sys.stderr)
    print_table(
        rows,
        [
            ("size", "size", ""),
            ("engine", "engine", ""),
            ("params", "params", ","),
            ("answers_per_generate", "answers", "d"),
            ("tokens_per_s", "tok/s", ".0f"),
            ("mean_tokens_per_answer", "tok/ans", ".1f"),
            ("generate_s", "gen s", ".3f"),
            ("sync_s", "sync s", ".4f"),
            ("startup_s", "start s", ".1f"),
        ],
    )
    info = meta(quick=args.quick, k=K, max_new_tokens=NEW_TOKENS, omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    write_json(args.out, {"meta": info, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
