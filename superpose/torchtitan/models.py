"""torchtitan model specs for TST: torchtitan's llama3 and qwen3 (MoE) with a ``BagEmbedding``.

The shapes are superpose's presets, read from the HF config superpose builds for them
(``superpose.model.model_config``), and the spec's ``flavor`` is the preset's name: the paper's
270M and 600M are SmolLM2-135M / -360M with untied embeddings, its 3B the SmolLM3-3B shape, its
10B-A1B a Qwen3 MoE; all over the Llama-3 vocabulary (128,256) unless given another ``vocab_size``.
A torchtitan run and a superpose run of one preset train the same architecture (with torchtitan's
parameter initialisation, not transformers').
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
from transformers import PretrainedConfig

from ..errors import ConfigError
from ..model import PRESETS, model_config
from .embedding import with_bag_embedding

LLAMA3_VOCAB = 128256
_INIT = {"weight": partial(nn.init.trunc_normal_, std=0.02), "bias": nn.init.zeros_}
_NORM = {"weight": nn.init.ones_}


def preset_config(preset: str, kind: str, vocab_size: int) -> PretrainedConfig:
    """The HF config superpose builds for ``preset`` (``superpose.model.model_config``), a ``kind`` model."""
    if PRESETS.get(preset, {}).get("kind") != kind:
        names = [name for name, f in PRESETS.items() if f["kind"] == kind]
        raise ConfigError(f"{preset!r} is not a {kind} preset of superpose.model.PRESETS ({', '.join(names)})")
    return model_config(preset, vocab_size)


def llama3_spec(preset: str, vocab_size: int = LLAMA3_VOCAB, attn_backend: str = "flex") -> ModelSpec:
    """torchtitan's llama3 (its layers, sharding, state-dict adapter) at a superpose llama preset, untied."""
    f = preset_config(preset, "llama", vocab_size)
    dim, heads = f.hidden_size, f.num_attention_heads
    model = Llama3Model.Config(
        dim=dim, vocab_size=vocab_size,
        tok_embeddings=Embedding.Config(num_embeddings=vocab_size, embedding_dim=dim, param_init=_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, eps=f.rms_norm_eps, param_init=_NORM),
        lm_head=Linear.Config(in_features=dim, out_features=vocab_size, param_init=_output_linear_init(dim)),
        layers=_build_llama3_layers(
            n_layers=f.num_hidden_layers, dim=dim, n_heads=heads, n_kv_heads=f.num_key_value_heads,
            hidden_dim=f.intermediate_size, attn_backend=attn_backend,
            rope=ComplexRoPE.Config(dim=dim // heads, max_seq_len=f.max_position_embeddings,
                                    theta=f.rope_parameters["rope_theta"])),
    )
    stock = llama3_registry("debugmodel", attn_backend=attn_backend)
    return dataclasses.replace(stock, flavor=preset, model=with_bag_embedding(model))


def qwen3_moe_spec(preset: str, vocab_size: int = LLAMA3_VOCAB, attn_backend: str = "flex") -> ModelSpec:
    """torchtitan's qwen3 MoE at a superpose qwen3_moe preset (the paper's 10B-A1B: 24 layers, 128 experts
    of 640, top-8), untied."""
    f = preset_config(preset, "qwen3_moe", vocab_size)
    dim, head_dim = f.hidden_size, f.head_dim
    model = Qwen3Model.Config(
        vocab_size=vocab_size, dim=dim, norm=_qwen3_norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=vocab_size, embedding_dim=dim, param_init=_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab_size, param_init=_INIT),
        layers=_build_qwen3_moe_layers(
            n_layers=f.num_hidden_layers, dim=dim, n_heads=f.num_attention_heads, n_kv_heads=f.num_key_value_heads,
            head_dim=head_dim, moe_hidden_dim=f.moe_intermediate_size, num_experts=f.num_experts,
            top_k=f.num_experts_per_tok, attn_backend=attn_backend, moe_comm_backend="standard",
            rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=f.max_position_embeddings,
                                   theta=f.rope_parameters["rope_theta"])),
    )
    stock = qwen3_registry("debugmodel_moe", attn_backend=attn_backend)
    return dataclasses.replace(stock, flavor=preset, model=with_bag_embedding(model))
