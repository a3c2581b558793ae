"""The stages and the LR as data: the shorthand's stages, the research levers, warmup-stable-decay."""

import pytest

from superpose.config import OptimConfig, TSTConfig
from superpose.schedule import build_stages, lr_at, stage_at


def test_stages_and_wsd_schedule():
    stages = build_stages(TSTConfig(bag_size=6, ratio=0.3), 100)
    assert [(s.bag_size, s.end_step) for s in stages] == [(6, 30), (1, 100)]
    assert stage_at(stages, 29).bag_size == 6 and stage_at(stages, 30).bag_size == 1
    assert [s.bag_size for s in build_stages(TSTConfig(bag_size=1, ratio=0.3), 10)] == [1]
    assert [s.bag_size for s in build_stages(TSTConfig(ratio=0.0), 10)] == [1]
    assert [s.bag_size for s in build_stages(TSTConfig(ratio=1.0), 10)] == [4]
    optim = OptimConfig(lr=1.0, warmup_steps=10, decay_fraction=0.1, min_lr_ratio=0.0)
    lrs = [lr_at(t, optim, 100) for t in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[50] == 1.0 and lrs[89] == 1.0
    assert lrs[90] == pytest.approx(0.9) and lrs[99] == pytest.approx(0.0)


def test_research_levers_are_stages():
    tst = TSTConfig(curriculum=[[4, 0.2], [2, 0.2]], blend_steps=4, rewarmup_steps=5, lr_scale=2.0)
    stages = build_stages(tst, 100)
    assert [(s.name, s.bag_size, s.start_step, s.end_step) for s in stages] == [
        ("superposition-1", 4, 0, 20), ("superposition-2", 2, 20, 36), ("blend", 2, 36, 40), ("next-token", 1, 40, 100)]
    blend = [stage_at(stages, t).bag_size for t in range(36, 40)]
    assert blend.count(1) == 2 and blend[0] == 2  # half of the K blend steps are next-token, later ones more often
    optim = OptimConfig(lr=1.0, warmup_steps=0, decay_fraction=0.0)
    assert lr_at(10, optim, 100, stages[0]) == 2.0
    assert [lr_at(t, optim, 100, stages[-1]) for t in (40, 44, 45)] == [0.2, 1.0, 1.0]
    annealed = build_stages(TSTConfig(bag_size=4, ratio=0.5, mode="output", slot_weights=[1, 0.5, 0.25, 0.0],
                                      anneal_to_ntp=True), 10)[0]
    assert annealed.weights(0, 4).tolist() == pytest.approx([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0])
    assert annealed.weights(5, 4).tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert annealed.weights(3, 1).tolist() == [1.0]  # input mode scores one target slot
