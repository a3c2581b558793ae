"""superpose's multi-hot loss as a torchtitan loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import BaseLoss, cross_entropy_loss
from torchtitan.config import CompileConfig

from ..loss import multi_hot_cross_entropy_sum


class MultiHotLoss(BaseLoss):
    """Labels ``[B, L, m]``: the multi-hot cross-entropy (``superpose.loss``) summed over the slots;
    labels ``[B, L]``: torchtitan's own ``cross_entropy_loss``, so a next-token step is the baseline's.

    torchtitan divides a loss by the step's count of valid labels, which is ``B*L*m`` for bags.
    The slot weights are therefore scaled to sum to ``m``: the step loss is then the mean over
    positions of the MCE at normalised weights (without ``log s``), superpose's own objective.
    ``TSTTrainer`` sets ``weights`` (``[m]``, summing to 1) before each step.
    Use it alone or as the ``loss_fn`` of torchtitan's ``ChunkedLossWrapper``.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        global_vocab_size: int | None = None
        """Full vocabulary size (torchtitan's cross-entropy needs it for loss-parallel next-token steps)."""

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
        self.global_vocab_size = config.global_vocab_size
        self.weights: torch.Tensor | None = None  # [m], sums to 1: the stage's slot weights
        self.fn = self._loss_sum
        self._maybe_compile(compile_config)

    def _loss_sum(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim == pred.ndim - 1:  # [B, L]: next-token prediction
            return cross_entropy_loss(pred, labels, global_vocab_size=self.global_vocab_size)
        if isinstance(pred, DTensor):
            raise NotImplementedError("bag targets with loss-parallel (tensor parallel) logits are not supported")
        slots = labels.shape[-1]
        weights = self.weights if self.weights is not None and self.weights.numel() == slots else None
        if weights is None:
            raise RuntimeError(f"MultiHotLoss got bags of {slots} targets but no slot weights for them (set by TSTTrainer)")
        loss_sum, _ = multi_hot_cross_entropy_sum(pred, labels, weights.to(pred.device) * slots)  # logits [B, L, V]
        return loss_sum
