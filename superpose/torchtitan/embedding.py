"""Bag-averaging input embedding for torchtitan models."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torchtitan.models.common.embedding import Embedding

from ..method import embed_bags


class BagEmbedding(Embedding):
    """torchtitan's ``Embedding``; ids ``[B, L, k]`` give the fp32 mean of each bag ``[B, L, d]``.

    A subclass rather than a hook, so the parameter keeps its name ``tok_embeddings.weight``:
    checkpoints, the HF state-dict adapter and torchtitan's own sharding plans see the stock model.
    It runs inside the module's call, where FSDP2 has gathered the weight. ``[B, L]`` ids take
    the stock lookup, so a next-token step is torchtitan's own.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Embedding.Config):
        pass

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.ndim == 2:
            return super().forward(input)
        if self.tp_group is not None:
            raise NotImplementedError("bagged inputs with a vocab-parallel (tensor parallel) embedding are not supported")
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        return embed_bags(weight, input)  # [B, L, k] -> [B, L, d], mean in fp32


def with_bag_embedding(model_config):
    """A copy of the model config whose ``tok_embeddings`` is a ``BagEmbedding`` (same fields)."""
    return _with_embedding(model_config, BagEmbedding.Config)


def with_stock_embedding(model_config):
    """A copy of the model config whose ``tok_embeddings`` is torchtitan's own ``Embedding``."""
    return _with_embedding(model_config, Embedding.Config)


def _with_embedding(model_config, kind):
    old = model_config.tok_embeddings
    fields = {f.name: getattr(old, f.name) for f in dataclasses.fields(Embedding.Config)}
    return dataclasses.replace(model_config, tok_embeddings=kind(**fields))
