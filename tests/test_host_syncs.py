"""No host syncs in a micro-batch: one forward and backward of the TST model, dense and MoE, both
phases, runs none of the ops that make the host wait for a GPU (a value read back, or an output
whose size depends on the values). Checked on CPU with a dispatch mode that sees every op."""
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from superpose.loss import slot_weight_vector
from superpose.method import split_window, window_length
from superpose.model import CAUSAL_SDPA, TSTModel, build_model

aten = torch.ops.aten
# Ops that read a device value on the host (_local_scalar_dense is what .item(), bool() and
# .tolist() dispatch to) or size their output by the values (nonzero, masked_select, unique...).
SYNC_OPS = {
    aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.nonzero, aten.argwhere,
    aten.masked_select, aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive,
    aten.bincount, aten.repeat_interleave,
}
MASK_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}  # a bool index is a nonzero


class HostSyncs(TorchDispatchMode):
    """Records each op of ``SYNC_OPS`` with the line of non-torch code that called it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = func.overloadpacket
        sized = op is aten.repeat_interleave and kwargs.get("output_size") is not None
        # histc reads its range from the data only when none is given (min == max)
        unbounded = op is aten.histc and (list(args[2:4]) + [0, 0])[0] == (list(args[2:4]) + [0, 0])[1]
        masked = op in MASK_INDEXED and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if (op in SYNC_OPS and not sized) or masked or unbounded:
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            self.calls.append(f"{func} at {where}")
        return func(*args, **kwargs)


def test_the_detector_sees_syncs():
    x = torch.arange(6.0)
    with HostSyncs() as syncs:
        x.sum().item()
        bool(x.any())
        x[x > 2].sum()
        torch.nonzero(x)
        x.unique()
        torch.histc(x, bins=3)
        torch.histc(x, bins=3, min=0, max=5)  # a given range: no sync
    assert len(syncs.calls) == 6, syncs.calls


@pytest.mark.parametrize("preset", ["tiny", "qwen3-moe-tiny"])
@pytest.mark.parametrize("bag_size", [4, 1])
@pytest.mark.parametrize("chunk", [0, 8])
def test_no_host_syncs_in_a_micro_batch(preset, bag_size, chunk):
    torch.manual_seed(0)
    vocab, seq_len = 256, 16
    model = TSTModel(build_model(preset, vocab, seq_len), loss_chunk_size=chunk)
    window = torch.randint(vocab, (2, window_length(seq_len, bag_size, "full")))
    inputs, targets = split_window(window, bag_size, "full")
    weights = slot_weight_vector("uniform", targets.shape[-1])
    with HostSyncs() as syncs:
        loss_sum, _ = model(inputs, targets, weights)
        loss_sum.backward()
    assert not syncs.calls, "\n".join(syncs.calls)


@pytest.mark.parametrize("preset", ["tiny", "qwen3-moe-tiny"])
def test_causal_sdpa_equals_masked_attention(preset, tmp_path):
    """The maskless causal SDPA the presets train with gives transformers' masked "sdpa" and
    "eager" results, and an exported config does not name it."""
    torch.manual_seed(0)
    lm = build_model(preset, 256, 16)
    assert lm.config._attn_implementation == CAUSAL_SDPA
    ids = torch.randint(256, (2, 16))
    out = lm(ids).logits
    for other in ("sdpa", "eager"):
        lm.set_attn_implementation(other)
        torch.testing.assert_close(lm(ids).logits, out, rtol=1e-5, atol=1e-5)
    lm.set_attn_implementation(CAUSAL_SDPA)
    lm.save_pretrained(tmp_path)
    assert CAUSAL_SDPA not in (tmp_path / "config.json").read_text()
