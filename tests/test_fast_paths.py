"""Every fast path equals its reference: the MCE autograd function vs a loop of cross-entropies,
the chunked head+loss vs the full logits, ``embedding_bag`` bags vs a loop of lookups (values and
gradients, with duplicate tokens and ignored slots)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from superpose import loss as loss_mod
from superpose.config import ConfigError, load_config
from superpose.loss import chunked_head_mce_sum, multi_hot_cross_entropy_sum, slot_weight_vector
from superpose.method import embed_bags
from superpose.model import TSTModel

IGNORE = -100


def bag_targets(shape, vocab, seed=0):
    """Targets ``[..., s]`` with duplicated tokens inside bags and some ignored slots."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(vocab, shape, generator=g)
    if shape[-1] > 1:
        y[..., 1] = y[..., 0]  # every bag holds a duplicate
    y.view(-1)[:: 7] = IGNORE
    y.view(-1, shape[-1])[3] = IGNORE  # one position with no valid slot at all
    return y


def reference_sum(logits, targets, weights):
    """The paper's formulation: one fp32 cross-entropy per slot, weighted, summed."""
    z = logits.float().reshape(-1, logits.shape[-1])
    y = targets.reshape(-1, targets.shape[-1])
    total = sum(weights[j] * F.cross_entropy(z, y[:, j], ignore_index=IGNORE, reduction="sum") for j in range(y.shape[1]))
    return total, (weights[None, :] * (y != IGNORE)).sum()


def value_and_grad(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    value, weight = fn(*leaves)
    (value * 0.37).backward()  # a non-unit upstream gradient
    return value.detach(), weight, [t.grad for t in leaves]


@pytest.fixture(params=["eager", "eager-3-rows", "fused", pytest.param("compiled", marks=pytest.mark.slow)])
def blocks(request, monkeypatch):
    """Each kind of loss kernel: eager with the real row blocks and with 3-row blocks (several
    blocks, a partial last one); the fused kernels of the GPU uncompiled, and (slow on CPU:
    inductor compiles C++) compiled as on a GPU."""
    if request.param == "eager-3-rows":
        monkeypatch.setattr(loss_mod, "_block_rows", lambda logits: 3)
    elif request.param != "eager":
        monkeypatch.setitem(loss_mod.LOSS_KERNELS, "cpu", request.param)
    return request.param


@pytest.mark.parametrize("bag_size,weighting", [(1, "uniform"), (4, "uniform"), (8, "power"), (3, "exp")])
def test_mce_equals_loop_of_cross_entropies(blocks, bag_size, weighting):
    logits = torch.randn(2, 9, 257) * 3
    targets = bag_targets((2, 9, bag_size), 257)
    weights = slot_weight_vector(weighting, bag_size)
    got = value_and_grad(lambda z: multi_hot_cross_entropy_sum(z, targets, weights), logits)
    ref = value_and_grad(lambda z: reference_sum(z, targets, weights), logits)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], ref[1])
    torch.testing.assert_close(got[2][0], ref[2][0], rtol=1e-5, atol=1e-6)


def test_single_slot_equals_cross_entropy():
    logits = torch.randn(64, 1000) * 4
    targets = bag_targets((64, 1), 1000)
    got = value_and_grad(lambda z: multi_hot_cross_entropy_sum(z, targets), logits)
    ref = value_and_grad(lambda z: (F.cross_entropy(z, targets[:, 0], reduction="sum"), None), logits)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-4)
    assert got[1].item() == (targets != IGNORE).sum().item()
    torch.testing.assert_close(got[2][0], ref[2][0], rtol=1e-5, atol=1e-7)


def test_duplicates_count_and_bf16_logits(blocks):
    logits = torch.randn(5, 40) * 2
    targets = torch.tensor([[7, 7, 7, 2]] * 5)  # token 7 three times: three times the weight
    expanded = torch.tensor([[7, 2]] * 5)
    got = value_and_grad(lambda z: multi_hot_cross_entropy_sum(z, targets), logits)
    ref = value_and_grad(lambda z: multi_hot_cross_entropy_sum(z, expanded, torch.tensor([3.0, 1.0])), logits)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[2][0], ref[2][0])
    # bf16 logits: the logsumexp and the gradient are computed in fp32 and rounded once
    half = value_and_grad(lambda z: multi_hot_cross_entropy_sum(z, targets), logits.bfloat16())
    full = value_and_grad(lambda z: reference_sum(z, targets, torch.ones(4)), logits.bfloat16().float())
    torch.testing.assert_close(half[0], full[0], rtol=1e-5, atol=1e-4)
    assert half[2][0].dtype == torch.bfloat16
    torch.testing.assert_close(half[2][0], full[2][0].bfloat16())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_head_equals_full_logits(blocks, bias, chunk):
    torch.manual_seed(0)
    head = nn.Linear(16, 301, bias=bias)
    hidden = torch.randn(3, 11, 16)
    targets = bag_targets((3, 11, 4), 301)
    weights = slot_weight_vector("power", 4)

    def run(fn):
        head.zero_grad(set_to_none=True)
        h = hidden.clone().requires_grad_()
        value, weight = fn(h)
        (value * 0.37).backward()
        return [value.detach(), weight, h.grad, head.weight.grad] + ([head.bias.grad] if bias else [])

    got = run(lambda h: chunked_head_mce_sum(h, head, targets, weights, chunk))
    ref = run(lambda h: multi_hot_cross_entropy_sum(head(h), targets, weights))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def tiny_lm(vocab=300):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("bag_size", [1, 4])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tst_model_chunked_equals_unfused(blocks, bag_size, precision):
    """Same loss and the same gradient on every parameter (head, body, embedding) in both phases."""
    lm = tiny_lm()
    inputs = torch.randint(300, (2, 12, bag_size))
    targets = bag_targets((2, 12, bag_size), 300)
    weights = slot_weight_vector("uniform", bag_size)
    results = []
    for chunk in (0, 5):
        model = TSTModel(lm, loss_chunk_size=chunk)
        lm.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss_sum, weight = model(inputs, targets, weights)
        (loss_sum / weight).backward()
        results.append((loss_sum.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}))
    (unfused, grads0), (chunked, grads1) = results
    tol = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(chunked, unfused, **tol)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], **tol, msg=name)


def loop_of_lookups(lookup, bags):
    """The paper's embedding: s lookups, summed in fp32, divided by s."""
    vectors = [lookup(bags[..., j]) for j in range(bags.shape[-1])]
    return (sum(v.float() for v in vectors) / len(vectors)).to(vectors[0].dtype)


class ScaledEmbedding(nn.Embedding):
    """An embedding module with its own forward: must take the generic module path."""

    def forward(self, ids):
        return super().forward(ids) * 2.0


@pytest.mark.parametrize("kind", ["module", "tensor", "padding", "custom", "hooked", "bf16"])
@pytest.mark.parametrize("bag_size", [1, 4])
def test_embedding_bag_equals_loop_of_lookups(kind, bag_size):
    torch.manual_seed(0)
    module = ScaledEmbedding(50, 8) if kind == "custom" else nn.Embedding(50, 8, padding_idx=3 if kind == "padding" else None)
    if kind == "bf16":
        module = module.bfloat16()
    if kind == "hooked":  # a forward hook on the embedding (as NEFTune's) runs on every lookup
        module.register_forward_hook(lambda mod, args, out: out * 2.0 + 1.0)
    bags = torch.randint(50, (2, 5, bag_size))
    bags[0, 0] = 3  # a bag of one token repeated (and the padding id)
    upstream = torch.randn(2, 5, 8)

    def run(fn):
        module.zero_grad(set_to_none=True)
        out = fn()
        (out.float() * upstream).sum().backward()
        return out.detach(), module.weight.grad

    got = run(lambda: embed_bags(module.weight if kind == "tensor" else module, bags))
    ref = run(lambda: loop_of_lookups(module, bags))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    # bf16: the loop adds the s weight gradients in bf16, we add them once in the lookup's backward
    tol = dict(rtol=2e-2, atol=1e-2) if kind == "bf16" else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], **tol)


def test_config_keys():
    cfg = load_config(overrides=["--model.loss_chunk_size=1024", "--train.compile=true"])
    assert cfg.model.loss_chunk_size == 1024 and cfg.train.compile
    assert load_config().model.loss_chunk_size == "auto" and load_config().train.compile == "auto"  # device_defaults
    assert load_config().model.attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        load_config(overrides=["--model.loss_chunk_size=-1"])


@pytest.mark.parametrize("chunk", [0, 5])
def test_compile_traces_model_and_loss_as_one_graph(chunk, one_thread):
    """``train.compile`` covers the loss: dynamo traces the TSTModel forward, the MCE's (or the
    chunked head's) autograd function and its backward included, without a graph break."""
    import torch._dynamo

    torch._dynamo.reset()
    model = TSTModel(tiny_lm(), loss_chunk_size=chunk)
    inputs = torch.randint(300, (2, 12, 4))
    explained = torch._dynamo.explain(model)(inputs, bag_targets((2, 12, 4), 300), slot_weight_vector("uniform", 4))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    ops = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    assert any("autograd_function_apply" in op for op in ops), sorted(ops)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [0, 5])
def test_compiled_model_equals_eager(chunk):
    """``train.compile``: ``TSTModel.compile()`` (in place) gives the eager loss and gradients in both
    phases and keeps the parameter names. Slow on CPU: inductor compiles C++ (minutes)."""
    lm = tiny_lm()

    def run(model, bag_size):
        inputs = torch.randint(300, (2, 12, bag_size), generator=torch.Generator().manual_seed(bag_size))
        lm.zero_grad(set_to_none=True)
        loss_sum, weight = model(inputs, bag_targets((2, 12, bag_size), 300), slot_weight_vector("uniform", bag_size))
        (loss_sum / weight).backward()
        return loss_sum.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}

    eager = TSTModel(lm, loss_chunk_size=chunk)
    compiled = TSTModel(lm, loss_chunk_size=chunk)
    compiled.compile()
    for bag_size in (4, 1):
        (loss, grads), (ref_loss, ref_grads) = run(compiled, bag_size), run(eager, bag_size)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_a_loss_that_fails_to_compile_runs_eagerly_after_one_warning(monkeypatch):
    """The compiled loss kernels (CUDA's default) with a compiler that fails: one warning, then the
    eager kernels, with the reference's values and gradients."""
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setitem(loss_mod.LOSS_KERNELS, "cpu", "compiled")
    monkeypatch.setattr(loss_mod, "COMPILE_BACKEND", broken_backend)
    monkeypatch.setattr(loss_mod, "_COMPILED", {})
    logits, targets, weights = torch.randn(6, 50) * 2, bag_targets((6, 4), 50), slot_weight_vector("uniform", 4)
    with pytest.warns(UserWarning, match="did not compile") as caught:
        got = [value_and_grad(lambda z: multi_hot_cross_entropy_sum(z, targets, weights), logits) for _ in range(2)]
    assert len([w for w in caught if "did not compile" in str(w.message)]) == 1
    assert loss_mod.kernels_for(torch.device("cpu")) == "eager"
    ref = value_and_grad(lambda z: reference_sum(z, targets, weights), logits)
    for value, _, grads in got:
        torch.testing.assert_close(value, ref[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grads[0], ref[2][0], rtol=1e-5, atol=1e-6)
