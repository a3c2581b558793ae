"""Regional compilation (``train.compile``): the compiled blocks give the eager loss and gradients in
both phases and across the switch, compile once for all blocks and both phases, and a failed
compile falls back to eager with one warning. Fast tests trace with dynamo and AOTAutograd and run
the graphs as ATen ops (``aot_eager``); the inductor test is slow (C++ compiles on CPU)."""
import warnings

import pytest
import torch
import torch._dynamo

from superpose.activation_checkpointing import apply_activation_checkpointing
from superpose.compilation import compile_blocks, compile_seconds
from superpose.loss import slot_weight_vector
from superpose.model import TSTModel, build_model


def fresh(checkpointing: str = "none") -> TSTModel:
    torch.manual_seed(0)
    model = TSTModel(build_model("tiny", 256, 16))
    apply_activation_checkpointing(model, checkpointing)
    return model


def step(model: TSTModel, bag_size: int):
    """Loss and gradients of one phase-``bag_size`` micro-batch."""
    g = torch.Generator().manual_seed(bag_size)
    inputs, targets = (torch.randint(256, (2, 16, bag_size), generator=g) for _ in range(2))
    model.zero_grad(set_to_none=True)
    loss_sum, weight = model(inputs, targets, slot_weight_vector("uniform", bag_size))
    (loss_sum / weight).backward()
    return loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(got, ref, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got[0], ref[0], rtol=rtol, atol=atol)
    assert got[1].keys() == ref[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_compiled_blocks_equal_eager_across_the_switch_with_one_compile(checkpointing):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = fresh(checkpointing), fresh(checkpointing)
    assert compile_blocks(compiled, backend="aot_eager") == 4
    for bag_size in (4, 1, 4):  # phase 1, the switch, and back (a curriculum's next stage)
        assert_same(step(compiled, bag_size), step(eager, bag_size))
    # one graph for the 4 blocks and both phases: the switch recompiles nothing
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert compile_seconds() > 0


def test_a_failed_compile_falls_back_to_eager_with_one_warning():
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    eager, compiled = fresh(), fresh()
    compile_blocks(compiled, backend=broken_backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for bag_size in (4, 1):
            assert_same(step(compiled, bag_size), step(eager, bag_size))
    lines = [str(w.message) for w in caught if "train.compile" in str(w.message)]
    assert len(lines) == 1 and "run eagerly" in lines[0], lines


@pytest.mark.slow
def test_inductor_compiled_blocks_equal_eager():
    torch._dynamo.reset()
    eager, compiled = fresh(), fresh()
    compile_blocks(compiled)
    for bag_size in (4, 1):
        assert_same(step(compiled, bag_size), step(eager, bag_size), rtol=1e-4, atol=1e-5)
