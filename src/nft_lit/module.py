"""PolicyModule: the policy LM, its optimizer, and one optimizer step per dataloader item.

Manual optimization: one ``StepBatch`` (built by ``steps.build_steps``) is one optimizer step over its
micro-batches. The losses are normalised by the counts of the whole step across micro-batches and ranks
(``LossBatch.num_*``), so summing micro-batch gradients is exact; data-parallel gradient reduction
(DDP / FSDP) *averages* over ranks, which this module undoes by scaling each micro-batch loss by the world
size. Log-probs follow the rollout convention: ``log_softmax(logits / temperature)`` of the sampled token,
in float32 (paper Eq. 10 ratios R_t = exp(logπ_θ − logπ_old) are sensitive to rounding), at the temperature
the step's answers were sampled at (``StepBatch.temperature``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from nft_lit.distributed import all_gather_objects
from nft_lit.evaluation import Evaluation
from nft_lit.losses import PolicyLoss, Reduction, StepMetrics
from nft_lit.metrics import (
    BAR_LOSS,
    BAR_REWARD,
    BAR_SECONDS_PER_ITERATION,
    ENTROPY,
    GRAD_NORM,
    ITERATION,
    LEARNING_RATE,
    LOGPROB_GAP,
    REWARD_MEAN,
    SECONDS_ITERATION,
    SECONDS_ROLLOUT,
    SECONDS_TRAIN,
    TRAIN_LOSS,
    TRAIN_TOKENS_PER_SECOND,
    train_metric,
    val_metric,
)
from nft_lit.models import ModelSpec, load_model
from nft_lit.steps import LogprobGap, MicroBatch, StepBatch


def response_logprobs_and_entropy(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int, temperature: float
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs [B, T] and entropies [B, T] (float32, the entropies without gradient: they are
    only logged) of the response columns ``prompt_len:``.

    Positions come from the attention mask so left-padded prompts see the same positions as in generation.
    Only the columns that predict response tokens go through the output layer (``logits_to_keep``): the
    prompt's logits would cost vocab-sized matmuls and memory for nothing.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # Logits at t predict token t+1: the response tokens are predicted from columns prompt_len-1 .. -2.
    keep = input_ids.shape[1] - prompt_len + 1
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep
    ).logits
    logits = logits[:, -keep:-1].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    targets = input_ids[:, prompt_len:].unsqueeze(-1)
    logprobs = logp_all.gather(-1, targets).squeeze(-1)
    with torch.no_grad():  # a graph here would keep another vocab-sized tensor alive until backward
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The transformer block classes of an HF model (its ``_no_split_modules``), used as FSDP wrap units."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(f"{type(model).__name__} declares no decoder layer class (_no_split_modules); cannot shard it")
    return classes


def adamw_with_warmup(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int
) -> dict[str, Any]:
    """AdamW (no decay on biases and norm gains, standard for transformers) with a linear LR warm-up over
    ``warmup_steps`` optimizer steps, then constant (paper App. B), in Lightning's optimizer-config form."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def apply_fsdp2(models: list[nn.Module], dp_mesh: Any, reshard_after_forward: bool) -> None:
    """FSDP2 (``fully_shard``) of each model over the data-parallel mesh: each decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for model in models:
        layers = decoder_layer_classes(model)
        for sub in model.modules():
            if type(sub) in layers:
                fully_shard(sub, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)


def loss_metric_keys(metrics: StepMetrics) -> tuple[list[str], list[str], dict[str, Reduction]]:
    """The loss's metric names (summed ones, extreme ones) in one order on every rank, and their reductions
    (a collective). A rank whose micro-batches were all padding has none, so they are gathered from all ranks."""
    gathered = all_gather_objects(metrics.reductions)
    how = {k: v for part in gathered for k, v in part.items()}
    sums = sorted(k for k, v in how.items() if v in ("sum", "token_mean"))
    return sums, sorted(k for k in how if k not in sums), how


class PolicyModule(pl.LightningModule):
    """The policy being fine-tuned, trained through a ``PolicyLoss`` (configs/algorithm/*.yaml).

    Args:
        model: a ``ModelSpec`` (configs/model/*.yaml; built by ``models.load_model`` in ``configure_model``
            so that FSDP shards it as it is created), or an already built causal LM.
        loss: the policy loss; ``loss.kl_coef > 0`` adds a frozen reference copy of the initial model.
        lr: peak AdamW learning rate (paper: 1e-6 for 7B).
        weight_decay: AdamW weight decay (paper: 0.1).
        betas: AdamW betas.
        warmup_steps: linear LR warm-up over this many optimizer steps, then constant (paper: 10).
        grad_clip: max global gradient norm (paper: 1.0); None logs the norm without clipping.
        fsdp_reshard_after_forward: FSDP2 (``ModelParallelStrategy``) only: free gathered weights after
            each forward (saves memory, costs a second all-gather in backward).
        activation_checkpointing: recompute each decoder layer's activations in backward (HF gradient
            checkpointing, non-reentrant, so it composes with FSDP2): less memory, about a third more compute.
        compile: run the log-prob forward (model + float32 log-softmax/entropy) through ``torch.compile``:
            1.38-1.40x faster training steps and about half the memory on an H200 (docs/PERFORMANCE.md,
            bench/gpu_check.py --compile), paid for by compile time at the first micro-batches.

    Sharding is FSDP2 through Lightning's ``ModelParallelStrategy`` (configs/trainer/gpu_fsdp.yaml,
    cpu_fsdp2.yaml). Lightning's ``FSDPStrategy`` (FSDP1) is refused at start: it runs ``training_step`` inside
    the root unit's forward, and FSDP1 cannot take the backward passes this module makes there, one per
    micro-batch (Lightning issues #19626, #19685).
    """

    def __init__(
        self,
        model: ModelSpec | nn.Module,
        loss: PolicyLoss,
        lr: float = 1e-6,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 10,
        grad_clip: float | None = 1.0,
        fsdp_reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"module.lr must be > 0, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"module.warmup_steps must be >= 0, got {warmup_steps}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"module.grad_clip must be > 0 or null, got {grad_clip}")
        self.automatic_optimization = False
        self._model_source = model
        self.model: nn.Module | None = model if isinstance(model, nn.Module) else None
        self.ref_model: nn.Module | None = None
        self.loss_fn = loss
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.grad_clip = grad_clip
        self.fsdp_reshard_after_forward = fsdp_reshard_after_forward
        self.activation_checkpointing = activation_checkpointing
        # Compiled lazily on first use; the function is shared by the policy and the KL reference model.
        self._logprobs_fn = torch.compile(response_logprobs_and_entropy) if compile else response_logprobs_and_entropy
        # The resolved run config (set by `nft-lit fit`), stored in checkpoints for validate/export.
        self.run_config: dict[str, Any] | None = None
        self._epoch_start = 0.0
        self._train_tokens = 0.0
        self._train_seconds = 0.0
        self._metric_keys: tuple[list[str], list[str], dict[str, Reduction]] | None = None
        # The running iteration's data-side metrics and pending log-prob gap (``begin_iteration``).
        self._rollout_stats: dict[str, float] = {}
        self._pending_gap: LogprobGap | None = None
        self._reward_to_show: float | None = None
        if self.model is not None:
            self._make_reference()

    # ------------------------------------------------------------------ model
    def _make_reference(self) -> None:
        if getattr(self.loss_fn, "kl_coef", 0.0) > 0 and self.ref_model is None:
            assert self.model is not None
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(
                "trainer.strategy: Lightning's FSDPStrategy (FSDP1) cannot train PolicyModule: it runs "
                "training_step inside the root FSDP unit's forward, and the backward passes made there (one per "
                "micro-batch) fail FSDP1's state checks ('Expects BACKWARD_PRE or BACKWARD_POST state'; "
                "Lightning issues #19626, #19685). Use FSDP2: trainer=gpu_fsdp (ModelParallelStrategy)."
            )

    def configure_model(self) -> None:
        if self.model is None:
            self.model = load_model(self._model_source)  # type: ignore[arg-type]
            self.model.train()  # from_pretrained leaves eval mode: train with the model's own dropout, as SFT
            self._make_reference()
        if self.activation_checkpointing and not self.model.is_gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None and not getattr(self, "_fsdp2_applied", False):
            models = [m for m in (self.model, self.ref_model) if m is not None]
            apply_fsdp2(models, mesh["data_parallel"], self.fsdp_reshard_after_forward)
            self._fsdp2_applied = True

    def response_logprobs(
        self, input_ids: Tensor, attention_mask: Tensor, prompt_len: int, temperature: float
    ) -> Tensor:
        """Response-token log-probs under the current policy (used for logπ_old; no entropy)."""
        assert self.model is not None
        return self._logprobs_fn(self.model, input_ids, attention_mask, prompt_len, temperature)[0]

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> Any:
        assert self.model is not None
        return adamw_with_warmup(self.model, self.lr, self.weight_decay, self.betas, self.warmup_steps)

    def _clip_gradients(self) -> Tensor:
        """Global gradient norm (clipped when ``grad_clip`` is set); correct under DDP and FSDP2."""
        max_norm = self.grad_clip if self.grad_clip is not None else float("inf")
        params = [p for p in self.model.parameters() if p.grad is not None]  # type: ignore[union-attr]
        # With FSDP2 the parameters are DTensors and the norm is computed across shards.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm.detach().float()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["nft_lit_config"] = self.run_config

    # ------------------------------------------------------------------ training
    def begin_iteration(self, stats: Mapping[str, float], pending_gap: LogprobGap | None = None) -> None:
        """A rollout iteration's data side (``driver.IterationResult``), handed over on every rank before the
        iteration's first ``training_step`` by the adapter that ran it (``RolloutDataModule.train_dataloader``).

        ``stats`` (``rollout/*``, ``seconds/*``, the same on every rank) are logged with the module's own at the
        iteration's end (``on_train_epoch_end``); ``rollout/reward_mean`` also shows on the progress bar.
        ``pending_gap``: the engine/trainer log-prob gap still lacking the first step's tokens; the step marked
        ``old_logprobs_from_forward`` adds them from its training forward, then finishes it (a collective;
        ``LogprobGapError`` stops a broken sync before the update) and logs ``rollout/logprob_gap``."""
        self._rollout_stats = dict(stats)
        self._pending_gap = pending_gap
        self._reward_to_show = stats.get(REWARD_MEAN)

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        self._train_tokens = 0.0
        self._train_seconds = 0.0

    def _micro_step(self, mb: MicroBatch, scale: float, step: StepBatch, metrics: StepMetrics) -> tuple[Tensor, ...]:
        """Forward and backward of one micro-batch: (its loss share, entropy sum, response tokens)."""
        assert self.model is not None
        temperature = step.temperature
        logprobs, entropy = self._logprobs_fn(self.model, mb.input_ids, mb.attention_mask, mb.prompt_len, temperature)
        mask = mb.loss_batch.response_mask
        if mb.is_padding:
            # Zero-weight pass: keeps every rank's collectives in step without contributing gradient.
            self.manual_backward(logprobs.sum() * 0.0)
            return logprobs.new_zeros(()), logprobs.new_zeros(()), logprobs.new_zeros(())
        batch = mb.loss_batch
        if step.old_logprobs_from_forward:  # no update since the rollout: R_t = 1, the gradient of logπ_θ
            step.take_old_logprobs(mb, logprobs, self._pending_gap)
        if self.ref_model is not None:
            with torch.no_grad():
                ref = self._logprobs_fn(self.ref_model, mb.input_ids, mb.attention_mask, mb.prompt_len, temperature)[0]
            batch.ref_logprobs = ref * mask
        out = self.loss_fn(logprobs, batch)
        self.manual_backward(out.loss * scale)
        tokens = mask.sum()
        metrics.add(out, tokens)
        return out.loss.detach(), (entropy.detach() * mask).sum(), tokens

    def training_step(self, batch: StepBatch, batch_idx: int) -> Tensor | None:
        if self._reward_to_show is not None:  # the progress bar's view of the iteration, once per iteration
            self.log(BAR_REWARD, self._reward_to_show, prog_bar=True, logger=False, batch_size=1)
            self._reward_to_show = None
        if not batch.micro_batches:
            return None  # an iteration that kept no group (identical on every rank): no update
        started = time.perf_counter()
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        world = self.trainer.world_size
        optimizer.zero_grad(set_to_none=True)
        zero = torch.zeros((), device=self.device)
        step_loss, entropy_sum, tokens = zero.clone(), zero.clone(), zero.clone()
        metrics = StepMetrics()  # the loss's metrics over the step's micro-batches, ranks below
        for mb in batch.micro_batches:
            loss, ent, n = self._micro_step(mb, float(world), batch, metrics)
            step_loss += loss
            entropy_sum += ent
            tokens += n
        # Before the update: a broken weight sync stops the run here.
        if batch.old_logprobs_from_forward and (gap := self._finish_pending_gap()) is not None:
            self._rollout_stats[LOGPROB_GAP] = gap
        grad_norm = self._clip_gradients()
        optimizer.step()
        scheduler.step()
        # The loss's metric names are fixed by the loss: gathered over ranks at the first step only.
        self._metric_keys = self._metric_keys or loss_metric_keys(metrics)
        sum_keys, high_keys, how = self._metric_keys
        # Each rank's loss is its share of the step's normalised loss: the step loss is their sum.
        reduce = self.trainer.strategy.reduce
        stacked = torch.stack([step_loss, entropy_sum, tokens, *(metrics.sums.get(k, zero) for k in sum_keys)])
        totals = reduce(stacked, reduce_op="sum")
        self._train_tokens += float(totals[2])
        all_tokens = totals[2].clamp(min=1.0)
        logs = {
            TRAIN_LOSS: totals[0],
            ENTROPY: totals[1] / all_tokens,
            GRAD_NORM: grad_norm,
            LEARNING_RATE: torch.tensor(scheduler.get_last_lr()[0]),
        }
        for i, k in enumerate(sum_keys):
            logs[train_metric(k)] = totals[3 + i] if how[k] == "sum" else totals[3 + i] / all_tokens
        if high_keys:
            high = reduce(torch.stack([metrics.highs.get(k, zero - math.inf) for k in high_keys]), reduce_op="max")
            logs.update({train_metric(k): -high[i] if how[k] == "min" else high[i] for i, k in enumerate(high_keys)})
        self.log_dict(logs, on_step=True, on_epoch=False, prog_bar=False, sync_dist=False)
        self.log(BAR_LOSS, totals[0], prog_bar=True, on_step=True, on_epoch=False)
        self._train_seconds += time.perf_counter() - started
        return totals[0]

    def _finish_pending_gap(self) -> float | None:
        """The iteration's engine/trainer gap once the first step's forwards are in (a collective; None when
        nothing is pending or no token was measured)."""
        gap, self._pending_gap = self._pending_gap, None
        return None if gap is None else gap.finish()

    # ------------------------------------------------------------------ validation (trainer.validate)
    def validation_step(self, evaluation: Evaluation, batch_idx: int) -> None:
        """The datamodule's ``Evaluation`` of its ``val_benchmarks`` on this policy (results summed over ranks)."""
        results = evaluation.run(self.model)
        logs = {val_metric(k): v for k, v in results.items()}
        self.log_dict(logs, on_step=False, on_epoch=True, rank_zero_only=True, batch_size=1)

    def on_train_epoch_end(self) -> None:
        # Runs after the callbacks' epoch-end hooks (held-out evaluation, checkpoint), so the iteration's
        # wall time includes them; its data side ran before on_train_epoch_start (seconds/rollout).
        stats, self._rollout_stats = self._rollout_stats, {}
        iteration = stats.get(SECONDS_ROLLOUT, 0.0) + time.perf_counter() - self._epoch_start
        logs = {
            **stats,
            SECONDS_TRAIN: self._train_seconds,
            SECONDS_ITERATION: iteration,
            TRAIN_TOKENS_PER_SECOND: self._train_tokens / max(self._train_seconds, 1e-9),
            ITERATION: float(self.current_epoch),
        }
        # Rollout statistics are computed from the data gathered over all ranks: identical everywhere.
        self.log_dict(logs, on_step=False, on_epoch=True, rank_zero_only=True)
        # The progress bar's view of where the time went (seconds/* are in every logger).
        self.log(BAR_SECONDS_PER_ITERATION, iteration, prog_bar=True, logger=False, rank_zero_only=True)
