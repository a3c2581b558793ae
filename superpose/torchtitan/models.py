"""torchtitan model specs for TST: torchtitan's llama3 and qwen3 (MoE) with a ``BagEmbedding``.

The shapes are superpose's presets (``superpose.model.PRESETS``): the paper's 270M and 600M are
SmolLM2-135M / -360M with untied embeddings, its 3B the SmolLM3-3B shape, its 10B-A1B a Qwen3
MoE; all over the Llama-3 vocabulary (128,256) unless given another ``vocab_size``.
"""
from __future__ import annotations

import dataclasses
from functools import partial

from torch import nn
from torchtitan.models.common import ComplexRoPE, CosSinRoPE, Embedding, Linear, RMSNorm
from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers, _output_linear_init
from torchtitan.models.llama3 import model_registry as llama3_registry
from torchtitan.models.qwen3 import _build_qwen3_moe_layers, _qwen3_norm
from torchtitan.models.qwen3 import model_registry as qwen3_registry
from torchtitan.models.qwen3.model import Qwen3Model
from torchtitan.protocols.model_spec import ModelSpec

from .embedding import with_bag_embedding

LLAMA3_VOCAB = 128256
# name: (dim, hidden_dim, n_layers, n_heads, n_kv_heads, rope_theta), as superpose.model.PRESETS
LLAMA_SHAPES = {
    "tiny": (64, 256, 2, 4, 4, 10000.0),  # CPU tests
    "270m": (576, 1536, 30, 9, 3, 100000.0),
    "600m": (960, 2560, 32, 15, 5, 100000.0),
    "3b": (2048, 11008, 36, 16, 4, 5000000.0),
}
_INIT = {"weight": partial(nn.init.trunc_normal_, std=0.02), "bias": nn.init.zeros_}
_NORM = {"weight": nn.init.ones_}


def llama3_spec(shape: str, vocab_size: int = LLAMA3_VOCAB, attn_backend: str = "flex") -> ModelSpec:
    """torchtitan's llama3 (its layers, sharding, state-dict adapter) at a superpose shape, untied."""
    dim, hidden, n_layers, n_heads, n_kv_heads, theta = LLAMA_SHAPES[shape]
    model = Llama3Model.Config(
        dim=dim, vocab_size=vocab_size,
        tok_embeddings=Embedding.Config(num_embeddings=vocab_size, embedding_dim=dim, param_init=_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM),
        lm_head=Linear.Config(in_features=dim, out_features=vocab_size, param_init=_output_linear_init(dim)),
        layers=_build_llama3_layers(
            n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden,
            rope=ComplexRoPE.Config(dim=dim // n_heads, max_seq_len=8192, theta=theta), attn_backend=attn_backend),
    )
    stock = llama3_registry("debugmodel", attn_backend=attn_backend)
    return dataclasses.replace(stock, flavor=f"tst-{shape}", model=with_bag_embedding(model))


def qwen3_moe_10b_a1b_spec(vocab_size: int = LLAMA3_VOCAB, attn_backend: str = "flex") -> ModelSpec:
    """The paper's 10B-A1B MoE on torchtitan's qwen3: 24 layers, 128 experts of 640, top-8 (superpose's preset)."""
    dim, head_dim = 1536, 128
    model = Qwen3Model.Config(
        vocab_size=vocab_size, dim=dim, norm=_qwen3_norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=vocab_size, embedding_dim=dim, param_init=_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab_size, param_init=_INIT),
        layers=_build_qwen3_moe_layers(
            n_layers=24, dim=dim, n_heads=16, n_kv_heads=4, head_dim=head_dim, moe_hidden_dim=640, num_experts=128,
            top_k=8, attn_backend=attn_backend, moe_comm_backend="standard",
            rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=8192, theta=1000000.0)),
    )
    stock = qwen3_registry("debugmodel_moe", attn_backend=attn_backend)
    return dataclasses.replace(stock, flavor="tst-10b-a1b", model=with_bag_embedding(model))
