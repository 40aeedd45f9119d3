"""TorchDispatchModes the tests use to observe what aten ops do (no data changed)."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from titans_pytorch.cuda_graphs import HOST_READ_OPS


def _tensors(out):
    return [t for t in (out if isinstance(out, (list, tuple)) else (out,)) if torch.is_tensor(t)]


class ElementsWritten(TorchDispatchMode):
    """Counts the elements the aten compute ops dispatched inside it write (views move no data)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.elements += sum(t.numel() for t in _tensors(out))
        return out


class Created(TorchDispatchMode):
    """Weak references to every tensor the aten compute ops dispatched inside it create."""

    def __init__(self):
        super().__init__()
        self.tensors = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.tensors += [weakref.ref(t) for t in _tensors(out)]
        return out

    def alive(self, *keep):
        """The created tensors still alive, except `keep`."""
        return [t for t in (ref() for ref in self.tensors) if t is not None and all(t is not k for k in keep)]


class HostReads(TorchDispatchMode):
    """Counts the aten ops dispatched inside it that read a tensor's values back to the host (on a
    GPU each waits for the device: a sync, and no CUDA graph can capture it)."""

    READS = HOST_READ_OPS | {"item"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.READS:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
