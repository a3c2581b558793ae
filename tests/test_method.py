"""The method's pure functions against naive references."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from superpose import embed_bags, multi_hot_cross_entropy, slot_weight_vector, split_window, window_length


def naive_mce(logits, targets, weights, ignore_index=-100):
    """Sum over slots of weighted F.cross_entropy sums, divided by the valid weight."""
    total, weight = 0.0, 0.0
    for j in range(targets.shape[-1]):
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets[..., j].reshape(-1),
                             ignore_index=ignore_index, reduction="sum")
        total = total + weights[j] * ce
        weight = weight + weights[j] * (targets[..., j] != ignore_index).sum()
    return total / weight


@pytest.mark.parametrize("weighting", ["uniform", "power", "exp", "first"])
def test_mce_matches_naive_loop_with_duplicates_and_ignore(weighting):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5, 4))
    targets[0, 0] = torch.tensor([2, 2, 2, 7])  # duplicates count once per occurrence
    targets[1, 2, 1] = -100
    targets[2, 4] = -100  # a position with no valid slot contributes nothing
    ours = multi_hot_cross_entropy(logits, targets, weighting)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = naive_mce(logits, targets, slot_weight_vector(weighting, 4))
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


def test_uniform_mce_is_mean_of_s_cross_entropies():
    torch.manual_seed(1)
    logits = torch.randn(6, 13, requires_grad=True)
    targets = torch.randint(0, 13, (6, 3))
    ours = multi_hot_cross_entropy(logits, targets)
    ref = torch.stack([F.cross_entropy(logits, targets[:, j]) for j in range(3)]).mean()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(*(torch.autograd.grad(v, logits)[0] for v in (ours, ref)))


def test_mce_per_position_formula():
    """logsumexp(z) - sum_j w_j z[y_j] / sum_j w_j, without the constant log s."""
    z = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    y = torch.tensor([[2, 2, 0]])
    w = slot_weight_vector("power", 3)
    expected = torch.logsumexp(z[0], 0) - (w * z[0, y[0]]).sum() / w.sum()
    torch.testing.assert_close(multi_hot_cross_entropy(z, y, "power"), expected)


def test_s1_equals_cross_entropy():
    torch.manual_seed(2)
    logits = torch.randn(4, 7, 19)
    targets = torch.randint(0, 19, (4, 7))
    targets[0, 0] = -100
    torch.testing.assert_close(
        multi_hot_cross_entropy(logits, targets[..., None]), F.cross_entropy(logits.view(-1, 19), targets.view(-1))
    )


def test_slot_weight_vector():
    torch.testing.assert_close(slot_weight_vector("power", 3), torch.tensor([1.0, 0.5, 1 / 3]))
    torch.testing.assert_close(slot_weight_vector("exp", 2), torch.exp(-torch.tensor([1.0, 2.0])))
    torch.testing.assert_close(slot_weight_vector("first", 3), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(slot_weight_vector([1.0, 0.5], 2), torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError):
        slot_weight_vector("nope", 2)
    with pytest.raises(ValueError):
        slot_weight_vector([1.0], 2)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_embed_bags_equals_loop_of_lookups(as_tensor):
    torch.manual_seed(3)
    emb = torch.nn.Embedding(50, 8)
    tokens = torch.randint(0, 50, (2, 12))
    tokens[0, :3] = 5  # a repeated token within a bag
    ours = embed_bags(emb.weight if as_tensor else emb, tokens.view(2, 4, 3))
    ref = torch.stack([
        torch.stack([sum(emb.weight[tokens[b, 3 * i + j]] for j in range(3)) / 3 for i in range(4)]) for b in range(2)
    ])
    torch.testing.assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), emb.weight)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), emb.weight)
    torch.testing.assert_close(g_ours, g_ref)
    assert (g_ours[tokens.unique()].abs().sum(-1) > 0).all()  # every token's row gets a gradient


def test_embed_bags_accumulate_in_fp32():
    weight = torch.tensor([[1.0], [1.0 + 2**-7]], dtype=torch.bfloat16)  # bf16 has 8 mantissa bits
    tokens = torch.tensor([[0, 1, 1, 1]])
    out = embed_bags(weight, tokens.view(1, 1, 4))
    assert out.dtype == torch.bfloat16
    expected = (weight.float()[tokens[0]].mean()).to(torch.bfloat16)
    assert out.item() == expected.item()


def test_split_window_full_alignment():
    window = torch.arange(12)[None]  # s=3, L=3: 3*3+3 tokens
    assert window_length(3, 3, "full") == 12
    inputs, targets = split_window(window, 3, "full")
    assert inputs.tolist() == [[[0, 1, 2], [3, 4, 5], [6, 7, 8]]]
    assert targets.tolist() == [[[3, 4, 5], [6, 7, 8], [9, 10, 11]]]


def test_split_window_ablation_modes_and_ntp():
    window = torch.arange(10)[None]  # input mode: s=3, L=3 needs 3*3+1
    inputs, targets = split_window(window, 3, "input")
    assert inputs.tolist() == [[[0, 1, 2], [3, 4, 5], [6, 7, 8]]]
    assert targets.tolist() == [[[3], [6], [9]]]
    inputs, targets = split_window(torch.arange(6)[None], 2, "output")  # L=4, s=2
    assert inputs.tolist() == [[[0], [1], [2], [3]]]
    assert targets.tolist() == [[[1, 2], [2, 3], [3, 4], [4, 5]]]
    for mode in ("full", "input", "output"):  # s = 1 is next-token prediction in every mode
        inputs, targets = split_window(torch.arange(5)[None], 1, mode)
        assert inputs.tolist() == [[[0], [1], [2], [3]]] and targets.tolist() == [[[1], [2], [3], [4]]]
    with pytest.raises(ValueError):
        split_window(torch.arange(11)[None], 3, "full")


def test_plain_pytorch_example_trains_through_the_switch(small_data):
    """examples/plain_pytorch.py: superpose's functions in a user's own loop learn, phase 1 included."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "examples/plain_pytorch.py", "--data", str(small_data), "--steps", "40",
                           "--seq-len", "32", "--batch-size", "8"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    first = float(re.search(r"step 0: val loss ([\d.]+)", done.stdout).group(1))
    switch = re.search(r"step 12 \(superposition, s=4\): train loss [\d.]+, val loss ([\d.]+)", done.stdout)
    final = float(re.search(r"final val loss ([\d.]+)", done.stdout).group(1))
    assert switch is not None and float(switch.group(1)) < first - 1.0, done.stdout  # phase 1 alone moved next-token loss
    assert final < float(switch.group(1)), done.stdout
