"""One TSTTrainer run for tests/test_hf_trainer_distributed.py, in one process or under torchrun.

The tiny preset on fixed random windows, read in order (a sequential sampler), so that a global
batch of B windows holds the same windows on 1 rank as on N ranks of B / N each. Rank 0 writes
the per-step training records (loss, grad norm, tst_bag_size) as JSON to ``--records``.

    python tests/trainer_run.py --run-dir DIR --records LOG.json --batch 4
    torchrun --nproc-per-node 2 tests/trainer_run.py --run-dir DIR --records LOG.json --batch 2
    torchrun --nproc-per-node 2 tests/trainer_run.py ... --fsdp   # Trainer's own FSDP2 (accelerate)

``--fsdp`` runs Trainer's FSDP2 on CPU through tests/fsdp_on_cpu.py.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import SequentialSampler
from transformers import TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsdp_on_cpu import allow_fsdp_on_cpu  # noqa: E402  (this directory)

from superpose.config import TSTConfig  # noqa: E402
from superpose.hf_trainer import TSTTrainer, end_training, window_tokens  # noqa: E402
from superpose.model import build_model  # noqa: E402

VOCAB, L, S = 64, 8, 4


class Windows(torch.utils.data.Dataset):
    def __init__(self, n: int, width: int):
        self.ids = torch.randint(0, VOCAB, (n, width), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


class InOrder(TSTTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--records", required=True)
    p.add_argument("--batch", type=int, required=True, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--stop-at", type=int, default=0, help="stop after this step (a checkpoint is saved there)")
    p.add_argument("--resume", help="a Trainer checkpoint directory")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--fsdp", action="store_true", help="Trainer's FSDP2 (full shard, sharded checkpoints)")
    args = p.parse_args()
    tst = TSTConfig(bag_size=S, ratio=0.5)
    torch.manual_seed(0)
    model = build_model(args.preset, VOCAB, L)
    fsdp = {}
    if args.fsdp:
        allow_fsdp_on_cpu()
        fsdp = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": model._no_split_modules,
                                              "state_dict_type": "SHARDED_STATE_DICT"}}
    training = TrainingArguments(output_dir=args.run_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
                                 gradient_accumulation_steps=args.grad_accum, learning_rate=1e-3, logging_steps=1,
                                 save_steps=args.stop_at or 10**6, report_to="none", seed=0, disable_tqdm=True,
                                 lr_scheduler_type="linear", warmup_steps=1, use_cpu=True,
                                 dataloader_pin_memory=False, **fsdp)
    trainer = InOrder(model=model, args=training, train_dataset=Windows(64, window_tokens(L, tst)), tst=tst, seq_len=L,
                      callbacks=[StopAt(args.stop_at)] if args.stop_at else [])
    trainer.train(resume_from_checkpoint=args.resume)
    if args.fsdp:  # the run really was sharded, not DDP
        from torch.distributed.tensor import DTensor

        assert trainer.is_fsdp_enabled and all(isinstance(p, DTensor) for p in trainer.model.parameters())
    if int(os.environ.get("RANK", "0")) == 0:
        records = [h for h in trainer.state.log_history if "loss" in h]
        Path(args.records).write_text(json.dumps(records))
    end_training(trainer)  # else a gloo rank can hang or abort at exit
    # what keeps it from hanging, checked every run (it hung in 5 of 13 runs): no DDP wrapper outlived the group
    assert not torch.distributed.is_initialized() and not any(isinstance(o, DistributedDataParallel) for o in gc.get_objects())


if __name__ == "__main__":
    main()
