"""A torchtitan checkpoint of a llama3 TST run as a Hugging Face model directory.

    python -m superpose.torchtitan.export CONFIG CHECKPOINT_DIR DATA_DIR OUT_DIR

CONFIG names a ``config_registry`` function (the model's shape), CHECKPOINT_DIR is torchtitan's
``DUMP/checkpoint/step-N``, DATA_DIR the prepared directory (its tokenizer). torchtitan's own
state-dict adapter (``Llama3StateDictAdapter.to_hf``) renames the weights; superpose's
``write_model_dir`` writes them with an HF config, the tokenizer and a manifest, atomically, so
``superpose eval`` and ``superpose generate`` read the result like one of their own exports.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import LlamaConfig, LlamaForCausalLM

from ..data import TokenData
from ..errors import CheckpointError, ConfigError, UserError
from ..export import write_model_dir


def hf_llama_config(model) -> LlamaConfig:
    """The transformers ``LlamaConfig`` of a torchtitan ``Llama3Model.Config`` (untied, no RoPE scaling)."""
    attention, rope = model.layers[0].attention, model.layers[0].attention.rope
    if rope.scaling != "none" or model.enable_weight_tying:
        raise ConfigError("the HF export handles untied llama3 models without RoPE scaling (superpose's shapes)")
    return LlamaConfig(
        vocab_size=model.vocab_size, hidden_size=model.dim, intermediate_size=model.layers[0].feed_forward.w1.out_features,
        num_hidden_layers=len(model.layers), num_attention_heads=attention.n_heads,
        num_key_value_heads=attention.n_kv_heads or attention.n_heads, max_position_embeddings=rope.max_seq_len,
        rope_theta=rope.theta, rms_norm_eps=model.norm.eps, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


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
    hf_config = hf_llama_config(model_spec.model)
    with torch.device("meta"):
        lm = LlamaForCausalLM(hf_config)
        names = list(model_spec.model.build().state_dict())
    adapter = model_spec.state_dict_adapter(model_spec.model, None)
    weights = adapter.to_hf(read_model_weights(checkpoint, names))
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
