"""Loss forward+backward throughput (tokens/s) per algorithm at a realistic step shape, and NFT / GRPO cost.

    .venv/bin/python bench/loss_throughput.py            # B=512 answers x T=1024 tokens
    .venv/bin/python bench/loss_throughput.py --quick    # B=64 x T=256, for the harness test

Only the loss is timed (log-probs are a leaf tensor): this is the part the algorithms differ in; the model's
forward/backward is identical for all of them. Goal from the issue: NFT costs no more than 1.5x GRPO.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import median, meta, print_table, write_json
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from nft_lit.losses import LossBatch, PolicyLoss

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ALGORITHMS = ("nft", "rft", "grpo", "dr_grpo", "dapo", "infonca")


def make_batch(num_answers: int, num_tokens: int, k: int, seed: int = 0) -> tuple[torch.Tensor, LossBatch]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(num_tokens // 4, num_tokens + 1, (num_answers,), generator=gen)
    mask = (torch.arange(num_tokens)[None] < lengths[:, None]).float()
    old = -torch.rand(num_answers, num_tokens, generator=gen) * 2
    new = old + 0.05 * torch.randn(num_answers, num_tokens, generator=gen)
    rewards = (torch.rand(num_answers, generator=gen) < 0.5).float()
    rewards[0::k] = 1.0  # every group mixed, as after dynamic sampling
    rewards[1::k] = 0.0
    group_ids = torch.arange(num_answers // k).repeat_interleave(k)
    return new, LossBatch.from_rewards(old, mask, rewards, group_ids)


def load_loss(name: str) -> PolicyLoss:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return instantiate(compose(config_name=f"algorithm/{name}").algorithm.loss)


def time_once(loss: PolicyLoss, new: torch.Tensor, batch: LossBatch) -> float:
    x = new.detach().requires_grad_(True)
    start = time.perf_counter()
    loss(x, batch).loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape, few repeats (harness check)")
    parser.add_argument("--answers", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/loss_throughput.json"))
    args = parser.parse_args()
    if args.quick:
        args.answers, args.tokens, args.repeats = 64, 256, 2

    new, batch = make_batch(args.answers, args.tokens, k=16)
    real_tokens = int(batch.response_mask.sum())
    losses = {name: load_loss(name) for name in ALGORITHMS}
    for loss in losses.values():  # warm-up
        time_once(loss, new, batch)
    # rounds interleave the algorithms and the median is kept, so a noisy neighbour hits all of them alike
    times: dict[str, list[float]] = {name: [] for name in ALGORITHMS}
    for _ in range(args.repeats):
        for name, loss in losses.items():
            times[name].append(time_once(loss, new, batch))
    rows = []
    for name in ALGORITHMS:
        seconds = median(times[name])
        rows.append({"algorithm": name, "seconds": seconds, "ms": seconds * 1e3, "tokens_per_s": real_tokens / seconds})
    grpo = next(r for r in rows if r["algorithm"] == "grpo")["seconds"]
    for row in rows:
        row["mtok_per_s"] = row["tokens_per_s"] / 1e6
        row["cost_vs_grpo"] = row["seconds"] / grpo

    print(
        f"loss fwd+bwd, B={args.answers} x T={args.tokens} ({real_tokens} response tokens), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    columns = [("algorithm", "algorithm", ""), ("ms", "ms/step", ".1f"), ("mtok_per_s", "Mtok/s", ".2f")]
    print_table(rows, [*columns, ("cost_vs_grpo", "x GRPO", ".2f")])
    nft_ratio = next(r for r in rows if r["algorithm"] == "nft")["cost_vs_grpo"]
    print(f"NFT / GRPO cost: {nft_ratio:.2f} (goal <= 1.5): {'OK' if nft_ratio <= 1.5 else 'BEHIND'}")
    write_json(args.out, {"meta": meta(answers=args.answers, tokens=args.tokens), "rows": rows})


if __name__ == "__main__":
    main()
