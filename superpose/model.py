"""Models: named presets built from `transformers` configs, and the TST forward over any HF causal LM.

The TST forward touches only the public interface of a Hugging Face causal LM:
``get_input_embeddings()``, the body (``base_model``) or the whole LM called with
``inputs_embeds``, and ``get_output_embeddings()``. The weights and their layout are untouched, so the trained model
is an ordinary checkpoint of its class. (Models whose CausalLM head post-processes logits, e.g.
with soft-capping, are not covered: the presets are Llama and Qwen3-MoE.)
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen3MoeConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .distributed import all_reduce_sum
from .errors import ModelError
from .loss import chunked_head_mce_sum, multi_hot_cross_entropy_sum
from .method import embed_bags


def _llama(hidden, intermediate, layers, heads, kv_heads, max_pos, rope_theta) -> dict:
    return dict(
        kind="llama",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        rope_theta=rope_theta,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )


def _qwen3_moe(hidden, layers, heads, kv_heads, head_dim, experts, top_k, expert_size, max_pos) -> dict:
    return dict(
        kind="qwen3_moe",
        hidden_size=hidden,
        intermediate_size=expert_size * top_k,
        moe_intermediate_size=expert_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_experts=experts,
        num_experts_per_tok=top_k,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        router_aux_loss_coef=0.001,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
    )


# Shapes: tiny trains on 2 CPU cores; small (d=256, 6 layers, ~10M parameters with an 8k vocabulary)
# is the CPU benchmark model of configs/gutenberg.toml; llama-270m / llama-600m are SmolLM2-135M / -360M with
# untied embeddings (270M / 600M with a Llama-3-sized vocabulary, as in the paper); llama-3b is
# the SmolLM3-3B shape; qwen3-moe-10b-a1b has ~10B parameters with ~1B active per token.
PRESETS: dict[str, dict] = {
    "tiny": _llama(128, 512, 4, 4, 4, 2048, 10000.0),
    "small": _llama(256, 1024, 6, 4, 4, 2048, 10000.0),
    "llama-270m": _llama(576, 1536, 30, 9, 3, 8192, 100000.0),
    "llama-600m": _llama(960, 2560, 32, 15, 5, 8192, 100000.0),
    "llama-3b": _llama(2048, 11008, 36, 16, 4, 65536, 5000000.0),
    "qwen3-moe-tiny": _qwen3_moe(128, 4, 4, 2, 32, 8, 2, 128, 2048),
    "qwen3-moe-10b-a1b": _qwen3_moe(1536, 24, 16, 4, 128, 128, 8, 640, 8192),
}


def model_config(preset: str, vocab_size: int) -> PretrainedConfig:
    """A preset name, or a local HF model/config directory; vocab size follows the tokenizer for presets."""
    if preset in PRESETS:
        fields = dict(PRESETS[preset])
        kind = fields.pop("kind")
        cls = LlamaConfig if kind == "llama" else Qwen3MoeConfig
        return cls(vocab_size=vocab_size, bos_token_id=None, eos_token_id=None, pad_token_id=None, **fields)
    path = Path(preset)
    if not (path / "config.json").is_file():
        raise ModelError(f"model.preset {preset!r} is neither a preset ({', '.join(PRESETS)}) nor a directory with config.json")
    return AutoConfig.from_pretrained(path, local_files_only=True)


# transformers' "sdpa" under a name without a mask function: the model then builds no mask and SDPA
# runs causal (is_causal, the flash kernel). Its mask creation for "sdpa" reads the position ids
# back to the host (masking_utils.find_packed_sequence_indices) on every forward: a GPU sync.
CAUSAL_SDPA = "superpose_causal_sdpa"
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)


def training_attention(config: PretrainedConfig, attn_implementation: str) -> str:
    """The attention a model trains with: "sdpa" becomes ``CAUSAL_SDPA`` for a model whose every
    layer is fully causal (no sliding window), since TST's forwards have no padding and no packed
    sequences; any other choice stands. Not saved: an exported config names no attention."""
    windowed = (getattr(config, "sliding_window", None)
                or any(t != "full_attention" for t in getattr(config, "layer_types", None) or []))
    return CAUSAL_SDPA if attn_implementation == "sdpa" and not windowed else attn_implementation


def build_model(preset: str, vocab_size: int, seq_len: int, attn_implementation: str = "sdpa", meta: bool = False) -> nn.Module:
    """A fresh causal LM (or the weights of a local HF model directory), checked against the data.

    ``meta``: a fresh model is built on the meta device, without memory or random draws, to be
    sharded and then initialised (``superpose.meta_init``); weights from a directory load as they are."""
    config = model_config(preset, vocab_size)
    config._attn_implementation = training_attention(config, attn_implementation)
    path = Path(preset)
    has_weights = preset not in PRESETS and (any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")))
    if config.vocab_size < vocab_size:
        raise ModelError(
            f"the tokenizer has {vocab_size} tokens but the model's vocabulary has {config.vocab_size}; "
            "use a tokenizer that matches the model"
        )
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ModelError(f"data.seq_len = {seq_len} exceeds the model's max_position_embeddings = {max_pos}")
    if has_weights:
        return AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True, dtype=torch.float32)
    with torch.device("meta") if meta else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


class TSTModel(nn.Module):
    """A causal LM scored on (inputs ``[B, L, k]``, targets ``[B, L, m]``) for any stage.

    ``forward`` returns the un-normalised loss sum and its weight (see
    ``multi_hot_cross_entropy_sum``), so that the trainer divides by the global weight of the
    whole step. Wrapping the LM in this module lets DDP/FSDP see one forward per micro-batch.
    With ``loss_chunk_size`` > 0 the head and the loss run that many positions at a time
    (``superpose.loss.ChunkedHeadCrossEntropy``), so the full ``[B*L, V]`` logits never exist.
    """

    def __init__(self, lm: nn.Module, loss_chunk_size: int = 0):
        super().__init__()
        self.lm = lm
        embed_bags_in_forward(lm.base_model)
        self.loss_chunk_size = loss_chunk_size
        if loss_chunk_size and not isinstance(lm.get_output_embeddings(), nn.Linear):
            raise ModelError("model.loss_chunk_size needs an nn.Linear output head; set it to 0 for this model")

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
        out = self.lm.base_model(**tst_inputs(self.lm, inputs))  # the body only: the head runs in the loss
        return tst_loss_sum(self.lm, out, targets, weights, self.training, self.loss_chunk_size)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks of an HF causal LM (the ModuleList under its body), as the model
    holds them: a block wrapped for activation checkpointing is its wrapper."""
    body = model.lm.base_model
    for child in body.children():
        if isinstance(child, nn.ModuleList):
            return child
    raise ModelError(f"cannot find the transformer blocks (a ModuleList) of {type(body).__name__} to shard or checkpoint")


def is_moe(lm: nn.Module) -> bool:
    """A mixture of experts, which adds its load-balancing loss in training (Qwen3-MoE and kin)."""
    return hasattr(lm.config, "router_aux_loss_coef")


BAGS = "tst_bags"  # the keyword that carries bags of token ids [B, L, k] into a hooked forward


def embed_bags_in_forward(module: nn.Module) -> None:
    """Let ``module(tst_bags=ids [B, L, k], ...)`` (an HF body or causal LM) embed each bag as the
    mean of its token embeddings *inside its own call*, as ``inputs_embeds``.

    Why inside: a sharded model holds its embedding weight gathered only during its forward. FSDP2
    prepends its all-gather to the forward pre-hooks and FSDP1/DDP call the module from their own
    forward, so this hook (appended) reads the whole weight, and its gradient is reduced with the
    rest. Installed once per module; a forward without ``tst_bags`` is untouched.
    """
    if getattr(module, "_tst_bag_hook", None) is None:
        module._tst_bag_hook = module.register_forward_pre_hook(_embed_bags_hook, with_kwargs=True)


def _embed_bags_hook(module: nn.Module, args: tuple, kwargs: dict):
    """The pre-hook of ``embed_bags_in_forward`` (module-level, so a hooked model still pickles)."""
    if BAGS not in kwargs:
        return None
    bags = kwargs.pop(BAGS)  # [B, L, k]
    return args, {**kwargs, "inputs_embeds": embed_bags(module.get_input_embeddings(), bags)}  # [B, L, d]


def tst_inputs(lm: nn.Module, inputs: torch.Tensor) -> dict:
    """Keyword arguments of a forward hooked by ``embed_bags_in_forward`` (the body or the whole
    causal LM) for inputs ``[B, L, k]``: the bags, no KV cache, and the router logits of an MoE."""
    return {BAGS: inputs, "use_cache": False, **({"output_router_logits": True} if is_moe(lm) else {})}


def tst_loss_sum(lm: nn.Module, out, targets: torch.Tensor, weights: torch.Tensor, training: bool,
                 loss_chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The TST loss of one forward as ``(sum, weight)`` (``multi_hot_cross_entropy_sum``), for
    both ``TSTModel`` and ``TSTTrainer``: the multi-hot loss of targets ``[B, L, m]``, plus, for an
    MoE in training, its load-balancing loss (``router_balance_loss``) times the weight.

    ``out`` is the output of the body (``last_hidden_state``: the head runs here, ``loss_chunk_size``
    positions at a time if > 0) or of the whole causal LM (``logits`` ``[B, L, V]``)."""
    if getattr(out, "logits", None) is not None:
        loss_sum, weight = multi_hot_cross_entropy_sum(out.logits, targets, weights)
    else:
        head, hidden = lm.get_output_embeddings(), out.last_hidden_state  # [B, L, d]
        if loss_chunk_size:
            loss_sum, weight = chunked_head_mce_sum(hidden, head, targets, weights, loss_chunk_size)
        else:
            loss_sum, weight = multi_hot_cross_entropy_sum(head(hidden), targets, weights)  # logits [B, L, V]
    if training and is_moe(lm):
        loss_sum = loss_sum + lm.config.router_aux_loss_coef * router_balance_loss(lm, out) * weight
    return loss_sum, weight


def router_balance_loss(lm: nn.Module, out) -> torch.Tensor:
    """The MoE load-balancing loss of the model's own CausalLM forward, over the *global* batch.

    ``E * sum_e f_e * P_e`` over all layers' rows, where f_e is the share of top-k assignments
    that go to expert e (no gradient) and P_e the mean router probability of e. f is summed over
    all ranks and P is this rank's mean: since every rank holds as many rows, the ranks' average
    (what DDP/FSDP take of the gradients, and what the trainer logs) is exactly the loss of the
    global batch, so the world size does not change the run. On one process it equals
    ``load_balancing_loss_func`` of transformers (global-batch balancing: Qiu et al. 2025,
    arXiv 2501.11873).
    """
    experts, top_k = lm.config.num_experts, lm.config.num_experts_per_tok
    probs = torch.cat(out.router_logits).float().softmax(dim=-1)  # [layers*N, E]
    chosen = probs.topk(top_k, dim=-1).indices.flatten()  # [layers*N*k]
    # Counted by scatter (exact: fp32 sums of ones), not one-hot: no [layers*N, k, E] tensor.
    # The row count is made on the device: a host tensor copied in would wait for the GPU.
    counts = probs.new_zeros(experts).scatter_add_(0, chosen, probs.new_ones(chosen.shape))  # [E]
    rows = probs.new_full((1,), probs.shape[0])  # [1]
    totals = all_reduce_sum(torch.cat([counts, rows]))  # [E + 1], summed over ranks
    fraction = totals[:experts] / totals[experts]  # [E]
    return experts * (fraction * probs.mean(dim=0)).sum()


def count_parameters(lm: nn.Module) -> dict:
    """Total parameters, and the matmul parameters one token passes through (MoE: top-k of E experts)."""
    total = sum(p.numel() for p in lm.parameters())
    embedding = lm.get_input_embeddings().weight.numel()
    experts = sum(p.numel() for n, p in lm.named_parameters() if ".experts." in n or n.endswith(".experts"))
    config = lm.config
    active_experts = experts * getattr(config, "num_experts_per_tok", 1) / max(1, getattr(config, "num_experts", 1))
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    matmul = total - embedding - experts + active_experts + (embedding if tied else 0)
    return {"total": total, "active_matmul": int(matmul)}


def flops_per_step(lm: nn.Module, seq_len: int, positions: int) -> float:
    """Training FLOPs of one step over ``positions`` model positions (forward + backward).

    ``6 * N_active * positions + 6 * n_layers * L * d_attn * positions`` where N_active counts
    the matmul weights a position passes through (the output head included, the input embedding
    lookup excluded, MoE experts scaled by top-k / E) and the second term is the attention
    score and value products (QK^T and AV: 2 * 2 * L * d_attn per position forward, x3 for
    backward; causal masking not discounted, as in the PaLM paper's accounting). Bag averaging
    costs O(s*d) per position and is ignored, so a phase-1 step and a phase-2 step count alike.
    """
    config = lm.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d_attn = config.num_attention_heads * head_dim
    n_active = count_parameters(lm)["active_matmul"]
    return 6.0 * n_active * positions + 6.0 * config.num_hidden_layers * seq_len * d_attn * positions
