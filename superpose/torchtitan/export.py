"""A torchtitan checkpoint of a TST run (llama3 or qwen3 MoE) as a Hugging Face model directory.

    python -m superpose.torchtitan.export CONFIG CHECKPOINT_DIR DATA_DIR OUT_DIR

CONFIG names a ``config_registry`` function (the model's shape), CHECKPOINT_DIR is torchtitan's
``DUMP/checkpoint/step-N``, DATA_DIR the prepared directory (its tokenizer). torchtitan's own
state-dict adapter (``Llama3StateDictAdapter`` / ``Qwen3StateDictAdapter.to_hf``) renames the
weights; superpose's ``write_model_dir`` writes them with an HF config (``hf_config``), the
tokenizer and a manifest, atomically, so ``superpose eval`` and ``superpose generate`` read the
result like one of their own exports. A qwen3 MoE is written with one tensor per expert (HF's
checkpoint layout; transformers fuses them on load).

torchtitan's MoE balances its experts without an auxiliary loss: a per-layer bias, updated each
optimizer step, is added to the router's probabilities to choose the top-k experts (DeepSeek-V3's
method). HF's ``Qwen3MoeForCausalLM`` has no such bias, so a checkpoint whose bias is not zero
would route tokens differently there: its export is refused.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torchtitan.models.llama3 import Llama3Model
from torchtitan.models.qwen3.model import Qwen3Model
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen3MoeConfig

from ..data import TokenData
from ..errors import CheckpointError, ConfigError, ModelError, UserError
from ..export import write_model_dir
from ..files import StagedDir

EXPERT_BIAS = "moe.expert_bias_E"  # torchtitan's load-balancing bias of an MoE layer, [E]


def hf_config(model) -> PretrainedConfig:
    """The transformers config of a torchtitan model config: ``LlamaConfig`` for llama3, ``Qwen3MoeConfig``
    for a qwen3 MoE; untied, no RoPE scaling, every layer alike (superpose's presets). Built on the meta
    device it also counts the model (``superpose.model.count_parameters``)."""
    if isinstance(model, Llama3Model.Config):
        kind, cls, layer_fields = "llama3", LlamaConfig, _llama_layer
    elif isinstance(model, Qwen3Model.Config) and all(layer.moe is not None for layer in model.layers):
        kind, cls, layer_fields = "qwen3 MoE", Qwen3MoeConfig, _qwen3_moe_layer
    else:
        dense = " without MoE layers" if isinstance(model, Qwen3Model.Config) else ""
        raise ConfigError(f"the HF export handles torchtitan's llama3 and qwen3 MoE models, not {type(model).__qualname__}"
                          f"{dense}")
    layers = [layer_fields(layer) for layer in model.layers]  # [(HF fields, {what HF cannot express: present})]
    fields, unsupported = layers[0]
    eps = {model.norm.eps} | {norm.eps for layer in model.layers for norm in _norms(layer)}
    problems = {"tied embeddings": model.enable_weight_tying, "RoPE scaling": model.layers[0].attention.rope.scaling != "none",
                "layers of different shapes": any(other != layers[0] for other in layers), "norms of different eps": len(eps) > 1,
                **unsupported}
    if any(problems.values()):
        found = ", ".join(what for what, present in problems.items() if present)
        raise ConfigError(f"the HF export of a {kind} model does not handle {found} (superpose's presets have none)")
    return cls(vocab_size=model.vocab_size, hidden_size=model.dim, num_hidden_layers=len(model.layers),
               rms_norm_eps=model.norm.eps, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
               **fields)


def _norms(layer) -> list:
    qk = layer.attention.qk_norm
    return [layer.attention_norm, layer.ffn_norm, *([qk] if qk is not None else [])]


def _attention(layer) -> tuple[dict, dict]:
    """The HF fields of a layer's torchtitan ``GQAttention``, and what HF's attention cannot express."""
    attention = layer.attention
    qkv = attention.qkv_linear  # fused (wqkv) or not (wq, wk, wv)
    biased = attention.wo.bias or any(getattr(qkv, name).bias for name in ("wqkv", "wq", "wk", "wv") if hasattr(qkv, name))
    fields = dict(num_attention_heads=attention.n_heads, num_key_value_heads=attention.n_kv_heads or attention.n_heads,
                  head_dim=attention.head_dim or attention.dim // attention.n_heads,
                  max_position_embeddings=attention.rope.max_seq_len, rope_theta=attention.rope.theta)
    return fields, {"attention biases": biased}


def _llama_layer(layer) -> tuple[dict, dict]:
    fields, unsupported = _attention(layer)
    unsupported["QK norms"] = layer.attention.qk_norm is not None
    return {**fields, "intermediate_size": layer.feed_forward.w1.out_features}, unsupported


def _qwen3_moe_layer(layer) -> tuple[dict, dict]:
    fields, unsupported = _attention(layer)
    moe, router = layer.moe, layer.moe.router
    experts = moe.routed_experts.inner_experts
    unsupported.update({
        "attention without QK norms": layer.attention.qk_norm is None, "shared experts": moe.shared_experts is not None,
        "a router other than softmax top-k": (router.score_func != "softmax" or router.route_scale != 1.0 or router.gate.bias
                                              or router.num_expert_groups is not None or router._debug_force_load_balance)})
    return {**fields, "num_experts": experts.num_experts, "num_experts_per_tok": router.top_k,
            "norm_topk_prob": router.route_norm, "moe_intermediate_size": experts.hidden_dim,
            "intermediate_size": experts.hidden_dim * router.top_k, "decoder_sparse_step": 1, "mlp_only_layers": []}, unsupported


def read_model_weights(checkpoint: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The model tensors ``names`` of a torchtitan DCP checkpoint, full, in this process (no optimizer state)."""
    try:
        metadata = dcp.FileSystemReader(checkpoint).read_metadata()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{checkpoint} is not a torchtitan checkpoint directory ({err})") from None
    stored = metadata.state_dict_metadata
    missing = [n for n in names if not isinstance(stored.get(n), TensorStorageMetadata)]
    if missing:
        raise CheckpointError(f"{checkpoint} lacks model weights {', '.join(missing[:3])}: not a checkpoint of this model")
    weights = {n: torch.empty(stored[n].size, dtype=stored[n].properties.dtype) for n in names}
    dcp.load(weights, checkpoint_id=checkpoint, no_dist=True)
    return weights


def export(model_spec, checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path, force: bool = False) -> None:
    """Write ``out_dir``: the HF model of ``checkpoint`` with the tokenizer of ``data_dir`` (an existing export
    is replaced only with ``force``: superpose's directory rule)."""
    checkpoint = Path(checkpoint)
    data = TokenData(data_dir)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(hf_config(model_spec.model), dtype=torch.float32)
        names = list(model_spec.model.build().state_dict())
    StagedDir(out_dir, "model", "OUT_DIR", force).check()  # before the weights are read
    weights = read_model_weights(checkpoint, names)
    biased = [name for name in names if name.endswith(EXPERT_BIAS) and weights[name].any()]
    if biased:
        raise ModelError(f"{checkpoint} routes with torchtitan's load-balancing expert bias ({biased[0]} is not zero), which "
                         "Hugging Face's Qwen3Moe cannot express: its export would choose other experts, so it is refused")
    adapter = model_spec.state_dict_adapter(model_spec.model, None)
    weights = adapter.to_hf(weights)  # the expert bias is torchtitan's alone: to_hf leaves it out
    info = {"framework": "torchtitan", "checkpoint": str(checkpoint)}
    write_model_dir(weights, lm, data.tokenizer(), data.eos_id, Path(out_dir), info, force)


def main(argv: list[str] | None = None) -> int:
    from . import config_registry

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    name, checkpoint, data_dir, out_dir = args
    make = getattr(config_registry, name, None)
    try:
        if make is None:
            raise ConfigError(f"no config {name!r} in superpose.torchtitan.config_registry")
        export(make().model_spec, checkpoint, data_dir, out_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
