"""Peak memory of one NFT iteration vs GRPO with a KL reference model vs plain SFT, on the same batch.

    .venv/bin/python bench/memory.py                 # ~50M-param Llama (vocab 32000), 32 answers x <=96 tokens
    .venv/bin/python bench/memory.py --quick         # ~1M params, for the harness test
    .venv/bin/python bench/memory.py --device cuda   # torch.cuda.max_memory_allocated instead of RSS

Each variant runs in a fresh subprocess. After imports, the policy model and the token data exist, the peak
is reset (CPU: ``/proc/self/clear_refs`` resets VmHWM; GPU: ``reset_peak_memory_stats``) and the variant's
iteration runs; the reported number is peak minus the memory at the reset, i.e. what the iteration adds on
top of one model's weights: gradients, AdamW state, activations and, for GRPO+KL, the frozen reference copy.

- ``nft``: ``PolicyModule`` with the NFT loss (no reference model) under a Lightning ``Trainer``: the old
  log-prob pass of the iteration (``fill_old_logprobs``) then its optimizer steps.
- ``grpo_kl``: the same with ``GRPOLoss(kl_coef=0.001)``: PolicyModule adds a frozen reference copy and a
  reference forward per micro-batch.
- ``sft``: a plain PyTorch SFT loop on the same sequences (HF ``labels`` cross-entropy on the response
  tokens), AdamW: the floor any fine-tuning method pays.

The ratio is taken on the total (model weights + the iteration's peak). Goal from the issue: NFT <= 1.05x SFT.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import meta, print_table, quiet_trainer, run_worker, write_json

SCRIPT = Path(__file__).resolve()
VARIANTS = ("sft", "nft", "grpo_kl")
GOAL_RATIO = 1.05


@dataclass
class Shape:
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    intermediate: int = 2048
    vocab: int = 32000
    prompts: int = 4
    answers: int = 8
    prompt_tokens: int = 32
    response_tokens: int = 96
    micro_batch: int = 4
    mini_batches: int = 2


QUICK = Shape(hidden=64, layers=2, heads=2, intermediate=256, vocab=2048, prompts=2, answers=4, prompt_tokens=8,
              response_tokens=16, micro_batch=4, mini_batches=2)  # fmt: skip


class Meter:
    """Peak memory since ``reset`` (MiB): VmHWM on CPU, the CUDA caching allocator's peak on GPU."""

    def __init__(self, device: str) -> None:
        self.device = device

    def _cpu_kib(self, field: str) -> int:
        status = Path("/proc/self/status").read_text()
        match = re.search(rf"{field}:\s+(\d+) kB", status)
        if match is None:
            raise RuntimeError(f"/proc/self/status has no {field}: the CPU memory meter needs Linux")
        return int(match.group(1))

    def current(self) -> float:
        import torch

        if self.device == "cuda":
            return torch.cuda.memory_allocated() / 2**20
        return self._cpu_kib("VmRSS") / 1024

    def reset(self) -> float:
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            # Writing 5 resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0, proc(5)).
            Path("/proc/self/clear_refs").write_text("5")
        return self.current()

    def peak(self) -> float:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return self._cpu_kib("VmHWM") / 1024


def run_sft(model: Any, steps: list[Any]) -> None:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    model.train()
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        total = sum(float(mb.loss_batch.response_mask.sum()) for mb in step.micro_batches)
        for mb in step.micro_batches:
            labels = mb.input_ids.clone()
            labels[:, : mb.prompt_len] = -100
            labels[:, mb.prompt_len :][mb.loss_batch.response_mask == 0] = -100
            out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, labels=labels)
            # HF's loss is the mean over this micro-batch's tokens: reweight to a mean over the whole step
            (out.loss * (float(mb.loss_batch.response_mask.sum()) / total)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


def run_policy(model: Any, steps_fn: Any, loss: Any, device: str) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from nft_lit.module import PolicyModule

    module = PolicyModule(model=model, loss=loss, lr=1e-5, warmup_steps=0, grad_clip=1.0)
    model.eval()
    steps = steps_fn(module.response_logprobs)  # the iteration's old log-prob pass
    model.train()
    trainer = quiet_trainer(accelerator="gpu" if device == "cuda" else "cpu", max_epochs=1)
    loader = DataLoader(steps, batch_size=None, shuffle=False, collate_fn=lambda x: x)
    trainer.fit(module, train_dataloaders=loader)
    return {"reference_model": float(module.ref_model is not None), "optimizer_steps": float(trainer.global_step)}


def worker(variant: str, shape: Shape, device: str, out: Path) -> None:
    import lightning.pytorch  # noqa: F401  (imported before the reset in every variant alike)
    import torch
    from common import synthetic_steps

    from nft_lit.losses import GRPOLoss, NFTLoss
    from nft_lit.models import tiny_causal_lm

    torch.manual_seed(0)
    model = tiny_causal_lm(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_layers=shape.layers,
        num_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=shape.prompt_tokens + shape.response_tokens,
    ).to(device)

    def steps_fn(logprob_fn: Any = None) -> list[Any]:
        return synthetic_steps(
            prompts=shape.prompts,
            answers=shape.answers,
            prompt_tokens=shape.prompt_tokens,
            response_tokens=shape.response_tokens,
            vocab=shape.vocab,
            micro_batch=shape.micro_batch,
            mini_batches=shape.mini_batches,
            logprob_fn=logprob_fn,
            device=device,
        )

    meter = Meter(device)
    params = sum(p.numel() for p in model.parameters())
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    extra: dict[str, float] = {}
    if variant == "sft":
        steps = [s.to(device) for s in steps_fn()]
        base = meter.reset()
        run_sft(model, steps)
    else:
        loss = NFTLoss() if variant == "nft" else GRPOLoss(kl_coef=0.001)
        base = meter.reset()
        extra = run_policy(model, steps_fn, loss, device)
    peak = meter.peak()
    result = {"params": params, "weights_mib": weights_mib, "base_mib": base, "peak_mib": peak, **extra}
    result["iteration_mib"] = peak - base
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model (harness check)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/memory.json)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = QUICK if args.quick else Shape()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench/memory.py --device cuda: no CUDA GPU is available (torch.cuda.is_available())")
    if args.worker:
        worker(args.worker, shape, args.device, args.worker_out)
        return

    out = args.out or Path(f"bench/results/memory{'_cuda' if args.device == 'cuda' else ''}.json")
    rows = []
    for variant in VARIANTS:
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        extra = ["--quick"] if args.quick else []
        result = run_worker(SCRIPT, ["--worker", variant, "--device", args.device, *extra], timeout_s=900)
        rows.append({"variant": variant, **result, "total_mib": result["weights_mib"] + result["iteration_mib"]})
    sft = rows[0]["total_mib"]
    for row in rows:
        row["ratio_vs_sft"] = row["total_mib"] / sft
    ratio = next(r["ratio_vs_sft"] for r in rows if r["variant"] == "nft")

    print(
        f"one iteration on {args.device}: Llama d={shape.hidden} L={shape.layers} vocab {shape.vocab} "
        f"({rows[0]['params'] / 1e6:.1f}M params, {rows[0]['weights_mib']:.0f} MiB fp32 weights), "
        f"{shape.prompts * shape.answers} answers x <={shape.response_tokens} tokens, "
        f"{shape.mini_batches} optimizer steps, micro-batch {shape.micro_batch}"
    )
    print_table(
        rows,
        [
            ("variant", "variant", ""),
            ("iteration_mib", "iter MiB", ".0f"),
            ("total_mib", "total MiB", ".0f"),
            ("ratio_vs_sft", "x SFT", ".3f"),
        ],
    )
    print(f"NFT / SFT peak memory: {ratio:.3f} (goal <= {GOAL_RATIO}): {'OK' if ratio <= GOAL_RATIO else 'BEHIND'}")
    write_json(
        out, {"meta": meta(shape=asdict(shape), device=args.device), "rows": rows, "goal_met": ratio <= GOAL_RATIO}
    )


if __name__ == "__main__":
    main()
