"""GPU memory discipline for a stage: a per-process cap, batch sizes that fit under it, and
CUDA out-of-memory turned into smaller batches instead of a failed request.

Why: Ray gives fractional GPUs (the voice stage asks for 0.5) without isolating their memory, so
two replicas on one card can run each other out of memory. Each stage therefore caps its own
caching allocator at its share of the card (`torch.cuda.set_per_process_memory_fraction`), sizes
its batches from what is left under that cap, and when a forward still runs out of memory it is
split in halves and retried; only a forward of one item that does not fit becomes an error, a
503 (`GPUOutOfMemory`) that tells the caller to come back, never a 500.

Nothing here does anything on a CPU device except the OOM splitting, which tests drive by
raising torch's out-of-memory exception type on purpose.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from .errors import GPUOutOfMemory

log = logging.getLogger("lipserve.gpu")

# The CUDA context, cuBLAS/cuDNN handles and kernels live outside torch's caching allocator
# (typically 0.3-0.6 GiB per process), so the allocator's cap leaves room for them: two replicas
# at 0.5 GPU each must fit their contexts too.
CUDA_CONTEXT_RESERVE_BYTES = 640 * 1024 * 1024
MIN_FRACTION = 0.05

# torch.OutOfMemoryError (torch >= 2.5) and torch.cuda.OutOfMemoryError are the same class in
# recent releases; collect whichever exist so older builds work too.
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {cls for cls in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
     if cls is not None})


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, OOM_ERRORS)


def memory_fraction(configured: float | None, gpu_share: float | None) -> float | None:
    """The cap for a stage: the `gpu_memory_fraction` setting (`configured`), else the replica's GPU share."""
    if configured is not None:
        return float(configured)
    if gpu_share is None or gpu_share <= 0:
        return None
    return min(1.0, float(gpu_share))


def cap_memory(device: torch.device, fraction: float | None) -> int | None:
    """Cap this process's CUDA allocator at `fraction` of the card (minus the context reserve).

    Returns the cap in bytes, or None when there is nothing to cap (CPU, or no fraction given).
    The cap is per process and per device: in one process holding several stages (the
    one-process pipeline) pass None and the stages share the card.
    """
    if device.type != "cuda" or fraction is None:
        return None
    if not 0 < fraction <= 1:
        raise ValueError(f"a GPU memory fraction must be in (0, 1], not {fraction}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    effective = max(MIN_FRACTION, fraction - CUDA_CONTEXT_RESERVE_BYTES / total)
    torch.cuda.set_per_process_memory_fraction(effective, index)
    cap = int(effective * total)
    log.info("CUDA memory of cuda:%d capped at %.2f GiB (%.0f %% of %.1f GiB; GPU share %.2f)", index,
             cap / 2**30, 100 * effective, total / 2**30, fraction)
    return cap


class BatchBudget:
    """Items of one network that fit in one forward now, from the memory cap and what is in use.

    `bytes_per_item` is the activation memory one item needs at the stage's precision (a
    deliberately generous prior; the device check measures the real figure). Only `headroom` of
    the free memory is planned for, since other requests' crops and blends share the card.
    On CPU the size is fixed: `cpu_items`.
    """

    def __init__(self, device: torch.device, *, bytes_per_item: int, max_items: int, cpu_items: int,
                 cap_bytes: int | None = None, headroom: float = 0.5,
                 memory_info: Callable[[], tuple[int, int, int]] | None = None):
        self.device = device
        self.bytes_per_item = int(bytes_per_item)
        self.max_items = int(max_items)
        self.cpu_items = int(cpu_items)
        self.cap_bytes = cap_bytes
        self.headroom = headroom
        # a memory_info function stands in for the card (tests drive the CUDA arithmetic on a CPU)
        self._plans_memory = device.type == "cuda" or memory_info is not None
        self._memory_info = memory_info or self._cuda_memory_info

    def _cuda_memory_info(self) -> tuple[int, int, int]:
        """(bytes free on the card, bytes this process's allocator holds, bytes of it in use)."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return free, torch.cuda.memory_reserved(self.device), torch.cuda.memory_allocated(self.device)

    def free_bytes(self) -> int:
        free_on_card, reserved, allocated = self._memory_info()
        # memory our allocator already holds but does not use is free for us too
        free = free_on_card + max(0, reserved - allocated)
        if self.cap_bytes is not None:
            free = min(free, self.cap_bytes - allocated)
        return max(0, free)

    def items(self) -> int:
        if not self._plans_memory:
            return self.cpu_items
        return int(max(1, min(self.max_items, self.headroom * self.free_bytes() // self.bytes_per_item)))


def release_cached_memory(device: torch.device) -> None:
    """After an OOM: give the allocator's cached blocks back so the retry starts from a clean pool."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def items_of(inputs: Sequence[torch.Tensor]) -> int:
    return int(inputs[0].shape[0])


def concat_outputs(parts: list):
    """Join per-chunk outputs along dim 0: a tensor, or a list/tuple of tensors (S3FD's heads)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    joined = [torch.cat([p[i] for p in parts]) for i in range(len(first))]
    return type(first)(joined) if isinstance(first, tuple) else joined


def split_outputs(output, sizes: list[int]) -> list:
    """The inverse of concat_outputs: one output per caller, `sizes` items each."""
    if isinstance(output, torch.Tensor):
        return list(torch.split(output, sizes))
    per_head = [torch.split(head, sizes) for head in output]
    return [[heads[i] for heads in per_head] for i in range(len(sizes))]


def forward_in_halves(forward: Callable, inputs: Sequence[torch.Tensor], device: torch.device, *,
                      limit: int | None = None, on_oom: Callable[[int], None] | None = None, what: str = "forward"):
    """`forward(*inputs)` over dim 0 in chunks of at most `limit` items; when a chunk runs out of
    memory the chunk size is halved and the chunk retried, down to one item, which raises
    GPUOutOfMemory (503). Outputs are joined along dim 0.

    `on_oom(items)` is told each size that failed, so a caller can remember a lower ceiling.
    """
    n = items_of(inputs)
    size = max(1, min(n, limit or n))
    parts, lo = [], 0
    while lo < n:
        try:
            parts.append(forward(*[x[lo:lo + size] for x in inputs]))
        except OOM_ERRORS as exc:
            release_cached_memory(device)
            if on_oom is not None:
                on_oom(size)
            if size <= 1:
                raise GPUOutOfMemory(f"{what}: out of GPU memory even for one item; the card is busy, "
                                     "retry later") from exc
            log.warning("%s: out of GPU memory at %d items; retrying in batches of %d", what, size, (size + 1) // 2)
            size = (size + 1) // 2
            continue
        lo += size
    return concat_outputs(parts)


def first_that_fits(attempts: Sequence[Callable[[], object]], device: torch.device, what: str = "forward"):
    """Run attempts[0](); on out-of-memory free the cache and try the next (smaller) one; when the last
    runs out of memory too, GPUOutOfMemory (503)."""
    for i, attempt in enumerate(attempts):
        try:
            return attempt()
        except OOM_ERRORS as exc:
            release_cached_memory(device)
            if i == len(attempts) - 1:
                raise GPUOutOfMemory(f"{what}: out of GPU memory; the card is busy, retry later") from exc
            log.warning("%s: out of GPU memory; retrying smaller (%d of %d)", what, i + 2, len(attempts))
    raise ValueError("first_that_fits needs at least one attempt")
