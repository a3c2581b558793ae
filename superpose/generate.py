"""Sample text from an exported model with plain `transformers` (the export is an ordinary HF model)."""
from __future__ import annotations

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


def generate(path: str | Path, prompt: str = GenerateOptions.prompt, max_new_tokens: int = GenerateOptions.max_new_tokens,
             temperature: float = GenerateOptions.temperature, top_k: int = GenerateOptions.top_k,
             samples: int = GenerateOptions.samples, seed: int = GenerateOptions.seed) -> list[str]:
    for name, value, low in (("--max-new-tokens", max_new_tokens, 1), ("--samples", samples, 1), ("--top-k", top_k, 0)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    directory = resolve_model_dir(path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids if prompt else torch.tensor([[tokenizer.eos_token_id]])
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=temperature > 0, temperature=temperature or None,
                         top_k=top_k, max_new_tokens=max_new_tokens, num_return_sequences=samples,
                         pad_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out]
