"""Gradient buffers reused once their previous use has ended (the eager autograd path).

Why: a gradient of more than glibc's mmap threshold (32 MiB at most) is fresh anonymous
memory on every call, and the fused kernel's first write into it takes one page fault per
4 KiB page: ~3 us each on a 2-vCPU VM, ~100 ms for a 125 MiB gradient, more than the kernel
itself. Autograd frees the gradient after the step (`zero_grad(set_to_none=True)`), so the
next call faults again. Advising transparent huge pages on the buffer was tried and removed:
with synchronous THP defragmentation it stalled random calls ~10x on another machine.

How: the cache keeps the last few large buffers and hands one out again only when nothing
but the cache refers to its storage. The storage's use count says so exactly: a gradient
still held anywhere (as `x.grad` during gradient accumulation, in a list, as a NumPy view)
holds a reference and its buffer is never reused. `set_gradient_cache(0)` turns it off.
The fused linear losses take their hidden-state and weight gradients and their blocks of
logits (scratch, released when the call returns) from the same cache.
"""

from __future__ import annotations

import threading

import torch

# Below this the allocator's heap recycles memory by itself (no fresh pages).
MIN_BYTES = 1 << 20

_lock = threading.Lock()
_slots: list[tuple[torch.Tensor, int]] = []  # (flat buffer, use count when only we hold it)
_max_buffers = 4


def _use_count(buffer: torch.Tensor) -> int:
    # untyped_storage() makes a temporary Python storage object (one more reference); the
    # baseline is measured the same way, so the comparison is exact.
    return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata)


def set_gradient_cache(buffers: int) -> None:
    """Keep at most `buffers` gradient buffers of 1 MiB or more for reuse (default 4: a fused
    linear loss uses up to four per call; 0 turns the cache off and releases what it holds)."""
    global _max_buffers
    if not isinstance(buffers, int) or isinstance(buffers, bool) or buffers < 0:
        raise ValueError(f"set_gradient_cache: buffers: expected an integer >= 0, got {buffers!r}")
    with _lock:
        _max_buffers = buffers
        del _slots[buffers:]


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """torch.empty_like(x) for a contiguous CPU x, from a released cached buffer if one fits
    (same dtype, at least as large, at most twice as large)."""
    # the small-call path first: no cache below MIN_BYTES (a 64 x 10 call costs ~70 us)
    if (_max_buffers == 0 or x.nbytes < MIN_BYTES or not x.is_cpu or not x.is_contiguous()):
        return torch.empty_like(x)
    return empty(x.shape, x.dtype)


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype) on the CPU, contiguous, from a released cached buffer
    if one fits (same dtype, at least as large, at most twice as large)."""
    n = 1
    for s in shape:
        n *= int(s)
    if _max_buffers == 0 or n * dtype.itemsize < MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    with _lock:
        for i, (buffer, baseline) in enumerate(_slots):
            if (buffer.dtype == dtype and n <= buffer.numel() <= 2 * n
                    and _use_count(buffer) == baseline):
                _slots.append(_slots.pop(i))  # most recently used last
                return buffer[:n].view(shape)
        buffer = torch.empty(n, dtype=dtype)
        _slots.append((buffer, _use_count(buffer)))
        if len(_slots) > _max_buffers:
            _slots.pop(0)  # the least recently used; a holder of it keeps its memory alive
        return buffer.view(shape)
