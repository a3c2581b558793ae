"""TSTTrainer: the stage of every micro-batch, the loss of each stage against a naive reference,
resume equals an uninterrupted run, and the example script learns through the switch."""
import importlib.util
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("accelerate")
from transformers import TrainerCallback, TrainingArguments

from superpose.config import TSTConfig
from superpose.corpus import shakespeare_files
from superpose.hf_trainer import TSTTrainer, window_tokens
from superpose.method import embed_bags, split_window
from superpose.model import TSTModel, build_model, embed_bags_in_forward

VOCAB, L, S = 64, 8, 4
ROOT = Path(__file__).resolve().parents[1]


class Windows(torch.utils.data.Dataset):
    """Fixed random token windows: enough to exercise the trainer, not to learn from."""

    def __init__(self, n, width, seed=0):
        self.ids = torch.randint(0, VOCAB, (n, width), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


class Recorder(TSTTrainer):
    """Records (optimizer step, bag size, tokens read) of every micro-batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.calls.append((self.state.global_step, self.last_stage.bag_size))
        return out


def make_trainer(out, steps, tst, grad_accum=1, save_steps=1000, callbacks=(), cls=TSTTrainer, init_seed=0):
    torch.manual_seed(init_seed)
    model = build_model("tiny", VOCAB, L)
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                             gradient_accumulation_steps=grad_accum, learning_rate=1e-3, logging_steps=1,
                             save_steps=save_steps, report_to="none", seed=0, disable_tqdm=True,
                             lr_scheduler_type="linear", warmup_steps=1,
                             dataloader_pin_memory=torch.cuda.is_available())
    trainer = cls(model=model, args=args, train_dataset=Windows(64, window_tokens(L, tst)),
                  tst=tst, seq_len=L, callbacks=list(callbacks))
    trainer.calls = []
    return trainer


def test_stage_switches_at_the_optimizer_step_with_gradient_accumulation(tmp_path):
    tst = TSTConfig(bag_size=S, ratio=0.5)
    trainer = make_trainer(tmp_path, steps=6, tst=tst, grad_accum=3, cls=Recorder)
    trainer.train()
    # 3 micro-batches per optimizer step; steps 0-2 superposition, 3-5 next-token.
    assert trainer.calls == [(step, S if step < 3 else 1) for step in range(6) for _ in range(3)]
    logged = {h["step"]: h["tst_bag_size"] for h in trainer.state.log_history if "loss" in h}
    assert logged == {1: S, 2: S, 3: S, 4: 1, 5: 1, 6: 1}


def test_curriculum_and_blend_stages_follow_the_schedule(tmp_path):
    tst = TSTConfig(curriculum=[[8, 0.25], [4, 0.25]], blend_steps=2)
    assert window_tokens(L, tst) == 8 * L + 8
    trainer = make_trainer(tmp_path, steps=8, tst=tst, cls=Recorder)
    trainer.train()
    # s=8 for 2 steps, s=4 for 2 steps turning into next-token steps (blend), then next-token.
    assert [bag for _, bag in trainer.calls] == [8, 8, 4, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="Trainer owns"):
        make_trainer(tmp_path, steps=8, tst=TSTConfig(lr_scale=2.0))


def test_stage_losses_match_naive_references(tmp_path):
    tst = TSTConfig(bag_size=S, ratio=0.5)
    trainer = make_trainer(tmp_path, steps=10, tst=tst)
    trainer.state.max_steps = 10
    model = trainer.model.train()
    ids = Windows(3, window_tokens(L, tst), seed=1).ids  # [3, S*L+S]
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        trainer.state.global_step = 4  # phase 1: each position averages a bag, predicts the next bag
        bags = ids.view(3, L + 1, S)
        logits = model(inputs_embeds=emb[bags[:, :-1]].mean(dim=2)).logits  # [3, L, V]
        naive = sum(F.cross_entropy(logits.reshape(-1, VOCAB), bags[:, 1:, j].reshape(-1)) for j in range(S)) / S
        torch.testing.assert_close(trainer.compute_loss(model, {"input_ids": ids}), naive)
        trainer.state.global_step = 7  # phase 2: next-token loss on the row the step selects
        row = ids[:, 3 * (L + 1) : 4 * (L + 1)]  # step 7 of 4 rows -> row 3
        plain = F.cross_entropy(model(input_ids=row[:, :-1]).logits.reshape(-1, VOCAB), row[:, 1:].reshape(-1))
        torch.testing.assert_close(trainer.compute_loss(model, {"input_ids": ids}), plain)


def test_moe_loss_is_the_loss_of_superpose_train(tmp_path):
    """One TST loss: the Trainer scores a phase-1 MoE batch (multi-hot loss plus load-balancing
    loss) exactly as ``TSTModel``, the forward of ``superpose train``. On one process the balance
    loss equals transformers' own; that it is the global batch's is the slow 2-rank test of
    tests/test_hf_trainer_distributed.py."""
    tst = TSTConfig(bag_size=S, ratio=0.5)
    trainer = make_trainer(tmp_path, steps=10, tst=tst)
    trainer.state.max_steps, trainer.state.global_step = 10, 2
    torch.manual_seed(0)
    lm = build_model("qwen3-moe-tiny", VOCAB, L).train()
    ids = Windows(3, window_tokens(L, tst), seed=2).ids  # [3, S*L+S]
    with torch.no_grad():
        x, y = split_window(ids, S, "full")  # [3, L, S] each
        loss_sum, weight = TSTModel(lm).train()(x, y, torch.full((S,), 1 / S))
        torch.testing.assert_close(trainer.compute_loss(lm, {"input_ids": ids}), loss_sum / weight)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def test_resume_at_the_switch_equals_uninterrupted(tmp_path):
    tst = TSTConfig(bag_size=S, ratio=0.5)
    whole = make_trainer(tmp_path / "whole", steps=6, tst=tst, grad_accum=2)
    whole.train()
    first = make_trainer(tmp_path / "split", steps=6, tst=tst, grad_accum=2, save_steps=3, callbacks=[StopAt(3)])
    first.train()
    assert first.state.global_step == 3
    second = make_trainer(tmp_path / "split", steps=6, tst=tst, grad_accum=2, cls=Recorder, init_seed=1)
    second.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-3"))
    assert second.calls[0] == (3, 1)  # the resumed run starts in the next-token stage
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_bags_are_embedded_inside_the_forward_call():
    """``tst_bags`` reaches the model as the mean bag embeddings, after the pre-hooks that come
    first (FSDP2 prepends its all-gather); other forwards are untouched; the hook is installed once
    however often it is asked for, and a hooked model still pickles."""
    torch.manual_seed(0)
    lm = build_model("tiny", VOCAB, L).eval()
    bags = torch.randint(0, VOCAB, (2, L, S))  # [B, L, k]
    expected = lm(inputs_embeds=embed_bags(lm.get_input_embeddings(), bags)).logits
    ids = bags[..., 0]
    plain = lm(ids).logits
    embed_bags_in_forward(lm)
    embed_bags_in_forward(lm)
    seen = []
    lm.register_forward_pre_hook(lambda module, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True, prepend=True)
    torch.testing.assert_close(lm(tst_bags=bags).logits, expected, rtol=0, atol=0)
    assert seen == [["tst_bags"]]  # a hook before ours sees the bags, not the embeddings
    torch.testing.assert_close(lm(ids).logits, plain, rtol=0, atol=0)
    assert len(lm._forward_pre_hooks) == 2
    lm._forward_pre_hooks.popitem(last=False)  # the test's own lambda does not pickle
    pickle.loads(pickle.dumps(lm))


def test_neftune_noise_reaches_bagged_and_plain_inputs():
    """The Trainer's NEFTune hook on the input embedding runs on the bags' lookups too (it is
    not skipped by the fused bag lookup): noisy in training, exact in evaluation."""
    from transformers.integrations.neftune import activate_neftune

    torch.manual_seed(0)
    lm = build_model("tiny", VOCAB, L)
    embed_bags_in_forward(lm)
    for k in (1, S):
        bags = torch.randint(0, VOCAB, (2, L, k))  # [B, L, k]
        clean = lm.eval()(tst_bags=bags).logits
        handle = activate_neftune(lm, neftune_noise_alpha=5.0)
        torch.testing.assert_close(lm.eval()(tst_bags=bags).logits, clean, rtol=0, atol=0)
        assert not torch.allclose(lm.train()(tst_bags=bags).logits, clean, atol=1e-3)
        handle.remove()


def test_short_windows_are_rejected(tmp_path):
    trainer = make_trainer(tmp_path, steps=2, tst=TSTConfig(bag_size=S, ratio=0.5))
    trainer.train_dataset = Windows(8, L + 1)
    with pytest.raises(ValueError, match="too short for the superposition stage"):
        trainer.train()


def test_example_pretrains_through_the_switch(tmp_path):
    spec = importlib.util.spec_from_file_location("hf_trainer_pretrain", ROOT / "examples" / "hf_trainer_pretrain.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    plays = [str(p) for p in shakespeare_files() if "tragedies" in p.parts][:3]
    trainer = example.main(["--out", str(tmp_path), "--input", *plays, "--vocab-size", "512", "--seq-len", "32",
                            "--bag-size", "4", "--ratio", "0.5", "--steps", "24", "--batch-size", "8",
                            "--grad-accum", "2", "--eval-steps", "12", "--save-steps", "12", "--eval-samples", "64",
                            "--logging-steps", "1", "--report-to", "tensorboard"])
    train = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["tst_bag_size"] for h in train] == [4] * 12 + [1] * 12
    phase1 = [h["loss"] for h in train[:12]]
    assert sum(phase1[-3:]) / 3 < sum(phase1[:3]) / 3 - 0.5  # the multi-hot loss falls in phase 1
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert evals[0] > math.log(512) - 0.2 and evals[-1] < evals[0] - 0.8  # next-token loss learnt
    assert (tmp_path / "checkpoint-24" / "trainer_state.json").is_file()
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "model" / "tokenizer.json").is_file()
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))
