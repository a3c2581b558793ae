"""Sample text from an exported model with plain `transformers` (the export is an ordinary HF model)."""
from __future__ import annotations

import json
from pathlib import Path

from .config import GenerateOptions
from .errors import ConfigError


def resolve_model_dir(path: str | Path) -> Path:
    """A run directory means its exported ``model/``; anything else must be an HF model directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a run directory or an exported model directory")
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"{path} is neither a run directory with model/ nor an HF model directory")


def model_positions(directory: Path) -> int | None:
    """The positions an exported model was built for (``max_position_embeddings``), if its config says."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config") or config  # a multimodal config nests the language model's
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def generate(path: str | Path, prompt: str = GenerateOptions.prompt, max_new_tokens: int = GenerateOptions.max_new_tokens,
             temperature: float = GenerateOptions.temperature, top_k: int = GenerateOptions.top_k,
             samples: int = GenerateOptions.samples, seed: int = GenerateOptions.seed) -> list[str]:
    for name, value, low in (("--max-new-tokens", max_new_tokens, 1), ("--samples", samples, 1), ("--top-k", top_k, 0)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    directory = resolve_model_dir(path)
    positions = model_positions(directory)
    if positions is not None and max_new_tokens >= positions:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} is beyond the model's {positions} positions; "
                          f"give at most {positions - 1} (less the prompt's tokens)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .progress import hf_progress_bars

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    with hf_progress_bars(False):  # no "Loading weights" bar before the text
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids if prompt else torch.tensor([[tokenizer.eos_token_id]])
    if positions is not None and ids.shape[1] + max_new_tokens > positions:
        raise ConfigError(f"the prompt ({ids.shape[1]} tokens) and --max-new-tokens {max_new_tokens} exceed the model's "
                          f"{positions} positions; give --max-new-tokens {max(positions - ids.shape[1], 0)} or less, "
                          "or a shorter prompt")
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=temperature > 0, temperature=temperature or None,
                         top_k=top_k, max_new_tokens=max_new_tokens, num_return_sequences=samples,
                         pad_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out]
