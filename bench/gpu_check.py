"""GPU check (H100/H200, < 5 min): bf16 training-step tokens/s and MFU, loss kernels, HF generation throughput.

    .venv/bin/python bench/gpu_check.py               # Qwen2.5-0.5B-shaped random-init model, 2k context
    .venv/bin/python bench/gpu_check.py --quick       # 4 layers, 512 context: a fast look on the GPU
    .venv/bin/python bench/gpu_check.py --cpu-smoke   # tiny model on CPU: checks the harness (no numbers)
    .venv/bin/python bench/gpu_check.py --compile     # training step through torch.compile (adds compile time)

Without a CUDA GPU (and without --cpu-smoke) it prints why and exits 0 without measuring anything.

1. Training step: micro-batches of 4, 8 and 16 sequences of 2,048 tokens (512 prompt, the rest response)
   through the PolicyModule's own log-prob code
   (``nft_lit.module.response_logprobs_and_entropy``: float32 log-softmax and entropy over the vocab) and
   the NFT loss, backward, grad-norm clip and fused AdamW, all in bf16 weights (configs/trainer/gpu.yaml:
   bf16-true). Variants: SDPA and FlashAttention-2 (when ``flash_attn`` is installed), activation
   checkpointing off / on. MFU = model FLOPs / step time / peak dense bf16 FLOP/s of the card, with model
   FLOPs = (6·(N − V·d) + 12·L·d·T)·tokens + 6·V·d·(output columns) (PaLM appendix B: weights fwd+bwd
   plus attention scores, no causal halving; the tied output layer V·d runs only on the columns that
   predict response tokens, as the module computes no prompt logits; recomputation under checkpointing
   is not counted). Goal from the issue: MFU >= 40%. A variant that runs out
   of GPU memory is reported as such and the others go on. The card's achieved bf16 matmul rate
   (8192^3) is measured too, so MFU can be read against both the data sheet and what the card delivers.
2. Loss kernels: every algorithm's loss forward+backward at B=512 answers x T=4096 tokens
   (bench/loss_throughput.py's batch), tokens/s.
3. Generation: ``model.generate`` (HF, KV cache, sampling) of ``--gen-new`` tokens for ``--gen-batch``
   prompts, new tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import median, meta, no_gpu_message, print_table, write_json
from loss_throughput import ALGORITHMS, load_loss, make_batch

from nft_lit.losses import LossBatch, NFTLoss
from nft_lit.module import response_logprobs_and_entropy

# Peak dense bf16 tensor-core FLOP/s (vendor data sheets, SXM parts, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
GOAL_MFU = 0.40


@dataclass
class Shape:
    hidden: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    vocab: int = 151936
    seq: int = 2048
    prompt: int = 512
    micro_batches: tuple[int, ...] = (4, 8, 16)
    steps: int = 6
    warmup: int = 2
    loss_answers: int = 512
    loss_tokens: int = 4096
    loss_repeats: int = 5
    gen_batch: int = 64
    gen_prompt: int = 128
    gen_new: int = 256


QUICK = Shape(
    layers=4, seq=512, prompt=128, micro_batches=(4,), steps=3, warmup=1, loss_repeats=2, gen_batch=16, gen_new=64
)
CPU_SMOKE = Shape(
    hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=256, seq=64, prompt=16, micro_batches=(2,),
    steps=2, warmup=1, loss_answers=32, loss_tokens=64, loss_repeats=1, gen_batch=4, gen_prompt=8, gen_new=8,
)  # fmt: skip


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    return next((t * 1e12 for key, t in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: Shape, device: torch.device) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=max(shape.seq, shape.gen_prompt + shape.gen_new),
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    with device:
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    return model


def step_model_flops(model: Any, shape: Shape, micro_batch: int) -> float:
    """The work one training step needs, without recomputation (PaLM appendix B, see the module docstring)."""
    n_params = sum(p.numel() for p in model.parameters())
    output_layer = shape.vocab * shape.hidden  # tied: counted once in n_params
    tokens = micro_batch * shape.seq
    output_columns = micro_batch * (shape.seq - shape.prompt + 1)
    per_token = 6.0 * (n_params - output_layer) + 12.0 * shape.layers * shape.hidden * shape.seq
    return per_token * tokens + 6.0 * output_layer * output_columns


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Achieved dense bf16 matmul rate (n x n x n, random data): the practical ceiling of the card."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def train_batch(
    shape: Shape, micro_batch: int, device: torch.device, model: Any
) -> tuple[torch.Tensor, torch.Tensor, LossBatch]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, shape.vocab, (micro_batch, shape.seq), generator=gen).to(device)
    attention = torch.ones_like(ids)
    response = shape.seq - shape.prompt
    with torch.no_grad():
        old, _ = response_logprobs_and_entropy(model, ids, attention, shape.prompt, 1.0)
    rewards = torch.tensor([float(i % 2) for i in range(micro_batch)], device=device)  # mixed groups
    group_ids = torch.arange(micro_batch, device=device) // 2
    mask = torch.ones(micro_batch, response, device=device)
    return ids, attention, LossBatch.from_rewards(old.detach(), mask, rewards, group_ids)


def bench_train_step(
    model: Any, shape: Shape, device: torch.device, attn: str, checkpointing: bool, micro_batch: int, compile: bool
) -> dict:
    model.set_attn_implementation(attn)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    # Compiled: the model and the float32 log-softmax/entropy tail (a vocab-sized memory-bound pass) together.
    logprobs_fn = torch.compile(response_logprobs_and_entropy) if compile else response_logprobs_and_entropy
    loss_fn = NFTLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.1, fused=device.type == "cuda")
    ids, attention, batch = train_batch(shape, micro_batch, device, model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(shape.warmup + shape.steps):
        sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logprobs, _ = logprobs_fn(model, ids, attention, shape.prompt, 1.0)
        loss_fn(logprobs, batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sync(device)
        if step >= shape.warmup:
            times.append(time.perf_counter() - start)
    del optimizer
    model.zero_grad(set_to_none=True)
    seconds = median(times)
    tokens = micro_batch * shape.seq
    return {
        "attention": attn,
        "compiled": compile,
        "checkpointing": checkpointing,
        "micro_batch": micro_batch,
        "step_seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "model_tflops_per_s": step_model_flops(model, shape, micro_batch) / seconds / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def bench_losses(shape: Shape, device: torch.device) -> list[dict]:
    new, batch = make_batch(shape.loss_answers, shape.loss_tokens, k=16)
    new, batch = new.to(device), batch.to(device)
    real_tokens = float(batch.response_mask.sum())
    rows = []
    for name in ALGORITHMS:
        loss = load_loss(name)
        times = []
        for i in range(1 + shape.loss_repeats):
            x = new.detach().requires_grad_(True)
            sync(device)
            start = time.perf_counter()
            loss(x, batch).loss.backward()
            sync(device)
            if i > 0:
                times.append(time.perf_counter() - start)
        seconds = median(times)
        rows.append({"algorithm": name, "ms": seconds * 1e3, "mtok_per_s": real_tokens / seconds / 1e6})
    return rows


@torch.no_grad()
def bench_generation(model: Any, shape: Shape, device: torch.device) -> dict:
    model.eval()
    model.gradient_checkpointing_disable()
    model.set_attn_implementation("sdpa")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, shape.vocab, (shape.gen_batch, shape.gen_prompt), generator=gen).to(device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0
    )
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up (kernels, allocator)
    sync(device)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=shape.gen_new, min_new_tokens=shape.gen_new, **kwargs)
    sync(device)
    seconds = time.perf_counter() - start
    new_tokens = (out.shape[1] - shape.gen_prompt) * shape.gen_batch
    return {
        "batch": shape.gen_batch,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_s": new_tokens / seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, 512 context (GPU)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: harness check only")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step's forward")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=None, help="override (default 4 8 16)")
    parser.add_argument(
        "--checkpointing", choices=["off", "on", "both"], default="both", help="activation checkpointing variants"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the card")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/gpu_check.json)")
    args = parser.parse_args()

    if args.cpu_smoke:
        device, shape = torch.device("cpu"), CPU_SMOKE
    elif not torch.cuda.is_available():
        print(no_gpu_message("bench/gpu_check.py"), file=sys.stderr)
        return 0
    else:
        device, shape = torch.device("cuda", 0), QUICK if args.quick else Shape()
    if args.micro_batches:
        if any(m < 2 or m % 2 for m in args.micro_batches):
            parser.error(f"--micro-batches: each must be even and >= 2 (groups of 2 answers), got {args.micro_batches}")
        shape = dataclasses.replace(shape, micro_batches=tuple(args.micro_batches))
    checkpointing_variants = {"off": (False,), "on": (True,), "both": (False, True)}[args.checkpointing]
    out = args.out or Path(
        "bench/results/gpu_check_cpu_smoke.json" if args.cpu_smoke else "bench/results/gpu_check.json"
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name, args.peak_tflops) if device.type == "cuda" else None
    if device.type == "cuda" and peak is None:
        print(f"unknown card {name!r}: MFU not computed (pass --peak-tflops)", file=sys.stderr)
    t0 = time.perf_counter()

    model = build_model(shape, device)
    n_params = sum(p.numel() for p in model.parameters())
    achieved = matmul_tflops(device) if device.type == "cuda" else None
    attentions = ["sdpa"]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        attentions.append("flash_attention_2")
    train_rows = []
    for attn in attentions:
        for micro_batch in shape.micro_batches:
            for checkpointing in checkpointing_variants:
                try:
                    row = bench_train_step(model, shape, device, attn, checkpointing, micro_batch, args.compile)
                except torch.OutOfMemoryError:
                    # One variant too big for this card must not lose the others' numbers.
                    model.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    row = {"attention": attn, "compiled": args.compile, "checkpointing": checkpointing}
                    row["micro_batch"] = micro_batch
                    row["error"] = "out of memory"
                else:
                    row["mfu"] = row["model_tflops_per_s"] * 1e12 / peak if peak else None
                    row["of_matmul"] = row["model_tflops_per_s"] / achieved if achieved else None
                train_rows.append(row)
    loss_rows = bench_losses(shape, device)
    generation = bench_generation(model, shape, device)
    total = time.perf_counter() - t0

    print(f"{name}: Qwen2-shaped d={shape.hidden} L={shape.layers} ({n_params / 1e6:.0f}M params), bf16")
    if achieved:
        print(f"achieved bf16 matmul 8192^3: {achieved:.0f} TFLOP/s (data sheet {peak / 1e12 if peak else 0:.0f})")
    print(f"training step: micro-batch x {shape.seq} tokens (prompt {shape.prompt}), NFT loss, AdamW")
    print_table(
        [r for r in train_rows if "error" not in r],
        [
            ("attention", "attention", ""),
            ("compiled", "compiled", ""),
            ("micro_batch", "micro-batch", ""),
            ("checkpointing", "ckpt", ""),
            ("step_seconds", "step s", ".3f"),
            ("tokens_per_s", "tok/s", ".0f"),
            ("model_tflops_per_s", "TFLOP/s", ".1f"),
            ("mfu", "MFU", ".3f"),
            ("of_matmul", "of matmul", ".3f"),
            ("peak_mem_gib", "mem GiB", ".1f"),
        ],
    )
    for r in (r for r in train_rows if "error" in r):
        print(f"  {r['attention']} micro-batch {r['micro_batch']} ckpt {r['checkpointing']}: {r['error']}")
    print(f"loss fwd+bwd at B={shape.loss_answers} x T={shape.loss_tokens}")
    print_table(loss_rows, [("algorithm", "algorithm", ""), ("ms", "ms", ".2f"), ("mtok_per_s", "Mtok/s", ".1f")])
    print(
        f"HF generate: {generation['batch']} prompts x {shape.gen_new} new tokens: "
        f"{generation['tokens_per_s']:.0f} tok/s ({generation['seconds']:.1f} s)"
    )
    best = max((r["mfu"] for r in train_rows if r.get("mfu") is not None), default=None)
    if best is not None:
        print(f"best MFU {best:.1%} (goal >= {GOAL_MFU:.0%}): {'OK' if best >= GOAL_MFU else 'BEHIND'}")
    print(f"total {total:.0f} s")
    write_json(
        out,
        {
            "meta": meta(
                device=name, shape=dataclasses.asdict(shape), params=n_params, peak_flops=peak, matmul_tflops=achieved
            ),
            "train_step": train_rows,
            "losses": loss_rows,
            "generation": generation,
            "best_mfu": best,
            "goal_met": None if best is None else best >= GOAL_MFU,
            "seconds": total,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
