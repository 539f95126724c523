"""Torch ops of the vLLM plugin, the registry of communicators they address, and counters.

Two in-place ops, registered with ``torch.library`` so that vLLM's compiled graphs (CPU:
Dynamo ``fullgraph=True`` + inductor) keep them as opaque calls; mutation is in the schema
and each op has a fake impl::

    ccl::all_reduce_(Tensor(a!) x, int handle) -> ()
        x <- sum over the TP ranks of x
    ccl::all_reduce_add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight,
                                  float eps, int handle) -> ()
        residual <- sum_r x_r + residual
        x        <- residual * rsqrt(mean(residual², -1) + eps) * weight

``handle`` indexes this process's registry (:func:`add_communicator`); it is a small int
assigned in group-creation order, so it is the same on every rank and in every run, which
matters because compiled (and AOT-cached) graphs bake it in as a constant.

Every call decides at run time, from the tensor alone (so every rank decides the same),
whether the mailboxes carry it; otherwise it runs the registered fallback (vLLM's own
all-reduce) and, for the fused op, vLLM's native add + RMSNorm math. That decision cannot
live in Python code that Dynamo traces: with vLLM's trace-once compilation a branch on the
payload size would be frozen at the size seen while tracing.

No ``from __future__ import annotations`` here (NOTES.md: it breaks torch.library schema
inference; the explicit schemas below do not need it, but keep the module safe to extend).
"""

import json
import logging
import os
import tempfile
import threading

import torch

logger = logging.getLogger("vllm.ccl_vllm")

__all__ = [
    "add_communicator",
    "add_rms_norm_native_",
    "all_reduce_",
    "all_reduce_add_rms_norm_",
    "linear_all_reduce_add_rms_norm",
    "qk_rms_norm",
    "remove_communicator",
    "stats",
    "write_stats",
]

_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})

# Counters of this process (each vLLM TP worker is its own process). Plain ints: the op
# impls bump them on every call, in eager mode and from compiled graphs alike.
_counts = {
    "mailbox_all_reduce": 0,  # ccl::all_reduce_ carried by the ccl communicator
    "fallback_all_reduce": 0,  # ccl::all_reduce_ given to vLLM's own all-reduce
    "fused": 0,  # ccl::all_reduce_add_rms_norm_ carried by ccl's fused op
    "fused_fallback": 0,  # ... run as vLLM all-reduce + native add + RMSNorm
    "rewired_pairs": 0,  # (row-parallel linear, RMSNorm) pairs fused at model load
    "fused_gemv": 0,  # ccl::linear_all_reduce_add_rms_norm carried by ccl (GEMV included)
    "fused_gemv_fallback": 0,  # ... run as F.linear + vLLM all-reduce + native add + RMSNorm
    "gemv_pairs": 0,  # pairs whose GEMV moved into the norm at model load
    "moe_pairs": 0,  # of rewired_pairs: fused-MoE blocks whose all-reduce moved into the norm
    "qk_fused": 0,  # ccl::qk_rms_norm carried by ccl's fused TP Q/K norm
    "qk_fallback": 0,  # ... run as vLLM all-reduce of the variances + native math
    "qk_layers": 0,  # attention layers whose TP Q/K norm moved onto ccl at model load
}


class _Entry:
    """One registered TP group: the ccl communicator (None when ccl is off for the group)
    and the group's own in-place all-reduce used for everything ccl does not carry."""

    __slots__ = ("ccl", "comm", "device_type", "fallback", "host", "info", "max_bytes", "name")

    def __init__(self, comm, fallback, device_type: str, name: str):
        self.comm = comm
        self.ccl = comm is not None  # stays True after remove_communicator (for stats)
        self.info = {"rank": getattr(comm, "rank", None),
                     "world_size": getattr(comm, "world_size", None)}
        self.fallback = fallback
        self.max_bytes = int(comm.max_bytes) if comm is not None else -1
        self.device_type = device_type
        self.host = device_type == "cpu"
        self.name = name


_entries: list = []


def add_communicator(comm, fallback, *, device_type: str = "cpu", name: str = "") -> int:
    """add_communicator(comm, fallback, *, device_type="cpu", name="") -> handle

    Registers a TP group for the ops and returns its handle (0, 1, ... in call order: call
    it in the same order on every rank). ``comm`` is a ``ccl.Communicator`` or None (then
    every call takes ``fallback``); ``fallback(x)`` all-reduces ``x`` in place. Local.
    """
    _entries.append(_Entry(comm, fallback, device_type, name))
    if comm is not None:
        _start_stats_writer()
    return len(_entries) - 1


def remove_communicator(handle: int) -> None:
    """Forgets the ccl communicator of ``handle`` (later calls take the fallback). Local;
    closing the communicator is the caller's job."""
    e = _entry(handle)
    e.comm = None
    e.max_bytes = -1


def communicator(handle: int):
    """The ccl communicator registered under ``handle``, or None."""
    return _entry(handle).comm


def _entry(handle: int) -> _Entry:
    try:
        return _entries[handle]
    except (IndexError, TypeError):
        raise RuntimeError(
            f"ccl_vllm: no TP group registered under handle {handle!r} in process "
            f"{os.getpid()} ({len(_entries)} registered). A compiled graph from another "
            "configuration was probably loaded from vLLM's compile cache: set "
            "VLLM_DISABLE_COMPILE_CACHE=1 or clear ~/.cache/vllm/torch_compile_cache"
        ) from None


# ---------------------------------------------------------------------- eager impls
def all_reduce_(x: torch.Tensor, handle: int) -> None:
    """all_reduce_(x, handle) -> None. Sum of ``x`` over the TP group, in place.
    This is a collective operation."""
    try:
        e = _entries[handle]
    except IndexError:
        e = _entry(handle)
    comm = e.comm
    if (
        comm is not None
        and 0 < x.nbytes <= e.max_bytes
        and x.dtype in _DTYPES
        and (x.is_cpu if e.host else x.device.type == e.device_type)
        and x.is_contiguous()
    ):
        comm.all_reduce(x)
        _counts["mailbox_all_reduce"] += 1
    else:
        e.fallback(x)
        _counts["fallback_all_reduce"] += 1


def all_reduce_add_rms_norm_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, handle: int
) -> None:
    """all_reduce_add_rms_norm_(x, residual, weight, eps, handle) -> None

    ``residual <- sum_r x_r + residual``; ``x <- residual * rsqrt(mean(residual², -1) + eps)
    * weight``, both in place. Through ccl: fp32 math without intermediate rounding. Through
    the fallback: vLLM's all-reduce, then vLLM's native fused_add_rms_norm math (which rounds
    the sum and the normalised value to the model dtype). This is a collective operation.
    """
    try:
        e = _entries[handle]
    except IndexError:
        e = _entry(handle)
    comm = e.comm
    if (
        comm is not None
        and 0 < x.nbytes <= e.max_bytes
        and x.dtype in _DTYPES
        and (x.is_cpu if e.host else x.device.type == e.device_type)
        and x.is_contiguous()
        and x.dim() > 0
        and residual.dtype == x.dtype
        and residual.shape == x.shape
        and residual.device == x.device
        and residual.is_contiguous()
        and weight.dtype == x.dtype
        and weight.device == x.device
        and weight.is_contiguous()
        and weight.shape == x.shape[-1:]
    ):
        comm.all_reduce_add_rms_norm(x, residual, weight, eps, out=x, residual_out=residual)
        _counts["fused"] += 1
    else:
        e.fallback(x)
        add_rms_norm_native_(x, residual, weight, eps)
        _counts["fused_fallback"] += 1


def linear_all_reduce_add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
    eps: float, handle: int
) -> torch.Tensor:
    """linear_all_reduce_add_rms_norm(x, weight, residual, norm_weight, eps, handle) -> out

    A row-parallel linear (``weight`` ``[N, K]``, nn.Linear layout, this rank's shard; ``x``
    ``[M, K]``) whose output is all-reduced and then goes through ``fused_add_rms_norm``:
    ``residual <- sum_r x_r @ weight_r.T + residual`` (in place), returns the normed rows.
    Through ccl: ``ccl.linear_all_reduce_add_rms_norm`` (GEMV, fp32 partial, no
    intermediate rounding). Through the fallback: ``F.linear``, vLLM's all-reduce, native
    add + RMSNorm. This is a collective operation."""
    e = _entry(handle)
    comm = e.comm
    if (
        comm is not None
        and x.dim() == 2
        and residual.numel() > 0  # (over the mailbox capacity ccl delegates by itself)
        and x.dtype in _DTYPES
        and (x.is_cpu if e.host else x.device.type == e.device_type)
        and x.stride(-1) == 1
        and weight.dtype == x.dtype
        and residual.dtype == x.dtype
        and residual.is_contiguous()
        and norm_weight.dtype == x.dtype
    ):
        import ccl

        out = torch.empty_like(residual)
        ccl.linear_all_reduce_add_rms_norm(comm, x, weight.t(), residual, norm_weight, eps,
                                           out=out, residual_out=residual)
        _counts["fused_gemv"] += 1
        return out
    y = torch.nn.functional.linear(x, weight).contiguous()
    e.fallback(y)
    add_rms_norm_native_(y, residual, norm_weight, eps)
    _counts["fused_gemv_fallback"] += 1
    return y


def qk_rms_norm(
    qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_size: int,
    kv_size: int, tp_world: int, eps: float, handle: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """qk_rms_norm(qkv, q_weight, k_weight, q_size, kv_size, tp_world, eps, handle) -> (q, k)

    MiniMax-M2's tensor-parallel Q/K RMSNorm of a fused ``qkv`` ``[T, q_size + 2 kv_size]``
    (this rank's shard): ``q = q * rsqrt(mean over every rank's q columns of q² + eps) *
    q_weight`` per token, k likewise; fresh tensors. Through ccl: ``Communicator.qk_rms_norm``
    (the per-token sums of squares all-reduced inside the op, fp32 math). Through the fallback:
    vLLM's eager math (local mean of squares in fp32, vLLM's all-reduce of ``[T, 2]``, divided
    by ``tp_world``). This is a collective operation."""
    e = _entry(handle)
    comm = e.comm
    q = qkv[:, :q_size]
    k = qkv[:, q_size:q_size + kv_size]
    if (
        comm is not None
        and qkv.dim() == 2
        and qkv.numel() > 0
        and qkv.dtype in _DTYPES
        and (qkv.is_cpu if e.host else qkv.device.type == e.device_type)
        and qkv.stride(-1) == 1
        and q_weight.dtype == qkv.dtype
        and k_weight.dtype == qkv.dtype
    ):
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        comm.qk_rms_norm(q, k, q_weight, k_weight, eps, q_out=q_out, k_out=k_out)
        _counts["qk_fused"] += 1
        return q_out, k_out
    qf, kf = q.to(torch.float32), k.to(torch.float32)
    var = torch.cat([qf.pow(2).mean(dim=-1, keepdim=True),
                     kf.pow(2).mean(dim=-1, keepdim=True)], dim=-1).contiguous()
    e.fallback(var)
    var = var / tp_world
    q_out = (qf * torch.rsqrt(var[:, :1] + eps) * q_weight).to(qkv.dtype)
    k_out = (kf * torch.rsqrt(var[:, 1:] + eps) * k_weight).to(qkv.dtype)
    _counts["qk_fallback"] += 1
    return q_out, k_out


def add_rms_norm_native_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> None:
    """vLLM 0.32's native ``fused_add_rms_norm`` (vllm/ir/ops/layernorm.py), in place:
    ``s = fp32(x) + fp32(residual)``; ``residual <- dtype(s)``;
    ``x <- dtype(dtype_w(s * rsqrt(mean(s²) + eps)) * weight)``. Local."""
    s = x.to(torch.float32) + residual.to(torch.float32)
    residual.copy_(s)
    n = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        n = n.to(weight.dtype) * weight
    x.copy_(n)


# ---------------------------------------------------------------------- torch ops
_lib = torch.library.Library("ccl", "FRAGMENT")  # noqa: TOR901 (kept alive for the process)
_lib.define("all_reduce_(Tensor(a!) x, int handle) -> ()")
_lib.define(
    "all_reduce_add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps, "
    "int handle) -> ()"
)
# CompositeExplicitAutograd: one Python kernel for every backend (CPU now, CUDA/XPU when the
# GPU communicator exists); the impl dispatches on the registered communicator itself.
_lib.impl("all_reduce_", all_reduce_, "CompositeExplicitAutograd")
_lib.impl("all_reduce_add_rms_norm_", all_reduce_add_rms_norm_, "CompositeExplicitAutograd")
_lib.define(
    "linear_all_reduce_add_rms_norm(Tensor x, Tensor weight, Tensor(a!) residual, "
    "Tensor norm_weight, float eps, int handle) -> Tensor"
)
_lib.impl("linear_all_reduce_add_rms_norm", linear_all_reduce_add_rms_norm,
          "CompositeExplicitAutograd")
_lib.define(
    "qk_rms_norm(Tensor qkv, Tensor q_weight, Tensor k_weight, int q_size, int kv_size, "
    "int tp_world, float eps, int handle) -> (Tensor, Tensor)"
)
_lib.impl("qk_rms_norm", qk_rms_norm, "CompositeExplicitAutograd")


@torch.library.register_fake("ccl::all_reduce_", lib=_lib)
def _all_reduce_fake(x, handle):
    return None


@torch.library.register_fake("ccl::all_reduce_add_rms_norm_", lib=_lib)
def _all_reduce_add_rms_norm_fake(x, residual, weight, eps, handle):
    return None


@torch.library.register_fake("ccl::linear_all_reduce_add_rms_norm", lib=_lib)
def _linear_all_reduce_add_rms_norm_fake(x, weight, residual, norm_weight, eps, handle):
    return torch.empty_like(residual)


@torch.library.register_fake("ccl::qk_rms_norm", lib=_lib)
def _qk_rms_norm_fake(qkv, q_weight, k_weight, q_size, kv_size, tp_world, eps, handle):
    t = qkv.shape[0]
    return qkv.new_empty((t, q_size)), qkv.new_empty((t, kv_size))


# ---------------------------------------------------------------------- counters
def stats() -> dict:
    """Counters of this process plus the registered groups (a JSON-able dict). Local."""
    return {
        "pid": os.getpid(),
        "counters": dict(_counts),
        "groups": [
            {"handle": h, "name": e.name, "ccl": e.ccl, "open": e.comm is not None,
             "device": e.device_type, **e.info}
            for h, e in enumerate(_entries)
        ],
    }


def write_stats(directory: str | None = None) -> str | None:
    """Writes :func:`stats` to ``<directory>/ccl_vllm.pid<pid>.json`` (atomically, replacing
    an older dump of this process) and returns the path. ``directory`` defaults to env
    ``CCL_VLLM_STATS``; returns None when neither is set. Local."""
    directory = directory or os.environ.get("CCL_VLLM_STATS")
    if not directory:
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"ccl_vllm.pid{os.getpid()}.json")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ccl_vllm.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(stats(), f)
    os.replace(tmp, path)
    return path


_writer: list = []


def _start_stats_writer() -> None:
    """With ``CCL_VLLM_STATS`` set: a daemon thread rewrites the stats file every
    ``CCL_VLLM_STATS_INTERVAL`` seconds (default 5), because vLLM force-kills workers whose
    shutdown takes more than a few seconds and then no exit hook runs. Once per process."""
    if _writer or not os.environ.get("CCL_VLLM_STATS"):
        return
    interval = float(os.environ.get("CCL_VLLM_STATS_INTERVAL", "5"))
    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            try:
                write_stats()
            except OSError as e:
                logger.warning("ccl_vllm: cannot write CCL_VLLM_STATS (%s); stopped writing", e)
                return

    t = threading.Thread(target=loop, name="ccl_vllm-stats", daemon=True)
    _writer.append((t, stop))
    t.start()
