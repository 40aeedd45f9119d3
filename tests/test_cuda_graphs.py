"""`titans_pytorch.cuda_graphs`: the cache trees and `GraphedLoss`, on a CPU through the stand-in
`rerun_eagerly` (a replay reruns the captured function into its first outputs), on CUDA for real."""

import pytest
import torch

from test_transformer import NUM_TOKENS, build
from titans_pytorch.cuda_graphs import (
    GraphedLoss, HostReadError, cache_structure, capture_cuda_graph, copy_leaves, distinct_leaves, map_tensors, rerun_eagerly,
    tensor_leaves,
)


def test_cache_trees_round_trip(float64):
    model = build("mac").eval()
    with torch.no_grad():
        _, cache = model(torch.randint(0, NUM_TOKENS, (2, 7)), return_cache=True)
    leaves = tensor_leaves(cache.layers)
    assert leaves and all(torch.is_tensor(t) for t in leaves)
    clone = map_tensors(cache.layers, lambda t: torch.zeros_like(t))
    assert cache_structure(clone) == cache_structure(cache.layers)
    assert all(not t.any() for t in tensor_leaves(clone))
    copy_leaves(cache.layers, clone)
    assert all(torch.equal(a, b) and a is not b for a, b in zip(tensor_leaves(cache.layers), tensor_leaves(clone)))
    with torch.no_grad():
        _, longer = model(torch.randint(0, NUM_TOKENS, (2, 1)), cache=cache, return_cache=True)
    assert cache_structure(longer.layers) != cache_structure(cache.layers)  # the segment's keys grew


def test_copying_a_cache_reads_every_source_before_writing():
    # at a period's wrap-around the source may hold, at one place, the very tensor the target has at
    # another (MAC: the memory state and the state at the segment's start)
    a, b, c = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0])
    source, target = [a, b], [b, c]
    copy_leaves(source, target)
    assert target[0].item() == 1.0 and target[1].item() == 2.0
    with pytest.raises(ValueError, match="different structures"):
        copy_leaves([a], [b, c])


def test_a_target_holding_one_tensor_twice_takes_a_copy_once_made_distinct():
    # a step's output cache may hold one tensor at two places (MAC at a segment's start: the memory
    # state and the state at the segment's start); a graph captured on it must be able to take a cache
    # where the two differ, coming from another graph
    a, b, c = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0])
    shared = [a, {"again": a}, torch.zeros(0), torch.zeros(0)]
    with pytest.raises(ValueError, match="two places"):
        copy_leaves([b, {"again": c}, torch.zeros(0), torch.zeros(0)], shared)
    copy_leaves([b, {"again": b}, torch.zeros(0), torch.zeros(0)], shared)  # one source for both: fine
    assert a.item() == 2.0
    distinct = distinct_leaves(shared)
    assert distinct[0] is a and distinct[1]["again"] is not a and torch.equal(distinct[1]["again"], a)
    copy_leaves([b, {"again": c}, torch.zeros(0), torch.zeros(0)], distinct)
    assert (distinct[0].item(), distinct[1]["again"].item()) == (2.0, 3.0)


def test_the_stand_in_refuses_what_a_capture_would():
    # the model's entry check reads the ids' range back to the host: the graphed paths skip it
    model = build("mac")
    ids = torch.zeros(2, 9, dtype=torch.long)
    with pytest.raises(HostReadError, match="_local_scalar_dense"):
        rerun_eagerly(lambda: model(ids, return_loss=True))
    with pytest.raises(HostReadError, match="host data"):
        rerun_eagerly(lambda: model._loss(ids) * torch.tensor(2.0))
    x, repeats = torch.arange(4.0), torch.tensor([1, 2, 0, 1])
    with pytest.raises(HostReadError, match="aten.index"):
        rerun_eagerly(lambda: x[x > 1])
    with pytest.raises(HostReadError, match="repeat_interleave"):
        rerun_eagerly(lambda: x.repeat_interleave(repeats))
    for name in ("tolist", "numpy", "cpu"):  # host reads no dispatch mode sees
        with pytest.raises(HostReadError, match=f"Tensor.{name}"):
            rerun_eagerly(lambda: getattr(x, name)())
        assert getattr(x, name)() is not None  # and the methods are back afterwards
    loss, replay = rerun_eagerly(lambda: model._loss(ids).detach())
    replay()
    torch.testing.assert_close(loss, model(ids, return_loss=True).detach(), atol=0, rtol=0)


def loss_and_grads(model, ids, scale):
    model.zero_grad(set_to_none=False)  # not None: a GraphedLoss of the model keeps its .grad tensors
    loss = model(ids, return_loss=True)
    (loss * scale).backward()
    return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in trained(model)]


def trained(model):
    return [p for p in model.parameters() if p.requires_grad]  # not the rotary frequencies


@pytest.mark.parametrize("name", ["mac", "lmm"])
def test_graphed_loss_accumulates_what_eager_backward_gives(float64, name):
    model = build(name)
    first, second = (torch.randint(0, NUM_TOKENS, (2, 9)) for _ in range(2))
    expected = [loss_and_grads(model, ids, 0.5) for ids in (first, second)]
    graphed = GraphedLoss(model, torch.zeros_like(first), scale=0.5, capture=rerun_eagerly)
    assert all(not p.grad.any() for p in trained(model))  # the warm-up and capture leave nothing behind
    losses = [graphed(first).clone(), graphed(second).clone()]
    for loss, (want, _) in zip(losses, expected):
        torch.testing.assert_close(loss, want, atol=0, rtol=0)
    for p, a, b in zip(trained(model), expected[0][1], expected[1][1]):
        torch.testing.assert_close(p.grad, a + b, atol=1e-12, rtol=0)
    model.zero_grad(set_to_none=False)
    graphed(first)
    for p, a in zip(trained(model), expected[0][1]):
        torch.testing.assert_close(p.grad, a, atol=1e-12, rtol=0)


def test_graphed_loss_refuses_other_shapes_and_freed_gradients():
    model = build("mag")
    graphed = GraphedLoss(model, torch.zeros(2, 9, dtype=torch.long), capture=rerun_eagerly, warmup=0)
    with pytest.raises(ValueError, match=r"ids must have the captured shape \(2, 9\)"):
        graphed(torch.zeros(2, 10, dtype=torch.long))
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="set_to_none=False"):
        graphed(torch.zeros(2, 9, dtype=torch.long))


def check_graphed_training(model, device, capture, autocast, tolerance):
    # as train_mac.py uses it: micro-batches accumulating, an optimizer step between rounds that the
    # replays must see, under autocast (cast weights not cached across replays) where asked
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first, second = (torch.randint(0, NUM_TOKENS, (2, 9), device=device) for _ in range(2))
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        graphed = GraphedLoss(model, torch.zeros_like(first), scale=0.5, capture=capture)
        for _ in range(2):
            want = [loss_and_grads(model, ids, 0.5) for ids in (first, second)]
            model.zero_grad(set_to_none=False)
            losses = [graphed(first).clone(), graphed(second).clone()]
            for loss, (expected, _) in zip(losses, want):
                torch.testing.assert_close(loss, expected, **tolerance)
            for p, a, b in zip(trained(model), want[0][1], want[1][1]):
                torch.testing.assert_close(p.grad, a + b, **tolerance)
            optimizer.step()


def test_graphed_loss_follows_the_optimizer(float64):
    check_graphed_training(build("mac"), "cpu", rerun_eagerly, False, dict(atol=1e-12, rtol=0))


@pytest.mark.cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("name", ["mac", "mag", "mal", "lmm"])
def test_cuda_graphed_loss_equals_eager(name, autocast):
    tolerance = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-4)
    check_graphed_training(build(name).cuda(), "cuda", capture_cuda_graph, autocast, tolerance)
