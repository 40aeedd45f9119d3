"""CUDA graphs for this library's steps: capture and replay, the caches as trees of tensors, and
`GraphedLoss`, a training micro-batch's forward and backward replayed from one graph.

A CUDA graph records the kernels a piece of code launches, with their arguments and buffers, and
replays them in one launch: the host's Python, dispatch and launch work, which bounds these models'
speed on a GPU (a chunk or a decoding step is many small kernels), is paid once at capture. What it
asks of the code: no value read back to the host (the tests check every model's training and
decoding steps for that), fixed shapes, and inputs and outputs at fixed addresses (static buffers).

`capture_cuda_graph` captures; `rerun_eagerly` is its stand-in on a CPU, for the tests: a replay
reruns the function, with the host work of its capture, into the first call's outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
from tensordict import TensorDict
from torch.utils._python_dispatch import TorchDispatchMode


# ------------------------------------------------------------------ caches as trees of tensors


def tensor_leaves(tree) -> list:
    """The tensors of a cache (dataclasses, lists, tuples, dicts, TensorDicts), in a fixed order."""
    if torch.is_tensor(tree):
        return [tree]
    if isinstance(tree, TensorDict):
        return [tree[key] for key in sorted(tree.keys())]
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in tensor_leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in tensor_leaves(item)]
    if dataclasses.is_dataclass(tree):
        return [leaf for field in dataclasses.fields(tree) for leaf in tensor_leaves(getattr(tree, field.name))]
    return []


def map_tensors(tree, fn):
    """A copy of the cache `tree` with `fn(t)` for every tensor `t`, the rest kept."""
    if torch.is_tensor(tree):
        return fn(tree)
    if isinstance(tree, TensorDict):
        return TensorDict({key: fn(value) for key, value in tree.items()}, batch_size=tree.batch_size)
    if isinstance(tree, dict):
        return {key: map_tensors(value, fn) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(item, fn) for item in tree)
    if dataclasses.is_dataclass(tree):
        return dataclasses.replace(tree, **{f.name: map_tensors(getattr(tree, f.name), fn) for f in dataclasses.fields(tree)})
    return tree


def cache_structure(tree):
    """What a step's host work depends on in a cache: its types, None-ness and tensor shapes and dtypes
    (ints, the positions, are left out: the period offset stands for them)."""
    if torch.is_tensor(tree):
        return ("tensor", tuple(tree.shape), tree.dtype)
    if isinstance(tree, TensorDict):
        return ("tensordict", tuple((key, cache_structure(tree[key])) for key in sorted(tree.keys())))
    if isinstance(tree, dict):
        return ("dict", tuple((key, cache_structure(tree[key])) for key in sorted(tree)))
    if isinstance(tree, (list, tuple)):
        return (type(tree).__name__, tuple(cache_structure(item) for item in tree))
    if dataclasses.is_dataclass(tree):
        return (type(tree).__name__, tuple(cache_structure(getattr(tree, f.name)) for f in dataclasses.fields(tree)))
    if isinstance(tree, int):
        return "int"
    return tree  # None, layouts: compared by equality


def _place(t):
    """Where a tensor's elements lie: tensors with the same place are one buffer."""
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


def distinct_leaves(tree):
    """The cache `tree`, or where it holds one tensor (the same memory) at two places, a copy of it
    with the later places cloned: a target `copy_leaves` can write any cache of the same structure
    into. (A step's output cache may hold one tensor at two places: MAC's memory state and its state
    at the segment's start, where a segment starts.)"""
    seen, cloned = set(), []

    def own(t):
        if t.numel() == 0:
            return t
        place = _place(t)
        if place in seen:
            cloned.append(t)
            return t.clone()
        seen.add(place)
        return t

    copy = map_tensors(tree, own)
    return copy if cloned else tree


def copy_plan(source, target):
    """What `copy_leaves(source, target)` does, worked out once: `(reads, writes)`, `reads` the
    sources to clone first (they share memory with a target that is written), `writes` the
    `(source, target)` pairs to copy, leaving out a tensor that is its own target. `run_copy_plan`
    carries it out, as often as the two caches' buffers stay the same."""
    sources, targets = tensor_leaves(source), tensor_leaves(target)
    if len(sources) != len(targets):
        raise ValueError(f"caches of different structures: {len(sources)} tensors against {len(targets)}")
    filled = {}
    for s, t in zip(sources, targets):
        if t.numel() and filled.setdefault(_place(t), s) is not s:
            raise ValueError("the target cache holds one tensor at two places that the source fills from two "
                             "different ones: copy into a distinct_leaves copy of it")
    pairs = [(s, t) for s, t in zip(sources, targets) if s is not t]
    written = {t.untyped_storage().data_ptr() for _, t in pairs}
    reads = [index for index, (s, _) in enumerate(pairs) if s.untyped_storage().data_ptr() in written]
    return reads, pairs


def run_copy_plan(plan):
    """Carry out a `copy_plan`: clone its reads, then copy every pair."""
    reads, pairs = plan
    sources = [s for s, _ in pairs]
    for index in reads:
        sources[index] = sources[index].clone()
    for src, (_, dst) in zip(sources, pairs):
        dst.copy_(src)


def copy_leaves(source, target):
    """Copy the tensors of cache `source` into those of `target` (same structure), skipping a tensor
    that is its own target. A source that shares memory with some other target is read (cloned) before
    anything is written: a cache passed between graphs may hold at one place the very tensor another
    place of the target is (MAC's memory state and its state at the segment's start). A target holding
    one tensor at two places that the source fills from two raises (see `distinct_leaves`)."""
    run_copy_plan(copy_plan(source, target))


# ------------------------------------------------------------------ capture


def capture_cuda_graph(fn, pool=None, device=None):
    """Run `fn` once under CUDA-graph capture on `device` (None: the current one; kernels on any other
    device would run eagerly, not be captured), into memory pool `pool` (shared between graphs that
    are replayed in the order they were captured): returns `(outputs, replay)`, `replay()` rerunning
    the captured kernels on the same input buffers into the same output buffers."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device):
        with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream()):  # a capture stream on `device`
            outputs = fn()

    def replay():
        with torch.cuda.device(device):
            graph.replay()

    return outputs, replay


# aten ops that read a tensor's values back to the host (on CUDA, each a sync)
HOST_READ_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "allclose", "masked_select", "unique",
                           "_unique2"})


class HostReadError(RuntimeError):
    """Where a CUDA graph is captured, an op read a tensor's values back to the host or made a
    tensor from host data."""


class _NoHostTraffic(TorchDispatchMode):
    """Raises on the aten ops that read values back to the host (on CUDA each is a sync, which a
    capture refuses: "operation not permitted when stream is capturing") and on tensors made from
    host data (`torch.tensor(...)`: on CUDA a copy from host memory, which a graph would replay from
    a buffer long gone)."""

    READS = HOST_READ_OPS
    FROM_HOST = {"lift_fresh", "lift_fresh_copy"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # ops whose output shape depends on values: on CUDA they read the values back
        data_dependent = func == torch.ops.aten.repeat_interleave.Tensor or (
            name in ("index", "index_put", "index_put_")
            and any(torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) if i is not None))
        if name in self.READS or data_dependent:
            raise HostReadError(f"aten.{name} reads a value back to the host: a CUDA graph cannot capture it")
        if name in self.FROM_HOST:
            raise HostReadError(f"aten.{name}: a tensor made from host data (torch.tensor) inside the step: a CUDA "
                                f"graph would replay its copy from a stale host buffer")
        return func(*args, **(kwargs or {}))


# Tensor methods that read values to the host without an aten op a dispatch mode sees
_HOST_METHODS = ("tolist", "numpy", "cpu")


@contextlib.contextmanager
def _no_host_traffic():
    """`_NoHostTraffic`, and the Tensor methods of `_HOST_METHODS` raising too."""

    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostReadError(f"Tensor.{name}() reads values back to the host: a CUDA graph cannot capture it")
        return method

    saved = {name: getattr(torch.Tensor, name) for name in _HOST_METHODS}
    for name in _HOST_METHODS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        with _NoHostTraffic():
            yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def rerun_eagerly(fn, pool=None, device=None):
    """The stand-in for `capture_cuda_graph` on a CPU (tests): `fn` runs once as if captured (an op that
    reads a value back to the host, `.tolist()`, `.numpy()` and `.cpu()` included, or makes a tensor
    from host data raises `HostReadError`, where the capture would fail or bake a stale copy), and
    `replay()` reruns it (with the host work of that first call: what a graph bakes in), copying its
    results into the first call's outputs, as a graph writes its static output buffers."""

    def run():
        with _no_host_traffic():
            return fn()

    outputs = run()
    return outputs, lambda: copy_leaves(run(), outputs)


def warm_up(fn, device, runs: int = 1):
    """Run `fn` before capturing it, on a side stream on CUDA (as `torch.cuda.graph` asks: lazy
    initialisation, cuBLAS workspaces and Triton compiles happen here, outside the capture)."""
    if device.type != "cuda":
        for _ in range(runs):
            fn()
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(runs):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)


def autocast_without_cache(device_type: str):
    """The autocast in force, with its cache of cast weights off (a capture must not keep them)."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


# ------------------------------------------------------------------ training


class GraphedLoss:
    """`graphed(ids) -> loss`: `model(ids, return_loss=True)` (a `TitansTransformer`) and the backward of
    `loss * scale`, for token ids of `example_ids`'s shape, replayed from one CUDA graph (on a CPU,
    `capture=rerun_eagerly`). The ids are not range-checked (the check reads them back to the host).

    The parameters' gradients accumulate into their `.grad`, allocated here and kept: zero them with
    `zero_grad(set_to_none=False)` (a call after they were set to None raises). A parameter the loss
    does not reach keeps a zero gradient, where an eager backward leaves None (AdamW then still
    decays it). The loss returned is the graph's output buffer, overwritten by the next call.
    Captured at construction, in training mode and under the autocast in force, after `warmup`
    eager runs (their gradients zeroed); `capture_seconds` is the warm-up and capture's wall time."""

    def __init__(self, model, example_ids, scale: float = 1.0, capture=capture_cuda_graph, warmup: int = 3):
        started = time.perf_counter()
        self.model, self.shape, self.dtype = model, tuple(example_ids.shape), example_ids.dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
        self.ids = example_ids.clone()
        device = self.ids.device

        def step():
            loss = model._loss(self.ids)  # the forward without its ids check, which reads the ids back
            (loss * scale).backward()
            return loss.detach()

        with autocast_without_cache(device.type):
            warm_up(step, device, warmup)
            for grad in self.grads:
                grad.zero_()
            self.loss, self.replay = capture(step, None, device)
        for grad in self.grads:  # the capture's own run (on a CPU, its stand-in's) counts for nothing
            grad.zero_()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.capture_seconds = time.perf_counter() - started

    def __call__(self, ids):
        if tuple(ids.shape) != self.shape or ids.dtype != self.dtype:
            raise ValueError(f"ids must have the captured shape {self.shape} and dtype {self.dtype}, "
                             f"got {tuple(ids.shape)} {ids.dtype}")
        if any(p.grad is not grad for p, grad in zip(self.params, self.grads)):
            raise RuntimeError("a parameter's .grad was replaced or set to None since the capture: the graph "
                               "accumulates into the tensors it captured (use zero_grad(set_to_none=False))")
        self.ids.copy_(ids, non_blocking=True)
        self.replay()
        return self.loss
