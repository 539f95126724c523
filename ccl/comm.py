"""The Communicator: owns the mailboxes, the algorithm dispatch and the fallback chain.

Data flows one way (DESIGN.md §2): op call -> Communicator -> kernel (reads its own inbox,
writes peers' inboxes through the transport's mappings). The Communicator validates input,
picks the algorithm from ``ccl.tuning`` and delegates what the mailboxes cannot carry to the
wrapped torch.distributed backend.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import os
import warnings
from datetime import timedelta
from typing import Any

import torch

from ccl import _C, _checks, tuning
from ccl.errors import (
    CclError,
    CollectiveMismatch,
    CollectiveTimeout,
    CommunicatorClosed,
    ConfigError,
)
from ccl.rendezvous import Exchange, MpiExchange, StoreExchange, env_store, exchange_fds
from ccl.transport import host as host_transport

logger = logging.getLogger(__name__)

__all__ = ["Communicator", "NormStyle", "ReduceOp"]

DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 120.0

_DTYPE_CODES = _checks.DTYPE_CODES
_CODE_NAMES = {0: "float32", 1: "bfloat16", 2: "float16"}
_OP_NAMES = {
    1: "all_reduce",
    2: "all_reduce_add_rms_norm",
    3: "qk_rms_norm",
    4: "handshake",
    5: "linear_all_reduce_add_rms_norm",
    6: "moe_all_reduce_add_rms_norm",
}

_OK, _TIMEOUT, _MISMATCH = 0, 1, 2
# Header flag bits (csrc/host/mailbox.h): the reduce op and how the payload travels.
_HDR_RESIDUAL, _HDR_GEMMA, _HDR_BULK, _HDR_TWO_SHOT, _HDR_DELEGATED = 0x01, 0x02, 0x20, 0x40, 0x80



class ReduceOp(enum.Enum):
    SUM = "sum"
    AVG = "avg"
    MAX = "max"
    MIN = "min"


# Reduce op -> header bits, so ranks that disagree (SUM on one, AVG on another) are caught.
_OP_FLAGS = {ReduceOp.SUM: 0x00, ReduceOp.AVG: 0x04, ReduceOp.MAX: 0x08, ReduceOp.MIN: 0x0C}
_OP_FLAG_NAMES = {0x04: "avg", 0x08: "max", 0x0C: "min"}


class NormStyle(enum.Enum):
    """How the RMSNorm weight is applied: ``w`` (Llama) or ``1 + w`` (Gemma)."""

    STANDARD = "standard"
    GEMMA = "gemma"


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    return float(v) if v else default


class _Fallback:
    """The wrapped backend: a torch.distributed process group or an mpi4py communicator."""

    def __init__(self, group=None, mpi_comm=None):
        self.group = group
        self.mpi_comm = mpi_comm

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp) -> None:
        if self.group is not None:
            import torch.distributed as dist

            rop = {
                ReduceOp.SUM: dist.ReduceOp.SUM,
                ReduceOp.AVG: dist.ReduceOp.SUM,
                ReduceOp.MAX: dist.ReduceOp.MAX,
                ReduceOp.MIN: dist.ReduceOp.MIN,
            }[op]
            if isinstance(self.group, dist.ProcessGroup) and not _is_registered(self.group):
                opts = dist.AllreduceOptions()
                opts.reduceOp = rop
                self.group.allreduce([tensor], opts).wait()
            else:
                dist.all_reduce(tensor, op=rop, group=self.group)
            if op is ReduceOp.AVG:
                tensor.div_(self.world_size())
            return
        if self.mpi_comm is not None:
            from mpi4py import MPI

            work = tensor if tensor.dtype == torch.float32 else tensor.float()
            mop = {ReduceOp.SUM: MPI.SUM, ReduceOp.AVG: MPI.SUM, ReduceOp.MAX: MPI.MAX,
                   ReduceOp.MIN: MPI.MIN}[op]
            self.mpi_comm.Allreduce(MPI.IN_PLACE, work.numpy(), op=mop)
            if op is ReduceOp.AVG:
                work.div_(self.mpi_comm.Get_size())
            if work is not tensor:
                tensor.copy_(work)
            return
        raise CclError("no wrapped backend")  # guarded by the caller

    def world_size(self) -> int:
        return self.group.size()

    def __bool__(self) -> bool:
        return self.group is not None or self.mpi_comm is not None


def _is_registered(group) -> bool:
    import torch.distributed as dist

    try:
        dist.get_rank(group)
        return True
    except (RuntimeError, ValueError):
        return False


_group_counters: collections.defaultdict = collections.defaultdict(itertools.count)


def _bootstrap(group: Any, timeout_s: float) -> tuple[Exchange, _Fallback]:
    """An all-gather exchange for setup, and the backend used above mailbox capacity."""
    if group is not None and type(group).__module__.startswith("mpi4py"):
        return MpiExchange(group), _Fallback(mpi_comm=group)

    import torch.distributed as dist

    if group is None and not dist.is_initialized():
        if "RANK" in os.environ and "MASTER_PORT" in os.environ:
            store, rank, world = env_store(timeout_s)
            prefix = f"ccl/env/{next(_group_counters['env'])}"
            # A private gloo group on the same store is the wrapped backend.
            pg = dist.ProcessGroupGloo(
                dist.PrefixStore(f"{prefix}/gloo", store), rank, world,
                timedelta(seconds=timeout_s),
            )
            return StoreExchange(store, rank, world, prefix, timeout_s), _Fallback(group=pg)
        raise ConfigError(
            "Communicator() needs a bootstrap: pass a torch.distributed group, an mpi4py "
            "communicator, call torch.distributed.init_process_group first, or set RANK, "
            "WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    pg = group if group is not None else dist.group.WORLD
    store = dist.distributed_c10d._get_default_store()
    rank = dist.get_rank(pg)
    world = dist.get_world_size(pg)
    # Group names are identical on every member, and a counter per group advances
    # identically as long as communicators over a group are created in the same order on its
    # members (as NCCL requires); a per-process counter would diverge for overlapping groups.
    name = dist.distributed_c10d._get_group_tag(pg) or "world"
    prefix = f"ccl/{name}/{next(_group_counters[name])}"
    return StoreExchange(store, rank, world, prefix, timeout_s), _Fallback(group=pg)


class Communicator:
    """Communicator(group=None, *, max_bytes=None, timeout=None, fd_exchange=None)

    Mailbox collectives among the ranks of ``group``. This is a collective operation: every
    rank of the group must construct it, in the same order relative to other communicators.

    ``group`` is a torch.distributed ProcessGroup (default: the world group), an mpi4py
    communicator, or None with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set.
    ``max_bytes`` is the largest payload carried through the mailboxes (env
    ``CCL_MAX_BYTES``, default 1 MiB); larger calls go to the wrapped backend (gloo, or MPI).
    ``timeout`` bounds every wait, in seconds (env ``CCL_TIMEOUT_S``, default 120); on expiry
    the call raises :class:`CollectiveTimeout` naming the missing ranks.
    ``fd_exchange`` is "socket" (SCM_RIGHTS, default) or "pidfd" (env ``CCL_FD_EXCHANGE``).
    """

    def __init__(
        self,
        group: Any = None,
        *,
        device: torch.device | str | None = None,
        max_bytes: int | None = None,
        timeout: float | None = None,
        fd_exchange: str | None = None,
    ):
        self._mailbox = None  # host mailbox; set last: a half-built communicator has none
        # The host ops' C++ fast paths (ccl._C_torch), None without that module.
        self._fast_ar = self._fast_arn = self._fast_qk = None
        self._device_mailbox = None  # DeviceMailbox on CUDA / XPU
        self._region = None
        self._broken: str | None = None
        self._closed = True
        self.fallback_reason: str | None = None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "xpu" and self.device.index is None:
            self.device = torch.device("xpu", torch.xpu.current_device())
        max_bytes = int(max_bytes or os.environ.get("CCL_MAX_BYTES", DEFAULT_MAX_BYTES))
        timeout = float(timeout or _env_float("CCL_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        fd_exchange = fd_exchange or os.environ.get("CCL_FD_EXCHANGE", "socket")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")

        if self.device.type == "cpu":
            availability = host_transport.availability()
            if not availability:
                raise CclError(f"host transport unavailable: {availability.reason}")

        exchange, self._fallback = _bootstrap(group, timeout)
        self.rank = exchange.rank
        self.world_size = exchange.world_size
        if self.world_size > _C.host.MAX_WORLD:
            raise ConfigError(
                f"world size {self.world_size} exceeds the mailbox limit {_C.host.MAX_WORLD}"
            )
        configs = exchange.all_gather(max_bytes)
        if len(set(configs)) != 1:
            raise ConfigError(
                f"ranks disagree on max_bytes: {dict(enumerate(configs))}; set the same "
                "max_bytes / CCL_MAX_BYTES on every rank"
            )
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._two_shot_above = tuning.two_shot_threshold("host", self.world_size)

        if self.device.type == "cpu":
            self._init_host(exchange, fd_exchange)
        else:
            self._init_device(exchange, fd_exchange)
        self._closed = False

    @property
    def transport(self) -> str:
        """"host", "cuda", "level_zero", or "fallback" (everything through the wrapped
        backend, see ``fallback_reason``)."""
        return self._transport

    def _init_host(self, exchange: Exchange, fd_exchange: str) -> None:
        self._transport = "host"
        self._two_shot_above = tuning.two_shot_threshold("host", self.world_size)
        region = host_transport.HostRegion(self.world_size, self.rank, self.max_bytes)
        try:
            fds = exchange_fds(exchange, region.fd, method=fd_exchange, timeout_s=self.timeout)
            for peer, fd in fds.items():
                region.import_peer(peer, fd)
            region.verify_peers()
            self._mailbox = _C.host.HostMailbox(
                self.rank, self.world_size, region.bases, self.max_bytes, self.timeout
            )
        except BaseException:
            region.close()
            raise
        self._region = region
        fast = _host_fast_path(self._mailbox, self.max_bytes, self._two_shot_above)
        if fast is not None:
            self._fast_ar, self._fast_arn, self._fast_qk = fast
        logger.info(
            "ccl: rank %d/%d host mailboxes up (capacity %d B, timeout %.0f s, fd exchange %s)",
            self.rank, self.world_size, self.max_bytes, self.timeout, fd_exchange,
        )

    def _init_device(self, exchange: Exchange, fd_exchange: str) -> None:
        """Device mailboxes through the device's transport; when peers cannot map each other
        every rank agrees to fall back to the wrapped backend, and says why."""
        from ccl.device_mailbox import DeviceMailbox

        kind = {"cuda": "cuda", "xpu": "level_zero"}.get(self.device.type)
        nbytes = DeviceMailbox.region_bytes(self.world_size, self.max_bytes)
        region, reason = None, None
        if kind is None:
            reason = f"no mailbox transport for device type {self.device.type!r}"
        else:
            try:
                region = _open_device_region(kind, self.world_size, self.rank, nbytes, self.device)
            except Exception as e:  # noqa: BLE001 - the reason is reported, never swallowed
                reason = f"{kind} transport unavailable on rank {self.rank}: {e}"
        # Agree before any rank waits on a peer that could not even allocate.
        reasons = [r for r in exchange.all_gather(reason) if r]
        if not reasons:
            try:
                region.connect(exchange, method=fd_exchange, timeout_s=self.timeout)
            except CclError as e:  # connect's verification is agreed across ranks
                reasons = [str(e)]
        if reasons:
            if region is not None:
                region.close()
            self._transport = "fallback"
            self.fallback_reason = reasons[0]
            if not self._fallback:
                raise CclError(f"no device mailboxes and no wrapped backend: {reasons[0]}")
            logger.warning(
                "ccl: rank %d: device mailboxes disabled, every collective goes to the wrapped "
                "backend: %s", self.rank, reasons[0],
            )
            return
        self._transport = kind
        self._two_shot_above = tuning.two_shot_threshold(kind, self.world_size)
        self._region = region
        self._device_mailbox = DeviceMailbox(
            self.rank, self.world_size, region.bases, self.max_bytes, self.device,
            timeout=self.timeout,
        )
        logger.info(
            "ccl: rank %d/%d %s mailboxes up on %s (capacity %d B, timeout %.0f s)",
            self.rank, self.world_size, kind, self.device, self.max_bytes, self.timeout,
        )

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Unmaps every mailbox and closes its fds. Local, idempotent."""
        self._closed = True
        self._fast_ar = self._fast_arn = self._fast_qk = None
        self._mailbox = None
        self._fallback = _Fallback()
        if self._device_mailbox is not None:
            self._device_mailbox.close()
            self._device_mailbox = None
        if self._region is not None:
            self._region.close()
            self._region = None

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_region", None) is not None:
            warnings.warn(
                "ccl.Communicator was not closed; call close() or use it as a context manager",
                ResourceWarning,
                stacklevel=2,
            )
            self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def seq(self) -> int:
        """Sequence number of the last call (advanced by every op, on every rank)."""
        self._live()
        mailbox = self._mailbox or self._device_mailbox
        return mailbox.seq if mailbox is not None else 0

    def synchronize(self) -> None:
        """Waits for this rank's device ops and raises what their kernels recorded
        (:class:`CollectiveTimeout` naming the missing ranks, :class:`CollectiveMismatch`).
        Device ops are asynchronous: errors surface here or in a later op's check. A no-op on
        the host transport, whose ops raise directly."""
        self._live()
        if self._device_mailbox is None:
            return
        try:
            self._device_mailbox.raise_if_failed()
        except CollectiveTimeout as e:
            self._broken = str(e)
            self.close()
            raise

    # ------------------------------------------------------------------ ops
    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: ReduceOp | str = ReduceOp.SUM,
        *,
        out: torch.Tensor | None = None,
        algorithm: str | None = None,
    ) -> torch.Tensor:
        """all_reduce(tensor, op=SUM, *, out=None, algorithm=None) -> Tensor

        Sum of ``tensor`` over all ranks (AVG, MAX, MIN also accepted; MAX/MIN go to the
        wrapped backend). In place unless ``out`` is given. This is a collective operation.
        fp32 accumulation in rank order: every rank gets a bitwise-identical result.
        ``algorithm`` forces "one_shot" or "two_shot" (all ranks must pass the same).
        """
        # Fast paths: decode issues ~150 of these calls per token, so Python overhead here is
        # the op's latency on the host transport. First the C++ one (checks the tensors and
        # runs the op; -1: not the plain case, nothing communicated), then a Python one kept
        # to a handful of attribute reads (without ccl._C_torch).
        fast = self._fast_ar
        if fast is not None and algorithm is None and op is ReduceOp.SUM:
            st = fast(tensor, out)
            if st == 0:
                return tensor if out is None else out
            if st > 0:
                self._raise(st)
        mailbox = self._mailbox
        if mailbox is not None and algorithm is None and op is ReduceOp.SUM:
            code = _DTYPE_CODES.get(getattr(tensor, "dtype", None))
            if (
                code is not None
                and tensor.is_cpu
                and tensor.is_contiguous()
                and (out is None or _same_layout(out, tensor))
            ):
                nbytes = tensor.nbytes
                if nbytes <= self.max_bytes:
                    ptr = tensor.data_ptr()
                    st = mailbox.all_reduce(
                        ptr,
                        ptr if out is None else out.data_ptr(),
                        tensor.numel(),
                        code,
                        nbytes > self._two_shot_above,
                    )
                    if st:
                        self._raise(st)
                    return tensor if out is None else out
        mailbox = self._live()
        if not isinstance(op, ReduceOp):
            op = ReduceOp(op)
        self._algorithm(0, algorithm)  # reject a bad name before anything runs
        if mailbox is None:
            return self._all_reduce_device(tensor, op, out, algorithm)
        code = self._check(tensor, "tensor")
        if out is None:
            out = tensor
        elif out.dtype != tensor.dtype or out.shape != tensor.shape or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous {tensor.dtype} tensor of shape {tuple(tensor.shape)}"
                f", got {out.dtype} {tuple(out.shape)}"
            )
        numel = tensor.numel()
        nbytes = numel * tensor.element_size()
        op_flags = _OP_FLAGS[op]
        if nbytes > self.max_bytes or op in (ReduceOp.MAX, ReduceOp.MIN):
            self._handshake(1, code, numel, 0, 0.0, op_flags)
            if out is not tensor:
                out.copy_(tensor)
            self._delegate(out, op, nbytes)
            return out
        algo = self._algorithm(nbytes, algorithm)
        st = mailbox.all_reduce(tensor.data_ptr(), out.data_ptr(), numel, code, algo, op_flags)
        if st:
            self._raise(st)
        if op is ReduceOp.AVG:
            out.div_(self.world_size)
        return out

    def all_reduce_add_rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float = 1e-6,
        *,
        norm_style: NormStyle = NormStyle.STANDARD,
        out: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None,
        algorithm: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """all_reduce_add_rms_norm(x, residual, weight, eps=1e-6, *, norm_style=STANDARD,
        out=None, residual_out=None) -> (out, residual_out)

        ``residual_out = sum_r x_r + residual`` (``residual`` may be None: then
        ``residual_out = sum_r x_r``), ``out = residual_out * rsqrt(mean(residual_out², -1) +
        eps) * w`` with ``w = weight`` (STANDARD) or ``1 + weight`` (GEMMA). fp32 math
        without intermediate rounding, results stored in x's dtype. This is a collective
        operation. Outputs may alias ``x`` / ``residual`` (in place, as vLLM's
        fused_add_rms_norm); they are allocated when not given.
        """
        fast = self._fast_arn
        if fast is not None and algorithm is None and norm_style is NormStyle.STANDARD:
            # C++ checks and op (see all_reduce); -1: take the Python paths.
            st = fast(x, residual, weight, eps, out, residual_out)
            if st == 0:
                return out, residual_out
            if st > 0:
                self._raise(st)
        mailbox = self._mailbox
        code = _DTYPE_CODES.get(getattr(x, "dtype", None))
        if (
            mailbox is not None
            and code is not None
            and algorithm is None
            and out is not None
            and residual_out is not None
            and norm_style is NormStyle.STANDARD
            and x.is_cpu
            and x.is_contiguous()
            and x.nbytes <= self.max_bytes
            and _same_layout(out, x)
            and _same_layout(residual_out, x)
            and (residual is None or _same_layout(residual, x))
            and weight.dtype == x.dtype
            and weight.is_cpu
            and weight.is_contiguous()
            and x.dim() > 0
            and x.shape[-1] > 0
            and weight.shape == x.shape[-1:]
        ):
            # Fast path (the decode case: caller-owned outputs, standard norm).
            cols = weight.shape[0]
            st = mailbox.add_rms_norm(
                x.data_ptr(),
                residual.data_ptr() if residual is not None else 0,
                weight.data_ptr(),
                out.data_ptr(),
                residual_out.data_ptr(),
                x.numel() // cols if cols else 0,
                cols,
                code,
                eps,
                False,
                x.nbytes > self._two_shot_above,
            )
            if st:
                self._raise(st)
            return out, residual_out
        mailbox = self._live()
        self._algorithm(0, algorithm)  # reject a bad name before anything runs
        if mailbox is None:
            return self._add_rms_norm_device(
                x, residual, weight, eps, norm_style, out, residual_out, algorithm
            )
        code = self._check(x, "x")
        if x.dim() < 1 or x.shape[-1] == 0:
            raise ValueError(f"x must have a non-empty last dimension, got {tuple(x.shape)}")
        cols = x.shape[-1]
        rows = x.numel() // cols
        self._check_like(weight, x, "weight", (cols,))
        if residual is not None:
            self._check_like(residual, x, "residual", tuple(x.shape))
        out = self._output(out, x, "out")
        residual_out = self._output(residual_out, x, "residual_out")
        gemma = NormStyle(norm_style) is NormStyle.GEMMA
        nbytes = x.numel() * x.element_size()
        if nbytes > self.max_bytes:
            norm_flags = (_HDR_RESIDUAL if residual is not None else 0) | (_HDR_GEMMA if gemma else 0)
            self._handshake(2, code, x.numel(), cols, eps, norm_flags)
            # fp32 through the backend: the op promises no intermediate rounding.
            summed = x.to(torch.float32, copy=True)  # never the caller's x
            self._delegate(summed, ReduceOp.SUM, nbytes)
            from ccl.kernels.reference import add_rms_norm_reference

            o, r = add_rms_norm_reference(summed, residual, weight, eps, gemma=gemma)
            out.copy_(o)
            residual_out.copy_(r)
            return out, residual_out
        algo = self._algorithm(nbytes, algorithm)
        st = mailbox.add_rms_norm(
            x.data_ptr(),
            residual.data_ptr() if residual is not None else 0,
            weight.data_ptr(),
            out.data_ptr(),
            residual_out.data_ptr(),
            rows,
            cols,
            code,
            float(eps),
            gemma,
            algo,
        )
        if st:
            self._raise(st)
        return out, residual_out

    def qk_rms_norm(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        q_weight: torch.Tensor,
        k_weight: torch.Tensor,
        eps: float = 1e-6,
        *,
        q_out: torch.Tensor | None = None,
        k_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """qk_rms_norm(q, k, q_weight, k_weight, eps=1e-6, *, q_out=None, k_out=None)
        -> (q_out, k_out)

        RMSNorm of TP-sharded q and k over their **full** (all-rank) last dimension
        (MiniMax-M2): per token the local sums of squares ``[tokens, 2]`` fp32 are all-reduced
        in the op, then ``q_out = q * rsqrt(sum_r ss_q / (q.shape[-1] * world) + eps) *
        q_weight`` (k likewise), fp32 math stored in q's dtype. q and k are 2-D with unit
        stride in the last dimension (rows may be strided, as slices of a fused qkv are).
        This is a collective operation.
        """
        fast = self._fast_qk
        if fast is not None:
            # C++ checks and op (see all_reduce); -1: take the Python path.
            st = fast(q, k, q_weight, k_weight, eps, q_out, k_out)
            if st == 0:
                return q_out, k_out
            if st > 0:
                self._raise(st)
        mailbox = self._live()
        if mailbox is None:
            return self._qk_rms_norm_device(q, k, q_weight, k_weight, eps, q_out, k_out)
        code = _checks.check_qk(q, k, q_weight, k_weight, self._CPU, self._WHERE)
        q_out = self._row_output(q_out, q, "q_out")
        k_out = self._row_output(k_out, k, "k_out")
        rows = q.shape[0]
        if 8 * rows > self.max_bytes:
            raise ValueError(
                f"qk_rms_norm of {rows} tokens needs {8 * rows} mailbox bytes, over the "
                f"capacity {self.max_bytes} (raise max_bytes)"
            )
        st = mailbox.qk_rms_norm(
            q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0),
            q_weight.data_ptr(), k_weight.data_ptr(), q_out.data_ptr(), k_out.data_ptr(),
            q_out.stride(0), k_out.stride(0), rows, q.shape[1], k.shape[1], code, float(eps),
        )
        if st:
            self._raise(st)
        return q_out, k_out

    # ------------------------------------------------------------------ device path
    # Device ops are asynchronous (one kernel on the current stream); their errors surface in
    # synchronize(). Without device mailboxes (transport "fallback") every op goes through
    # the wrapped backend and the torch reference epilogues.
    def _device_algorithm(self, nbytes: int, forced: str | None) -> str:
        if forced is not None:
            return forced
        return "two_shot" if nbytes > self._two_shot_above else "one_shot"

    def _check_device(self, t: torch.Tensor, name: str) -> int:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        code = _DTYPE_CODES.get(t.dtype)
        if code is None:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device} but this communicator is on {self.device}")
        return code

    def _all_reduce_device(self, tensor, op, out, algorithm):
        if not isinstance(op, ReduceOp):
            op = ReduceOp(op)
        code = self._check_device(tensor, "tensor")
        dm = self._device_mailbox
        nbytes = tensor.numel() * tensor.element_size()
        if dm is None or nbytes > self.max_bytes or op in (ReduceOp.MAX, ReduceOp.MIN):
            if dm is not None:
                dm.handshake(1, code, tensor.numel())
            if out is None:
                out = tensor
            elif out is not tensor:
                out.copy_(tensor)
            self._delegate(out, op, nbytes)
            return out
        out = dm.all_reduce(tensor, out, algorithm=self._device_algorithm(nbytes, algorithm))
        if op is ReduceOp.AVG:
            out.div_(self.world_size)
        return out

    def _add_rms_norm_device(self, x, residual, weight, eps, norm_style, out, residual_out,
                             algorithm):
        code = self._check_device(x, "x")
        gemma = NormStyle(norm_style) is NormStyle.GEMMA
        dm = self._device_mailbox
        nbytes = x.numel() * x.element_size()
        if residual_out is None:
            residual_out = torch.empty_like(x)
        if dm is None or nbytes > self.max_bytes:
            if dm is not None:
                dm.handshake(2, code, x.numel(), x.shape[-1], eps)
            summed = x.to(torch.float32, copy=True)  # never the caller's x
            self._delegate(summed, ReduceOp.SUM, nbytes)
            from ccl.kernels.reference import add_rms_norm_reference

            o, r = add_rms_norm_reference(summed, residual, weight, eps, gemma=gemma)
            out = o if out is None else out.copy_(o)
            residual_out.copy_(r)
            return out, residual_out
        return dm.add_rms_norm(
            x, residual, weight, eps, gemma=gemma, out=out, residual_out=residual_out,
            algorithm=self._device_algorithm(nbytes, algorithm),
        )

    def _qk_rms_norm_device(self, q, k, q_weight, k_weight, eps, q_out, k_out):
        self._check_device(q, "q")
        dm = self._device_mailbox
        if dm is not None:
            return dm.qk_rms_norm(q, k, q_weight, k_weight, eps, q_out=q_out, k_out=k_out)
        ss = torch.stack([q.float().pow(2).sum(-1), k.float().pow(2).sum(-1)], dim=-1)
        self._delegate(ss, ReduceOp.SUM, ss.numel() * 4)
        iq = torch.rsqrt(ss[:, 0:1] / (q.shape[1] * self.world_size) + eps)
        ik = torch.rsqrt(ss[:, 1:2] / (k.shape[1] * self.world_size) + eps)
        qo = (q.float() * iq * q_weight.float()).to(q.dtype)
        ko = (k.float() * ik * k_weight.float()).to(k.dtype)
        q_out = qo if q_out is None else q_out.copy_(qo)
        k_out = ko if k_out is None else k_out.copy_(ko)
        return q_out, k_out

    # ------------------------------------------------------------------ internals
    def _live(self):
        if self._closed:
            raise CommunicatorClosed(
                self._broken or f"rank {getattr(self, 'rank', '?')}: the communicator is closed"
            )
        return self._mailbox

    def _algorithm(self, nbytes: int, forced: str | None) -> int:
        if forced is None:
            return tuning.TWO_SHOT if nbytes > self._two_shot_above else tuning.ONE_SHOT
        if forced == "one_shot":
            return tuning.ONE_SHOT
        if forced == "two_shot":
            return tuning.TWO_SHOT
        raise ValueError(f"algorithm must be 'one_shot' or 'two_shot', got {forced!r}")

    # Host tensors must be CPU tensors (the wording is shared with the device mailbox).
    _WHERE = "the host communicator takes CPU tensors"
    _CPU = torch.device("cpu")

    def _check(self, t: torch.Tensor, name: str) -> int:
        return _checks.check_tensor(t, name, self._CPU, self._WHERE)

    def _check_rows(self, t: torch.Tensor, name: str) -> int:
        return _checks.check_rows(t, name, self._CPU, self._WHERE)

    def _check_like(self, t, ref, name, shape) -> None:
        _checks.check_like(t, ref, name, shape, self._CPU, self._WHERE)

    def _output(self, t, ref, name):
        if t is None:
            return torch.empty_like(ref)
        self._check_like(t, ref, name, tuple(ref.shape))
        return t

    def _row_output(self, t, ref, name):
        if t is None:
            return torch.empty(ref.shape, dtype=ref.dtype)
        if self._check_rows(t, name) != _DTYPE_CODES[ref.dtype] or t.shape != ref.shape:
            raise ValueError(f"{name} must be {ref.dtype} of shape {tuple(ref.shape)}")
        return t

    def _handshake(self, op: int, code: int, numel: int, cols: int, eps: float,
                   op_flags: int = 0) -> None:
        st = self._live().handshake(op, code, numel, cols, float(eps), op_flags)
        if st:
            self._raise(st)

    def _delegate(self, tensor: torch.Tensor, op: ReduceOp, nbytes: int) -> None:
        if not self._fallback:
            raise ValueError(
                f"payload of {nbytes} bytes exceeds the mailbox capacity {self.max_bytes} and "
                "this communicator has no wrapped backend"
            )
        self._fallback.all_reduce(tensor, op)

    def _raise(self, status: int):
        err = self._mailbox.last_error()
        if status == _TIMEOUT:
            missing = [r for r in range(self.world_size) if err.missing_mask >> r & 1]
            msg = (
                f"rank {self.rank}: collective #{self._mailbox.seq} timed out after "
                f"{self.timeout:.1f}s waiting for rank(s) {missing}; the communicator is "
                "unusable now (close it and create a new one)"
            )
            self._broken = msg
            self.close()
            raise CollectiveTimeout(msg, missing, self.rank, self.timeout)
        if status == _MISMATCH:
            peer = err.mismatch_rank
            raise CollectiveMismatch(
                f"rank {peer} called {_describe(err.theirs)} but rank {self.rank} called "
                f"{_describe(err.mine)}; every rank must make the same call",
                self.rank,
                peer,
            )
        raise CclError(f"rank {self.rank}: mailbox op failed with status {status}: {err.message}")


def _host_fast_path(mailbox, max_bytes: int, two_shot_above: int):
    """The C++ fast paths (all_reduce, add_rms_norm, qk_rms_norm) of ccl._C_torch for this
    mailbox, or None: module not built, built for another torch, or CCL_NATIVE_FAST_PATH=0.
    The Python paths are complete without them (they only make the plain call cheaper)."""
    if os.environ.get("CCL_NATIVE_FAST_PATH", "1") == "0":
        return None
    try:
        from ccl import _C_torch
    except ImportError:
        return None
    if getattr(_C_torch, "TORCH_VERSION", None) != torch.__version__ or not hasattr(
        _C_torch, "host_fast_path"
    ):
        return None
    try:
        return _C_torch.host_fast_path(mailbox, max_bytes, two_shot_above)
    except Exception as e:  # noqa: BLE001 - an optional speed-up; the Python path remains
        logger.debug("ccl: no native fast path: %s", e)
        return None


def _open_device_region(kind: str, world: int, rank: int, nbytes: int, device: torch.device):
    """This rank's device region, allocated and cleared, not yet connected to peers."""
    if kind == "cuda":
        from ccl.transport import cuda

        avail = cuda.availability(device.index)
        if not avail:
            raise CclError(avail.reason)
        return cuda.CudaRegion(world, rank, nbytes, device.index)
    from ccl.transport import level_zero

    avail = level_zero.availability()
    if not avail:
        raise CclError(avail.reason)
    return level_zero.LevelZeroRegion.for_torch_device(world, rank, nbytes, device)


def _same_layout(t: torch.Tensor, ref: torch.Tensor) -> bool:
    return t.dtype == ref.dtype and t.is_cpu and t.is_contiguous() and t.shape == ref.shape


def _describe(h) -> str:
    op = h.op_dtype_flags >> 24
    dt = (h.op_dtype_flags >> 16) & 0xFF
    flags = h.op_dtype_flags & 0xFF
    eps = torch.tensor([h.eps_bits], dtype=torch.int64).to(torch.int32).view(torch.float32)
    parts = [f"{_OP_NAMES.get(op, op)}({_CODE_NAMES.get(dt, dt)}, numel={h.numel}"]
    if h.cols:
        parts.append(f", cols={h.cols}")
    if op in (2, 3):
        parts.append(f", eps={eps.item():g}")
    if op == 1 and flags & 0x0C:
        parts.append(f", op={_OP_FLAG_NAMES[flags & 0x0C]}")
    if flags & _HDR_RESIDUAL:
        parts.append(", residual")
    if flags & _HDR_GEMMA:
        parts.append(", gemma")
    if flags & _HDR_TWO_SHOT:
        parts.append(", two_shot")
    if flags & _HDR_BULK:
        parts.append(", bulk")
    if flags & _HDR_DELEGATED:
        parts.append(", via the wrapped backend")
    return "".join(parts) + ")"
