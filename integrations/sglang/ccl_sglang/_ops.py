"""The registry of SGLang groups routed through ccl, the routed ops, their torch ops, counters.

Each ``GroupCoordinator`` that gets a ccl communicator is registered here under a small int
``handle`` (0, 1, ... in group-creation order: the same on every rank and in every run, so a
compiled graph can bake it in). An :class:`Entry` holds the communicator, the group's own
in-place all-reduce (the fallback) and whether SGLang's all-reduce on that device works in
place (CPU: ``GroupCoordinator.all_reduce`` mutates and returns its input) or out of place
(CUDA / XPU paths return a new tensor).

Two torch ops, so that SGLang's ``torch.compile`` paths (CPU graph runner, piecewise graphs)
keep them as opaque calls; mutation is in the schema and both have fake impls::

    ccl_sglang::all_reduce_(Tensor(a!) x, int handle) -> ()
        x <- sum over the group's ranks of x
    ccl_sglang::all_reduce_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps,
                                        int handle) -> (Tensor out, Tensor residual_out)
        residual_out = sum_r x_r + residual
        out          = residual_out * rsqrt(mean(residual_out², -1) + eps) * weight

The op impls decide at run time, from the tensors alone (so every rank decides the same),
whether the mailboxes carry the call; otherwise they run the group's own all-reduce (and, for
the fused op, the add + RMSNorm of SGLang's ``RMSNorm.forward_native``). Eager callers skip
the dispatcher and call :func:`all_reduce_` / :func:`fused` directly.

No ``from __future__ import annotations`` here: it breaks torch.library schema inference for
any op added later with ``torch.library.custom_op``.
"""

import json
import logging
import os
import tempfile

import torch

logger = logging.getLogger("ccl_sglang")

__all__ = [
    "Entry",
    "add_group",
    "remove_group",
    "entry",
    "all_reduce_",
    "fused",
    "add_rms_norm_native",
    "stats",
    "write_stats",
]

_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})

# Counters of this process (each SGLang TP worker is its own process). Plain ints, bumped by
# the eager paths and by the op impls (compiled graphs) alike.
_counts = {
    "all_reduce": 0,  # GroupCoordinator.all_reduce carried by ccl
    "all_reduce_fallback": 0,  # ... on a ccl group, given to SGLang's own all-reduce
    "fused": 0,  # all-reduce + residual + RMSNorm carried by ccl's fused op
    "fused_fallback": 0,  # ... on a ccl group, run by SGLang's own path (or the op's)
}


class Entry:
    """One SGLang group routed through ccl (``comm`` None: everything takes ``fallback``)."""

    __slots__ = ("handle", "name", "comm", "fallback", "in_place", "device", "max_bytes", "info")

    def __init__(self, handle, name, comm, fallback, in_place, device):
        self.handle = handle
        self.name = name
        self.comm = comm
        self.fallback = fallback  # fallback(x): SGLang's all-reduce of x, in place
        self.in_place = in_place
        self.device = device
        self.max_bytes = int(comm.max_bytes) if comm is not None else -1
        self.info = {
            "rank": getattr(comm, "rank", None),
            "world_size": getattr(comm, "world_size", None),
            "transport": getattr(comm, "transport", None),
        }

    def takes(self, x: torch.Tensor) -> bool:
        """Whether the mailboxes carry an all-reduce of ``x`` (same answer on every rank)."""
        return (
            self.comm is not None
            and x.dtype in _DTYPES
            and 0 < x.nbytes <= self.max_bytes
            and x.device == self.device
            and x.is_contiguous()
        )

    def takes_fused(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether ccl's fused op carries ``(x, residual, weight)``."""
        return (
            self.takes(x)
            and x.dim() > 0
            and residual.dtype == x.dtype
            and residual.shape == x.shape
            and residual.device == x.device
            and residual.is_contiguous()
            and weight.dtype == x.dtype
            and weight.device == x.device
            and weight.is_contiguous()
            and weight.shape == x.shape[-1:]
        )


_entries: list = []


def add_group(name, comm, fallback, *, in_place: bool, device) -> Entry:
    """Registers a group; returns its :class:`Entry` (handle = registration order). Local."""
    e = Entry(len(_entries), name, comm, fallback, in_place, torch.device(device))
    _entries.append(e)
    return e


def remove_group(e: Entry) -> None:
    """Forgets ``e``'s communicator (later calls take the fallback). Local; closing the
    communicator is the caller's job."""
    e.comm = None
    e.max_bytes = -1


def entry(handle: int) -> Entry:
    try:
        return _entries[handle]
    except (IndexError, TypeError):
        raise RuntimeError(
            f"ccl_sglang: no group registered under handle {handle!r} in process "
            f"{os.getpid()} ({len(_entries)} registered): a graph compiled in another "
            "configuration was reused; clear the torch.compile cache"
        ) from None


# ---------------------------------------------------------------------- eager impls
def all_reduce_(x: torch.Tensor, handle: int) -> None:
    """all_reduce_(x, handle) -> None. Sum of ``x`` over the group, in place. Collective."""
    e = _entries[handle] if 0 <= handle < len(_entries) else entry(handle)
    if e.takes(x):
        e.comm.all_reduce(x)
        _counts["all_reduce"] += 1
    else:
        e.fallback(x)
        _counts["all_reduce_fallback"] += 1


def fused(e: Entry, x, residual, weight, eps: float):
    """fused(e, x, residual, weight, eps) -> (out, residual_out), fresh tensors.

    Through ccl when :meth:`Entry.takes_fused` (fp32 math without intermediate rounding);
    otherwise the group's all-reduce then :func:`add_rms_norm_native`. Collective."""
    if e.takes_fused(x, residual, weight):
        out = torch.empty_like(x)
        residual_out = torch.empty_like(x)
        e.comm.all_reduce_add_rms_norm(x, residual, weight, eps, out=out,
                                       residual_out=residual_out)
        _counts["fused"] += 1
        return out, residual_out
    summed = x.clone()
    e.fallback(summed)
    _counts["fused_fallback"] += 1
    return add_rms_norm_native(summed, residual, weight, eps)


def add_rms_norm_native(summed, residual, weight, eps: float):
    """SGLang 0.5.23 ``RMSNorm.forward_native`` (layernorm.py:828) with a residual, no
    variance override, ``cast_x_before_out_mul=False``: ``s = fp32(summed) + fp32(residual)``;
    ``residual_out = dtype(s)``; ``out = dtype(s * rsqrt(mean(s²) + eps) * weight)``. Local."""
    dtype = summed.dtype
    s = summed.to(torch.float32) + residual.to(torch.float32)
    residual_out = s.to(dtype)
    n = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (n * weight).to(dtype), residual_out


def _fused_op_impl(x, residual, weight, eps, handle):
    return fused(entry(handle), x, residual, weight, eps)


# ---------------------------------------------------------------------- torch ops
_lib = torch.library.Library("ccl_sglang", "FRAGMENT")  # noqa: TOR901 (kept for the process)
_lib.define("all_reduce_(Tensor(a!) x, int handle) -> ()")
_lib.define(
    "all_reduce_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, int handle)"
    " -> (Tensor, Tensor)"
)
# One Python kernel for every backend; the impl dispatches on the registered communicator.
_lib.impl("all_reduce_", all_reduce_, "CompositeExplicitAutograd")
_lib.impl("all_reduce_add_rms_norm", _fused_op_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("ccl_sglang::all_reduce_", lib=_lib)
def _all_reduce_fake(x, handle):
    return None


@torch.library.register_fake("ccl_sglang::all_reduce_add_rms_norm", lib=_lib)
def _fused_fake(x, residual, weight, eps, handle):
    return torch.empty_like(x), torch.empty_like(x)


# ---------------------------------------------------------------------- counters
def stats() -> dict:
    """Counters of this process and its registered groups (JSON-able). Local."""
    return {
        "pid": os.getpid(),
        "counters": dict(_counts),
        "groups": [
            {"handle": e.handle, "name": e.name, "ccl": e.info["rank"] is not None,
             "open": e.comm is not None, "device": str(e.device), **e.info}
            for e in _entries
        ],
    }


def write_stats(directory=None):
    """Writes :func:`stats` to ``<directory>/ccl_sglang.pid<pid>.json`` (atomically) and
    returns the path; ``directory`` defaults to env ``CCL_SGLANG_STATS``; None when unset."""
    directory = directory or os.environ.get("CCL_SGLANG_STATS")
    if not directory:
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"ccl_sglang.pid{os.getpid()}.json")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ccl_sglang.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(stats(), f)
    os.replace(tmp, path)
    return path
