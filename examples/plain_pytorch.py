"""TST in your own training loop: a nanoGPT-style loop around a Hugging Face causal LM.

    superpose prepare --out data/shakespeare                # once: token shards + tokenizer
    python examples/plain_pytorch.py --data data/shakespeare --steps 300

Only superpose's public functions touch the method: ``build_stages``/``stage_at`` say which stage a
step is in, ``window_length``/``split_window`` cut a window of tokens into bags and their targets,
``embed_bags`` averages each bag's embeddings, ``multi_hot_cross_entropy`` scores the next bag.
With bag size 1 (phase 2) the same lines are ordinary next-token training.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from superpose import build_stages, embed_bags, multi_hot_cross_entropy, split_window, stage_at, window_length
from superpose.config import TSTConfig
from superpose.data import TokenData


def batch(tokens: np.ndarray, width: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``size`` random windows of ``width`` tokens: ``[B, W]`` int64."""
    starts = torch.randint(0, len(tokens) - width, (size,), generator=gen).tolist()
    return torch.stack([torch.from_numpy(tokens[i : i + width].astype(np.int64)) for i in starts])


def loss_of(model: LlamaForCausalLM, window: torch.Tensor, bag_size: int) -> torch.Tensor:
    inputs, targets = split_window(window, bag_size)  # [B, L, s], [B, L, s]: bag i predicts bag i+1
    x = embed_bags(model.get_input_embeddings(), inputs)  # [B, L, d]
    hidden = model.model(inputs_embeds=x).last_hidden_state  # [B, L, d]
    return multi_hot_cross_entropy(model.lm_head(hidden), targets)  # logits [B, L, V]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a directory written by `superpose prepare`")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bag-size", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = TokenData(args.data)
    train, val = np.concatenate(data.splits["train"]), np.concatenate(data.splits["val"])
    model = LlamaForCausalLM(LlamaConfig(vocab_size=data.vocab_size, hidden_size=128, intermediate_size=512,
                                         num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=args.seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    stages = build_stages(TSTConfig(bag_size=args.bag_size, ratio=args.ratio), args.steps)  # phase 1, then next-token
    gen = torch.Generator().manual_seed(0)
    val_windows = batch(val, args.seq_len + 1, 32, torch.Generator().manual_seed(1))  # [32, L+1], fixed

    def validate() -> float:
        with torch.no_grad():
            return loss_of(model, val_windows, 1).item()  # next-token loss, nats

    warmup = decay = max(1, args.steps // 10)  # warmup-stable-decay over the whole run, as in the paper
    print(f"step 0: val loss {validate():.3f}")
    for step in range(args.steps):
        stage = stage_at(stages, step)
        window = batch(train, window_length(args.seq_len, stage.bag_size), args.batch_size, gen)  # [B, s*L + s]
        loss = loss_of(model, window, stage.bag_size)  # MCE in phase 1 (without log s), cross-entropy in phase 2
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min((step + 1) / warmup, 1.0, (args.steps - step) / decay)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step + 1 == stages[0].end_step or (step + 1) % 50 == 0:
            print(f"step {step + 1} ({stage.name}, s={stage.bag_size}): train loss {loss.item():.3f}, val loss {validate():.3f}")
    final = validate()
    print(f"final val loss {final:.4f} ({final / math.log(2) / data.bytes_per_token('val'):.4f} bits/byte)")


if __name__ == "__main__":
    main()
