"""The torch.distributed backend ``"mbx"``: small CPU all-reduces through the host mailboxes.

    import ccl                                  # registers "mbx"
    dist.init_process_group("mbx")              # or "cpu:mbx", "cpu:gloo,cuda:mbx", "xpu:mbx"
    dist.all_reduce(t)                          # CPU, SUM/AVG, fp32/bf16/fp16, <= capacity

Every other collective, every larger payload, other ops and dtypes, and every device tensor go
to the wrapped backend of the tensor's device: gloo (CPU), nccl (CUDA), xccl (XPU). Ranks on
several nodes (``ccl.rendezvous.node_id()``; ``CCL_NODE_ID`` overrides it) reduce in three
steps: mailbox all-reduce inside each node (fp32 partial sums), all-reduce among one leader per
node over gloo, mailbox broadcast inside each node.

Two implementations, one setup (:func:`_plan`):

* ``ccl._C_torch`` (default): a C++ ``c10d::Backend`` subclass built against the installed
  torch. It behaves like a built-in backend: device-mapped forms and the functional
  collectives (``torch.distributed._functional_collectives``, ``torch.compile``) reach it.
* a pure-Python ``ProcessGroup`` subclass, used when ``ccl._C_torch`` is missing or does not
  match the running torch (one WARNING says so), or with ``CCL_BACKEND_IMPL=python``. It
  carries every device itself, so a device map such as ``"cpu:gloo,cuda:mbx"`` is honoured
  only in spirit (the group's own gloo serves CPU tensors). Functional collectives reach it
  too, because the wrapped backends are registered on it (they hold the group's name).

Env: ``CCL_MAX_BYTES`` (mailbox capacity, default 1 MiB, same on every rank),
``CCL_TIMEOUT_S`` (default: the process group's timeout), ``CCL_FD_EXCHANGE``,
``CCL_BACKEND_IMPL=c10d|python``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ccl import _C, tuning
from ccl.comm import DEFAULT_MAX_BYTES
from ccl.errors import CclError, CollectiveMismatch, CollectiveTimeout, ConfigError
from ccl.rendezvous import StoreExchange, exchange_fds, node_id
from ccl.transport import host as host_transport

logger = logging.getLogger(__name__)

__all__ = ["BACKEND", "register", "stats"]

BACKEND = "mbx"
DEVICES = ("cpu", "cuda", "xpu")

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_OK, _TIMEOUT, _MISMATCH = 0, 1, 2
_OP_ALL_REDUCE = 1

_registered = False
_impl_cache: Any = None  # the ccl._C_torch module, False when unusable, None before the probe


def register() -> None:
    """register() -> None

    Registers the backend ``"mbx"`` with torch.distributed for "cpu", "cuda" and "xpu".
    Local (not collective), cheap and idempotent: ``import ccl`` calls it.
    """
    global _registered
    if _registered:
        return
    dist.Backend.register_backend(BACKEND, _create, devices=list(DEVICES))
    _registered = True


def stats(group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """stats(group=None) -> dict

    Counters of this rank's mbx backend in ``group`` (default: the world group):
    ``mailbox_all_reduce`` (single-node mailbox all-reduces), ``hierarchical_all_reduce``
    (multi-node: mailbox + leaders + mailbox), ``delegated_all_reduce`` (all-reduces handed to
    the wrapped backend), ``delegated_other`` (other collectives; c10d implementation only)
    and ``impl`` ("c10d" or "python"). Local. Raises ValueError when the group has no mbx
    backend.
    """
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    if isinstance(pg, _PyMailboxGroup):
        return pg.stats()
    impl = _cpp()
    if impl:
        for dev in DEVICES:
            try:
                b = pg._get_backend(torch.device(dev))
            except RuntimeError:
                continue
            s = impl.stats(b)
            if s is not None:
                return {"impl": "c10d", **s}
    raise ValueError(f"process group {pg.group_name!r} has no {BACKEND!r} backend on this rank")


# ====================================================================== setup (both impls)
@dataclass
class _Plan:
    """What one rank of a new group holds: topology, wrapped backends, mailbox region."""

    rank: int
    size: int
    timeout_s: float
    capacity: int
    wrapped: dict[str, Any]  # device type -> wrapped c10d Backend
    node_ranks: list[int]  # global ranks of this rank's node, in local-rank order
    n_nodes: int
    enabled: bool  # the mailbox path is used by this group (same value on every rank)
    leaders: Any = None  # gloo among one rank per node (node leaders of multi-node jobs)
    region: host_transport.HostRegion | None = None
    two_shot_above: int = 0
    reasons: list[str] = field(default_factory=list)

    @property
    def local_rank(self) -> int:
        return self.node_ranks.index(self.rank)


def _plan(store, rank: int, size: int, timeout: timedelta) -> _Plan:
    timeout_s = float(os.environ.get("CCL_TIMEOUT_S") or timeout.total_seconds())
    capacity = int(os.environ.get("CCL_MAX_BYTES") or DEFAULT_MAX_BYTES)
    if capacity <= 0:
        raise ConfigError(f"CCL_MAX_BYTES must be positive, got {capacity}")
    boot = StoreExchange(store, rank, size, "mbx/boot")
    infos = boot.all_gather((node_id(), capacity))
    caps = {r: c for r, (_, c) in enumerate(infos)}
    if len(set(caps.values())) != 1:
        raise ConfigError(
            f"ranks disagree on the mailbox capacity: {caps}; set the same CCL_MAX_BYTES on "
            "every rank"
        )
    nodes = list(dict.fromkeys(n for n, _ in infos))  # in order of their lowest rank
    mine = infos[rank][0]
    node_ranks = [r for r, (n, _) in enumerate(infos) if n == mine]
    leader_ranks = [next(r for r, (n, _) in enumerate(infos) if n == node) for node in nodes]
    largest = max(sum(1 for n, _ in infos if n == node) for node in nodes)

    reasons = []
    avail = host_transport.availability()
    if not avail:
        reasons.append(f"host transport unavailable: {avail.reason}")
    if largest < 2:
        reasons.append("no two ranks share a node")
    if largest > _C.host.MAX_WORLD:
        reasons.append(f"{largest} ranks on one node exceed the mailbox limit {_C.host.MAX_WORLD}")

    plan = _Plan(
        rank=rank, size=size, timeout_s=timeout_s, capacity=capacity,
        wrapped=_wrapped_backends(store, rank, size, timeout), node_ranks=node_ranks,
        n_nodes=len(nodes), enabled=not reasons, reasons=reasons,
    )
    if plan.n_nodes > 1 and rank in leader_ranks:
        plan.leaders = dist.ProcessGroupGloo(
            dist.PrefixStore("mbx/leaders", store), leader_ranks.index(rank), len(nodes), timeout
        )
    if plan.enabled and len(node_ranks) > 1:
        plan.region = _connect_node(store, nodes.index(mine), plan)
        plan.two_shot_above = tuning.two_shot_threshold("host", len(node_ranks))
    return plan


def _wrapped_backends(store, rank: int, size: int, timeout: timedelta) -> dict[str, Any]:
    """One backend per device type this machine has: gloo, nccl, xccl. Every rank of a group
    must see the same device types (as with any multi-device process group)."""
    wrapped: dict[str, Any] = {
        "cpu": dist.ProcessGroupGloo(dist.PrefixStore("mbx/gloo", store), rank, size, timeout)
    }
    if dist.is_nccl_available() and torch.cuda.is_available():
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        wrapped["cuda"] = dist.ProcessGroupNCCL(
            dist.PrefixStore("mbx/nccl", store), rank, size, opts
        )
    xccl = getattr(dist, "is_xccl_available", lambda: False)()
    if xccl and hasattr(torch, "xpu") and torch.xpu.is_available():
        opts = dist.ProcessGroupXCCL.Options()
        opts._timeout = timeout
        wrapped["xpu"] = dist.ProcessGroupXCCL(
            dist.PrefixStore("mbx/xccl", store), rank, size, opts
        )
    return wrapped


def _connect_node(store, node_index: int, plan: _Plan) -> host_transport.HostRegion:
    """Maps the mailbox regions of this node's ranks (collective over the node)."""
    local, world = plan.local_rank, len(plan.node_ranks)
    region = host_transport.HostRegion(world, local, plan.capacity)
    try:
        exchange = StoreExchange(store, local, world, f"mbx/node{node_index}")
        fds = exchange_fds(
            exchange, region.fd, method=os.environ.get("CCL_FD_EXCHANGE", "socket"),
            timeout_s=plan.timeout_s,
        )
        for peer, fd in fds.items():
            region.import_peer(peer, fd)
        region.verify_peers()
    except BaseException:
        region.close()
        raise
    return region


def _create(store, rank: int, size: int, timeout: timedelta):
    """The creator torch.distributed calls on every rank of a new group."""
    plan = _plan(store, rank, size, timeout)
    impl = _cpp() if os.environ.get("CCL_BACKEND_IMPL", "c10d") != "python" else False
    if impl:
        backend = _to_cpp(impl, plan)
    else:
        backend = _PyMailboxGroup(plan)
    how = "c10d" if impl else "python"
    if plan.enabled:
        logger.info(
            "ccl: mbx backend rank %d/%d (%s): mailboxes among global ranks %s, capacity %d B, "
            "%d node(s), wrapped %s", rank, size, how, plan.node_ranks, plan.capacity,
            plan.n_nodes, sorted(plan.wrapped),
        )
    else:
        logger.info(
            "ccl: mbx backend rank %d/%d (%s): every collective delegated to %s (%s)",
            rank, size, how, sorted(plan.wrapped), "; ".join(plan.reasons),
        )
    return backend


def _cpp():
    """The ccl._C_torch module, or False (with one WARNING) when it cannot be used."""
    global _impl_cache
    if _impl_cache is None:
        reason = None
        try:
            from ccl import _C_torch

            if _C_torch.TORCH_VERSION != torch.__version__:
                reason = (f"it was built against torch {_C_torch.TORCH_VERSION}, this is "
                          f"torch {torch.__version__} (reinstall mailbox-ccl)")
        except ImportError as e:
            reason = f"it does not import ({e}); build with torch installed and " \
                     "pip install --no-build-isolation"
        if reason is None:
            _impl_cache = _C_torch
        else:
            _impl_cache = False
            if os.environ.get("CCL_BACKEND_IMPL") != "python":
                logger.warning(
                    "ccl: ccl._C_torch unavailable: %s. The mbx backend runs as a Python "
                    "ProcessGroup (device maps are not honoured; functional collectives work). "
                    "Set CCL_BACKEND_IMPL=python to silence this.", reason,
                )
    return _impl_cache


def _to_cpp(impl, plan: _Plan):
    region = plan.region
    bases = list(region.bases) if region is not None else []
    backend = impl.create(
        rank=plan.rank, size=plan.size, wrapped=plan.wrapped, leaders=plan.leaders,
        enabled=plan.enabled, n_nodes=plan.n_nodes, node_ranks=plan.node_ranks,
        local_rank=plan.local_rank, bases=bases, capacity_bytes=plan.capacity,
        region_bytes=region.region_bytes if region is not None else 0,
        fd=region.fd if region is not None else -1, timeout_s=plan.timeout_s,
        two_shot_above=plan.two_shot_above,
    )
    if region is not None:
        # The backend owns the mappings and the fd now (unmapped when it is destroyed).
        region.bases = [0] * len(region.bases)
        region.fd = -1
    return backend


# ====================================================================== Python fallback
_BACKEND_TYPES = {
    "cpu": dist.ProcessGroup.BackendType.GLOO,
    "cuda": dist.ProcessGroup.BackendType.NCCL,
    "xpu": getattr(dist.ProcessGroup.BackendType, "XCCL", dist.ProcessGroup.BackendType.CUSTOM),
}


class _PyMailboxGroup(dist.ProcessGroup):
    """The mbx backend as a Python ProcessGroup (fallback when ccl._C_torch is unusable).

    ``allreduce`` is ours; every other collective is forwarded from Python to the wrapped
    backend of the tensors' device (see ``_FORWARDED``). Not inheriting them matters: torch's
    trampoline (PyProcessGroup's WORK_OVERRIDE) runs an inherited C++ collective with the GIL
    held, and gloo's worker thread, which frees finished work (and the Python-owned tensors
    in it) under its queue lock, then deadlocks against the next enqueue. The backends' own
    Python bindings release the GIL.
    """

    def __init__(self, plan: _Plan):
        super().__init__(plan.rank, plan.size)
        self._plan = plan
        for dev, b in plan.wrapped.items():
            self._register_backend(torch.device(dev), _BACKEND_TYPES[dev], b)
        self._mailbox = None
        if plan.region is not None:
            self._mailbox = _C.host.HostMailbox(
                plan.local_rank, len(plan.node_ranks), plan.region.bases, plan.capacity,
                plan.timeout_s,
            )
        self._broken: str | None = None
        self._counts = dict(mailbox_all_reduce=0, hierarchical_all_reduce=0,
                            delegated_all_reduce=0)

    def __del__(self):
        self._mailbox = None
        region = getattr(self, "_plan", None) and self._plan.region
        if region is not None:
            region.close()

    def getBackendName(self) -> str:  # noqa: N802 - c10d's name
        return BACKEND

    def stats(self) -> dict[str, Any]:
        return {"impl": "python", **self._counts}

    def allreduce(self, tensors, opts=None):
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        if opts is None:
            opts = dist.AllreduceOptions()
        elif not isinstance(opts, dist.AllreduceOptions):  # allreduce(tensors, ReduceOp)
            op, opts = opts, dist.AllreduceOptions()
            opts.reduceOp = op
        t = tensors[0]
        plan = self._plan
        if t.device.type != "cpu":
            # Hook for the GPU mailbox paths; until then the wrapped device backend.
            self._counts["delegated_all_reduce"] += 1
            return self._get_backend(t.device).allreduce(tensors, opts)
        avg = opts.reduceOp == dist.ReduceOp.AVG
        code = _DTYPE_CODES.get(t.dtype)
        eligible = (
            plan.enabled and len(tensors) == 1 and code is not None
            and (avg or opts.reduceOp == dist.ReduceOp.SUM) and t.layout == torch.strided
            and t.is_contiguous() and t.numel() > 0
        )
        if not eligible:
            self._counts["delegated_all_reduce"] += 1
            return self._delegate(tensors, opts, avg and code is not None)
        if self._broken:
            raise CclError(self._broken)
        numel = t.numel()
        nbytes = numel * (4 if plan.n_nodes > 1 else t.element_size())
        if nbytes > plan.capacity:
            if self._mailbox is not None:
                self._check(self._mailbox.handshake(_OP_ALL_REDUCE, code, numel, 0, 0.0))
            self._counts["delegated_all_reduce"] += 1
            return self._delegate(tensors, opts, avg)
        if plan.n_nodes > 1:
            self._hierarchical(t)
            self._counts["hierarchical_all_reduce"] += 1
        else:
            p = t.data_ptr()
            self._check(self._mailbox.all_reduce(p, p, numel, code, nbytes > plan.two_shot_above))
            self._counts["mailbox_all_reduce"] += 1
        if avg:
            t.div_(plan.size)
        return _completed(tensors)

    def _hierarchical(self, t: torch.Tensor) -> None:
        """Same steps and rounding as the c10d implementation (see the module docstring)."""
        plan = self._plan
        acc = t if t.dtype == torch.float32 else t.float()
        p, n = acc.data_ptr(), acc.numel()
        algo = 4 * n > plan.two_shot_above
        if self._mailbox is not None:
            self._check(self._mailbox.all_reduce(p, p, n, 0, algo))
        if plan.leaders is not None:
            plan.leaders.allreduce([acc], dist.AllreduceOptions()).wait()
        if self._mailbox is not None:
            if plan.local_rank != 0:
                acc.zero_()
            self._check(self._mailbox.all_reduce(p, p, n, 0, algo))
        if acc is not t:
            t.copy_(acc)

    def _delegate(self, tensors, opts, avg_as_sum: bool):
        cpu = self._get_backend(torch.device("cpu"))
        if not avg_as_sum:
            return cpu.allreduce(tensors, opts)
        s = dist.AllreduceOptions()
        s.reduceOp = dist.ReduceOp.SUM
        cpu.allreduce(tensors, s).wait()  # gloo has no AVG
        for t in tensors:
            t.div_(self._plan.size)
        return _completed(tensors)

    def _check(self, status: int) -> None:
        if status == _OK:
            return
        plan = self._plan
        err = self._mailbox.last_error()
        if status == _TIMEOUT:
            missing = [plan.node_ranks[r] for r in range(len(plan.node_ranks))
                       if err.missing_mask >> r & 1]
            self._broken = (
                f"mbx: rank {plan.rank}: all_reduce #{self._mailbox.seq} timed out after "
                f"{plan.timeout_s:.0f} s waiting for rank(s) {missing}; this process group is "
                "unusable now (destroy it and create a new one)"
            )
            raise CollectiveTimeout(self._broken, missing, plan.rank, plan.timeout_s)
        if status == _MISMATCH:
            peer = plan.node_ranks[err.mismatch_rank]
            raise CollectiveMismatch(
                f"mbx: rank {peer} and rank {plan.rank} made different all_reduce calls "
                "(dtype or numel differ); every rank must make the same call", plan.rank, peer,
            )
        raise CclError(f"mbx: rank {plan.rank}: all_reduce failed with status {status}: "
                       f"{err.message}")


# Collectives forwarded unchanged (names as both torch's Python API and PyProcessGroup's
# trampoline call them; the wrapped backends' bindings take the same arguments).
_FORWARDED = (
    "broadcast", "allreduce_coalesced", "reduce", "allgather", "_allgather_base",
    "allgather_coalesced", "allgather_into_tensor_coalesced", "gather", "scatter",
    "reduce_scatter", "_reduce_scatter_base", "reduce_scatter_tensor_coalesced",
    "alltoall_base", "alltoall", "send", "recv", "recv_anysource", "barrier",
    "monitored_barrier",
)


def _first_device(args) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            d = _first_device(a)
            if d is not None:
                return d
    return None


def _forwarder(name: str):
    def forward(self, *args, **kwargs):
        values = args + tuple(kwargs.values())
        device = _first_device(values)
        if device is None:  # barrier / monitored_barrier: the options may name a device
            device = next((getattr(a, "device", None) for a in values
                           if getattr(a, "device", None) is not None), torch.device("cpu"))
        return getattr(self._get_backend(device), name)(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = name
    forward.__doc__ = f"{name}: forwarded to the wrapped backend of the tensors' device."
    return forward


for _name in _FORWARDED:
    setattr(_PyMailboxGroup, _name, _forwarder(_name))
del _name


def _completed(tensors: list[torch.Tensor]):
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(tensors)
    return torch._C._distributed_c10d._create_work_from_future(fut)


# Importing this module registers the backend (``from ccl import backend`` in ccl/__init__.py
# is all ``import ccl`` needs); register() stays public and idempotent.
register()
