"""Level Zero transport (Intel GPUs: Arc Pro B60/B70, Data Center GPUs): one device-memory
region per rank, exported as a dma-buf fd and mapped by every peer's GPU.

Mechanism (DESIGN.md §5). ``libze_loader.so.1`` is dlopen'ed by ``ccl._C.level_zero`` (never
linked; every function resolved with dlsym from a table declared as data in
``csrc/level_zero/ze_dispatch.h``), so ``ccl._C`` imports and the host transport works on
machines without it. The owner allocates with ``zeMemAllocDevice`` chained with
``ze_external_memory_export_desc_t(DMA_BUF)`` and an **uncompressed** hint
(``ZE_MEMORY_COMPRESSION_HINTS_EXT_FLAG_UNCOMPRESSED``: peer-imported USM on Battlemage can
otherwise read back compressed bytes, compute-runtime #921), **zeroes it**, and only then gets
the fd from ``zeMemGetAllocProperties`` + ``ze_external_memory_export_fd_t``. That fd belongs to
the driver (compute-runtime caches it in the allocation), so the region sends a ``dup`` of it.
The fd crosses processes like the host transport's memfd (SCM_RIGHTS, ``ccl.rendezvous``),
which works for both the legacy and the opaque IPC-handle formats and needs no ptrace rights;
the importer maps it with ``zeMemAllocDevice`` + ``ze_external_memory_import_fd_t`` and closes
its copy. Driver-reported P2P is not trusted: :meth:`LevelZeroRegion.verify_peers` writes
through every mapping with the GPU and reads the result back on the owner (collective, agreed:
every rank raises the same :class:`~ccl.errors.TransportError`, so every rank falls back).

Context. The mailbox must belong to the Level Zero context of the framework's queue, or its
kernels may not use the pointers. The native handles are passed in as integers
(``LevelZeroRegion(..., context=ze_context, device=ze_device)``). To get PyTorch's, we chose
**a small optional SYCL shim** (``ccl/transport/sycl_interop.py``): torch 2.13 exposes only the
``sycl::queue*`` of a stream (``torch.xpu.Stream.sycl_queue``, ``torch._C._xpu_getCurrentRawStream``),
never a Level Zero handle, and turning a SYCL queue into ``ze_context_handle_t`` /
``ze_device_handle_t`` takes ``sycl::get_native<sycl::backend::ext_oneapi_level_zero>``,
a template over libsycl's C++ ABI. The shim is ~40 lines of C++ compiled on first use (cached)
against the SYCL headers and ``libsycl.so`` that the ``intel-sycl-rt`` wheel installs (a
dependency of PyTorch's XPU wheels; oneAPI works too), never part of ``ccl._C``, so wheels built
without SYCL still get it on an XPU machine. :meth:`LevelZeroRegion.for_torch_device` uses it.
Without ``context``/``device`` the region creates its own context (the standalone probe).

Limits on Arc over PCIe: no peer atomics (``ZE_DEVICE_P2P_PROPERTY_FLAG_ATOMICS`` is never set
across cards; the protocol uses none), peer writes ~3.5x faster than peer reads (push only),
kernels must poll with L1-uncached loads and publish with L1-uncached stores after a
system-scope fence (see docs/ARC.md).

Typical use (collective)::

    region = LevelZeroRegion.for_torch_device(world_size, rank, nbytes, device=None)
    try:
        region.connect(exchange)          # exchange_fds + import_peer + verify_peers
    except TransportError:
        region.close()
        ...  # fall back to the host mailbox or the wrapped backend
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import time
import traceback
from collections.abc import Sequence
from typing import Any

from ccl import _C
from ccl.errors import ConfigError, TransportError
from ccl.transport.base import Availability

logger = logging.getLogger(__name__)

__all__ = [
    "Availability",
    "LevelZeroRegion",
    "availability",
    "decode_p2p_flags",
    "devices",
    "environment",
    "p2p_matrix",
    "probe_local",
    "probe_pairs",
]

_ze = _C.level_zero
ZeError = _ze.ZeError
ZeTimeout = _ze.ZeTimeout

P2P_ACCESS = _ze.FLAGS["ZE_DEVICE_P2P_PROPERTY_FLAG_ACCESS"]
P2P_ATOMICS = _ze.FLAGS["ZE_DEVICE_P2P_PROPERTY_FLAG_ATOMICS"]
DMA_BUF = _ze.FLAGS["ZE_EXTERNAL_MEMORY_TYPE_FLAG_DMA_BUF"]

_VERIFY_SPAN_MAX = 4 << 20  # bytes each writer fills and each owner reads back per pair
_DEFAULT_OP_TIMEOUT_S = 30.0  # bound of every single fill / copy (zeEventHostSynchronize)


# --------------------------------------------------------------------------- pure helpers
def _loader() -> str:
    return os.environ.get("CCL_ZE_LOADER") or _ze.DEFAULT_LOADER


def decode_p2p_flags(flags: int | None) -> dict[str, Any]:
    """decode_p2p_flags(flags) -> {"access": bool, "atomics": bool, "other": int}

    Decodes ``ze_device_p2p_properties_t.flags``; ``None`` (the query failed) decodes to
    no access. ``other`` keeps bits this version does not know.
    """
    if flags is None:
        return {"access": False, "atomics": False, "other": 0}
    return {
        "access": bool(flags & P2P_ACCESS),
        "atomics": bool(flags & P2P_ATOMICS),
        "other": int(flags) & ~(P2P_ACCESS | P2P_ATOMICS),
    }


def _round_up(n: int, granularity: int) -> int:
    return -(-n // granularity) * granularity


def _pattern(writer: int, target: int, nonce: int) -> int:
    """The u32 rank ``writer`` fills into its slot of rank ``target``'s region: unique per
    (writer, target, run), never 0 (the region starts zeroed)."""
    return 0x80000000 | ((nonce & 0x7FFF) << 16) | ((writer & 0xFF) << 8) | (target & 0xFF)


def _check_words(data: bytes, pattern: int) -> str | None:
    """None when every u32 of ``data`` equals ``pattern``, else what differs."""
    import numpy as np

    words = np.frombuffer(data, dtype="<u4")
    bad = np.flatnonzero(words != pattern)
    if bad.size == 0:
        return None
    first = int(bad[0])
    got = int(words[first])
    what = "zeros (nothing arrived)" if not words[bad].any() else f"{got:#010x}"
    return (
        f"{bad.size} of {words.size} words wrong, first at byte {4 * first}: read {what}, "
        f"expected {pattern:#010x}"
    )


def _stats(samples: Sequence[float]) -> dict[str, float]:
    s = sorted(samples)
    n = len(s)
    return {
        "n": n,
        "min_us": s[0],
        "p50_us": s[n // 2],
        "p99_us": s[min(n - 1, int(n * 0.99))],
        "mean_us": sum(s) / n,
    }


def _ptrace_scope() -> int | None:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def environment() -> dict[str, Any]:
    """environment() -> dict: the settings that decide what this transport sees. Local."""
    keys = (
        "ZE_AFFINITY_MASK",
        "ZE_FLAT_DEVICE_HIERARCHY",
        "ZE_ENABLE_PCI_ID_DEVICE_ORDER",
        "ONEAPI_DEVICE_SELECTOR",
        "CCL_FD_EXCHANGE",
        "CCL_ZE_LOADER",
    )
    env: dict[str, Any] = {k: os.environ.get(k) for k in keys}
    env["yama_ptrace_scope"] = _ptrace_scope()
    env["loader"] = _ze.source() or None
    env["header_checked_api"] = _ze.header_check() or None
    return env


# --------------------------------------------------------------------------- probing
def availability() -> Availability:
    """availability() -> Availability

    Whether the Level Zero transport can run here, and why not: "no driver:
    libze_loader.so.1 not found (...)", zeInit failing (no GPU driver installed or
    /dev/dri not accessible), or no GPU device. Cached per process. Local; never raises.
    """
    reason = _ze.init(_loader())
    if reason:
        return Availability(False, reason)
    n = _ze.num_devices()
    info = _ze.device_info(0)
    return Availability(
        True,
        f"Level Zero {info['api_version']} via {_ze.source()}: {n} GPU device(s), "
        f"first {info['name']}",
    )


def devices() -> list[dict[str, Any]]:
    """devices() -> list[dict]

    One dict per Level Zero GPU device, in driver order: index, name, uuid (hex), pci
    ({address "dddd:bb:dd.f", gen, width, max_bandwidth} or None), vendor_id, device_id,
    driver_version, api_version, dma_buf_export / dma_buf_import, queue_groups, handle.
    Empty when the transport is unavailable. Local.
    """
    if not availability():
        return []
    out = []
    for i in range(_ze.num_devices()):
        d = _ze.device_info(i)
        d["dma_buf_export"] = bool((d["external_memory_export"] or 0) & DMA_BUF)
        d["dma_buf_import"] = bool((d["external_memory_import"] or 0) & DMA_BUF)
        out.append(d)
    return out


def p2p_matrix() -> list[list[dict[str, Any]]]:
    """p2p_matrix() -> list[list[dict]]

    ``m[i][j]`` for devices i, j: ``{"access", "atomics"}`` from ``zeDeviceGetP2PProperties``,
    ``"can_access_peer"`` from ``zeDeviceCanAccessPeer`` (None when the query failed; on
    compute-runtime it is itself a dma-buf export/import trial), and the raw ``"flags"``.
    The driver's word only: :meth:`LevelZeroRegion.verify_peers` and :func:`probe_pairs` check
    it with real transfers. Empty when unavailable. Local.
    """
    if not availability():
        return []
    n = _ze.num_devices()
    out = []
    for i in range(n):
        row = []
        for j in range(n):
            q = _ze.p2p(i, j)
            row.append({
                **decode_p2p_flags(q["flags"]),
                "can_access_peer": q["can_access_peer"],
                "flags": q["flags"],
                "error": q["flags_error"] or q["can_access_peer_error"] or None,
            })
        out.append(row)
    return out


# --------------------------------------------------------------------------- the region
class LevelZeroRegion:
    """LevelZeroRegion(world_size, rank, nbytes, context=None, device=None, *, device_index=None,
    timeout_s=30.0)

    This rank's mailbox region in GPU memory plus the mappings of its peers' regions.
    ``context`` / ``device`` are native ``ze_context_handle_t`` / ``ze_device_handle_t`` as
    integers (PyTorch's: see :meth:`for_torch_device`); without them the region creates its
    own context on Level Zero device ``device_index`` (default 0). ``ptr`` is the region's
    device address, ``nbytes`` its size (rounded up to 64 KiB), ``fd`` the dma-buf fd to send
    (owned by the region), ``bases[r]`` rank r's region as mapped here (0 until imported).

    Construction is local; raises TransportError with the reason when the transport is
    unavailable or allocation fails (nothing is left half-built). ``timeout_s`` bounds every
    fill/copy the region issues.
    """

    def __init__(
        self,
        world_size: int,
        rank: int,
        nbytes: int,
        context: int | None = None,
        device: int | None = None,
        *,
        device_index: int | None = None,
        timeout_s: float = _DEFAULT_OP_TIMEOUT_S,
    ):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        if (context is None) != (device is None):
            raise ValueError("pass both context and device handles, or neither")
        if context is not None and device_index is not None:
            raise ValueError("device_index is for the standalone mode (no context/device)")
        self.world_size = world_size
        self.rank = rank
        self.nbytes = _round_up(nbytes, _ze.ALLOC_GRANULARITY)
        self.fd = -1
        self.ptr = 0
        self.bases: list[int] = [0] * world_size
        self.uncompressed_hint = False
        self.verified = False
        self.device_index = -1  # our enumeration's index of the device (-1: not one of ours)
        self._ctx = 0
        self._dev = 0
        self._own_ctx = False
        self._stream = None
        self._closed = False

        available = availability()
        if not available:
            raise TransportError(f"rank {rank}: Level Zero transport unavailable: {available.reason}")
        try:
            if context is None:
                idx = 0 if device_index is None else device_index
                self._dev = _ze.device_handle(idx)
                self._ctx = _ze.context_create(idx)
                self._own_ctx = True
            else:
                self._ctx, self._dev = int(context), int(device)
            self.device_index = _ze.device_index(self._dev)
            self._stream = _ze.Stream(self._ctx, self._dev, False, timeout_s)
            alloc = _ze.alloc_exportable(self._ctx, self._dev, self.nbytes, True, True)
            self.ptr = alloc["ptr"]
            self.uncompressed_hint = alloc["uncompressed_hint"]
            self.bases[rank] = self.ptr
            # Zeroed before the fd leaves this process: no peer ever sees stale bytes.
            self._stream.fill_u32(self.ptr, 0, self.nbytes)
            self.fd = os.dup(alloc["fd"])  # the driver keeps (and closes) its own copy
        except (ZeError, OSError, IndexError) as e:
            self.close()
            raise TransportError(
                f"rank {rank}: cannot create a Level Zero region of {self.nbytes} bytes: {e}"
            ) from e
        if not self.uncompressed_hint:
            logger.warning(
                "rank %d: the driver refused ZE_MEMORY_COMPRESSION_HINTS_EXT_FLAG_UNCOMPRESSED; "
                "the region may be compressed (verify_peers will tell whether peers read it)",
                rank,
            )

    @classmethod
    def for_torch_device(
        cls, world_size: int, rank: int, nbytes: int, device=None, **kwargs
    ) -> LevelZeroRegion:
        """for_torch_device(world_size, rank, nbytes, device=None, **kwargs) -> LevelZeroRegion

        A region in the Level Zero context of PyTorch's current XPU stream on ``device``
        (default: the current XPU device), through the SYCL interop shim. Local.
        """
        from ccl.transport import sycl_interop

        handles = sycl_interop.torch_xpu_handles(device)
        return cls(world_size, rank, nbytes, handles.context, handles.device, **kwargs)

    # ------------------------------------------------------------------ peers
    def import_peer(self, peer: int, fd: int) -> None:
        """import_peer(peer, fd)

        Maps rank ``peer``'s region from its dma-buf fd (closed here, whatever happens).
        Local. Raises ConfigError when the peer's region is smaller than ours (ranks created
        with different sizes) and TransportError when the driver cannot import it.
        """
        try:
            self._alive()
            if not 0 <= peer < self.world_size or peer == self.rank:
                raise ValueError(f"peer must be another rank in [0, {self.world_size}), got {peer}")
            if self.bases[peer]:
                raise ValueError(f"rank {self.rank}: rank {peer}'s region is already mapped")
            try:
                size = os.lseek(fd, 0, os.SEEK_END)  # dma-bufs and memfds report their size
            except OSError:
                size = None
            if size is not None and size < self.nbytes:
                raise ConfigError(
                    f"rank {peer}'s region is {size} bytes but rank {self.rank} expects "
                    f"{self.nbytes}: ranks were created with different sizes (set the same "
                    "max_bytes / CCL_MAX_BYTES everywhere)"
                )
            try:
                self.bases[peer] = _ze.import_dmabuf(self._ctx, self._dev, fd, self.nbytes)
            except ZeError as e:
                raise TransportError(
                    f"rank {self.rank} (Level Zero device {self.device_index}) cannot import "
                    f"rank {peer}'s region of {self.nbytes} bytes: {e}"
                ) from e
        finally:
            os.close(fd)

    def connect(self, exchange, *, method: str | None = None, timeout_s: float = 60.0,
                verify: bool = True) -> None:
        """connect(exchange, *, method=None, timeout_s=60.0, verify=True)

        This is a collective operation: sends ``fd`` to every peer (``method``:
        "socket" (SCM_RIGHTS) or "pidfd"; default ``CCL_FD_EXCHANGE`` or "socket"), imports
        every peer's region and, with ``verify``, runs :meth:`verify_peers`. A failure on any
        rank raises the same TransportError on every rank.
        """
        errors = self._import_all(exchange, method, timeout_s)
        if errors:
            raise TransportError(_describe_failures(errors))
        if verify:
            self.verify_peers(exchange)

    def _import_all(self, exchange, fd_exchange, timeout_s) -> dict[str, str]:
        """Collective fd exchange + imports; returns {"src->dst": error} agreed by all ranks."""
        from ccl.rendezvous import exchange_fds

        method = fd_exchange or os.environ.get("CCL_FD_EXCHANGE", "socket")
        mine: dict[str, str] = {}
        try:
            fds = exchange_fds(exchange, self.fd, method=method, timeout_s=timeout_s)
        except (TransportError, OSError) as e:
            fds = {}
            for p in range(self.world_size):
                if p != self.rank:
                    mine[f"{self.rank}->{p}"] = f"fd exchange ({method}): {e}"
        for peer, fd in sorted(fds.items()):
            try:
                self.import_peer(peer, fd)
            except (TransportError, ConfigError, ValueError) as e:
                mine[f"{self.rank}->{peer}"] = f"map: {e}"
        agreed: dict[str, str] = {}
        for part in exchange.all_gather(mine):
            agreed.update(part)
        return agreed

    def verify_peers(self, exchange) -> None:
        """verify_peers(exchange)

        This is a collective operation: every rank fills its slot of every peer's region
        through its mapping with the GPU (``zeCommandListAppendMemoryFill``) and reads its own
        region back; every rank also reads each peer's self-filled slot through its mapping.
        Driver-reported P2P can lie; this cannot. Raises the same TransportError on every
        rank when any pair failed. Leaves the region zeroed.
        """
        report = self._check_pairs(exchange)
        failed = {k: v["error"] for k, v in report.items() if not v["ok"]}
        if failed:
            raise TransportError(_describe_failures(failed))
        self.verified = True

    def _chunk(self) -> int:
        return (self.nbytes // self.world_size) // 4 * 4

    def _check_pairs(self, exchange) -> dict[str, dict[str, Any]]:
        """Collective write/read-back over every mapped pair; never raises for a pair's failure.

        Returns {"src->dst": {"ok", "fill", "verify", "read", "error"}}, identical on all ranks:
        fill = src's GPU fill into dst's region through src's mapping, verify = dst reads
        back the bytes, read = src reads dst's self-filled slot through its mapping.
        """
        self._alive()
        rank, world = self.rank, self.world_size
        chunk = self._chunk()
        span = min(chunk, _VERIFY_SPAN_MAX)
        if span < 4:
            raise ValueError(f"region of {self.nbytes} bytes is too small for {world} ranks")
        nonce = exchange.all_gather(secrets.randbelow(0x7FFF) + 1)[0]
        mapped = exchange.all_gather([p for p in range(world) if self.bases[p]])
        peers = [p for p in range(world) if p != rank]

        def attempt(fn):
            try:
                return fn()
            except (ZeError, ValueError) as e:
                return f"{type(e).__name__}: {e}"

        own = attempt(lambda: self._stream.fill_u32(self.ptr + rank * chunk, _pattern(rank, rank, nonce), span))
        exchange.all_gather(None)  # every owner filled its own slot
        fill: dict[int, str | None] = {}
        read: dict[int, str | None] = {}
        for p in peers:
            if not self.bases[p]:
                continue
            read[p] = attempt(
                lambda p=p: _check_words(self._stream.read(self.bases[p] + p * chunk, span),
                                         _pattern(p, p, nonce))
            )
            fill[p] = attempt(
                lambda p=p: self._stream.fill_u32(self.bases[p] + rank * chunk,
                                                  _pattern(rank, p, nonce), span)
            )
        exchange.all_gather(None)  # every writer is done
        received: dict[int, str | None] = {}
        for q in peers:
            if rank in mapped[q]:
                received[q] = attempt(
                    lambda q=q: _check_words(self._stream.read(self.ptr + q * chunk, span),
                                             _pattern(q, rank, nonce))
                )
        rows = exchange.all_gather({"own": own, "fill": fill, "read": read, "received": received})
        cleared = attempt(lambda: self._stream.fill_u32(self.ptr, 0, self.nbytes))
        exchange.all_gather(None)  # nobody writes into a region after its owner cleared it
        if cleared:
            logger.warning("rank %d: clearing the region after verification failed: %s", rank, cleared)
        report: dict[str, dict[str, Any]] = {}
        for s in range(world):
            for d in range(world):
                if s == d:
                    continue
                if d not in mapped[s]:
                    report[f"{s}->{d}"] = {"ok": False, "mapped": False, "fill": None,
                                           "verify": None, "read": None,
                                           "error": f"rank {s} has no mapping of rank {d}'s region"}
                    continue
                f_err = rows[s]["fill"].get(d)
                v_err = rows[d]["received"].get(s)
                r_err = rows[s]["read"].get(d) or rows[d]["own"]
                error = None
                if f_err:
                    error = f"rank {s}'s GPU fill into rank {d}'s region failed: {f_err}"
                elif v_err:
                    error = f"rank {s} -> rank {d}: the write did not arrive intact ({v_err})"
                report[f"{s}->{d}"] = {
                    "ok": error is None, "mapped": True, "fill": f_err, "verify": v_err,
                    "read": r_err, "error": error,
                }
        return report

    # ------------------------------------------------------------------ timing
    def push_latency(self, peer: int, nbytes: int, *, iters: int = 200, warmup: int = 20) -> dict[str, float]:
        """push_latency(peer, nbytes, *, iters=200, warmup=20) -> {"min_us", "p50_us", ...}

        Wall time of one ``zeCommandListAppendMemoryCopy`` of ``nbytes`` from this rank's
        region into its slot of ``peer``'s region (``peer == rank``: a local copy, the
        baseline), each appended to an immediate command list and waited for on the host: an
        upper bound on a one-way push that includes submission and completion signalling (no
        kernel compiler here; an in-kernel store is what the collectives will use). Local, but
        writes into ``peer``'s region: run it only while no collective uses the region.
        """
        self._alive()
        chunk = self._chunk()
        if peer == self.rank:
            if 2 * nbytes > chunk:
                raise ValueError(f"{nbytes} bytes do not fit twice in a {chunk}-byte slot")
            src = self.ptr + self.rank * chunk
            dst = src + chunk // 2
        else:
            if not self.bases[peer]:
                raise TransportError(f"rank {self.rank}: rank {peer}'s region is not mapped")
            if nbytes > chunk:
                raise ValueError(f"{nbytes} bytes exceed the {chunk}-byte slot")
            src = self.ptr + self.rank * chunk
            dst = self.bases[peer] + self.rank * chunk
        samples = self._stream.time_copies(dst, src, nbytes, iters, warmup)
        return dict(_stats(samples), bytes=nbytes)

    # ------------------------------------------------------------------ teardown
    def _alive(self) -> None:
        if self._closed or not self.ptr:
            raise TransportError(f"rank {self.rank}: the Level Zero region is closed")

    def close(self) -> None:
        """Frees every mapping and the region, closes ``fd``. Idempotent. Local."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for i, addr in enumerate(self.bases):
            if addr and i != self.rank:
                try:
                    _ze.mem_free(self._ctx, addr)
                except ZeError as e:
                    errors.append(f"freeing rank {i}'s mapping: {e}")
            self.bases[i] = 0
        if self.ptr:
            try:
                _ze.mem_free(self._ctx, self.ptr)
            except ZeError as e:
                errors.append(f"freeing the region: {e}")
            self.ptr = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._own_ctx and self._ctx:
            try:
                _ze.context_destroy(self._ctx)
            except ZeError as e:
                errors.append(f"destroying the context: {e}")
            self._ctx = 0
        if errors:
            logger.warning("rank %d: closing the Level Zero region: %s", self.rank, "; ".join(errors))

    def __enter__(self) -> LevelZeroRegion:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _describe_failures(errors: dict[str, str]) -> str:
    pairs = ", ".join(sorted(errors))
    first = errors[sorted(errors)[0]]
    return (
        f"Level Zero peer access is not usable for rank pair(s) {pairs}: {first}. The platform "
        "may not allow P2P between these GPUs (IOMMU, root-complex limits, a kernel without "
        "dma-buf P2P); the Communicator falls back to the host-memory mailbox or the wrapped "
        "backend"
    )


# --------------------------------------------------------------------------- probe
def _pick_device(rank: int, device_indices: Sequence[int] | None, n: int) -> int:
    if device_indices is not None:
        return int(device_indices[rank])
    local = os.environ.get("LOCAL_RANK") or os.environ.get("MPI_LOCALRANKID") or \
        os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK")
    return (int(local) if local is not None else rank) % n


def probe_pairs(
    ranks,
    *,
    device_indices: Sequence[int] | None = None,
    nbytes: int = 4 << 20,
    sizes: Sequence[int] = (8, 10240, 65536),
    iters: int = 200,
    warmup: int = 20,
    fd_exchange: str | None = None,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """probe_pairs(ranks, *, device_indices=None, nbytes=4 MiB, sizes=(8, 10240, 65536),
    iters=200, warmup=20, fd_exchange=None, timeout_s=60.0) -> dict

    This is a collective operation over ``ranks`` (an exchange: ``rank``, ``world_size``,
    ``all_gather(obj)``; ccl-probe passes its worker). Each rank takes Level Zero device
    ``device_indices[rank]`` (default: LOCAL_RANK, else rank, modulo the device count), creates
    a standalone region, exchanges fds, maps every peer, checks every ordered pair with a GPU
    fill through the mapping and a read-back on the owner, then times one-way pushes (one pair
    at a time, the others wait). Returns the same dict on every rank::

        {"status": "ok" | "unavailable" | "error", "error": str | None,
         "available": bool, "reason": str, "environment": {...},
         "devices": [{"rank", "index", "name", "bus_id", "uuid", "uncompressed_hint"}],
         "p2p": [[bool]],                      # driver-reported ACCESS, [src rank][dst rank]
         "p2p_detail": [[{"access", "atomics", "can_access_peer", "flags", "error"}]],
         "pairs": [{"src", "dst", "src_device", "dst_device",
                    "mapped", "verified", "error",  # map + GPU fill + owner read-back
                    "fill", "verify", "read",       # per step: None or what failed
                    "push_us_p50", "push_us_p99",   # 8-byte push (the first size)
                    "push_us": {"8": {"n", "min_us", "p50_us", "p99_us", "mean_us", "bytes"}, ...}}],
         "local_copy_us": [{"8": {...}, ...}],      # per rank: device-local copy baseline
         "all_verified": bool}

    Never raises for a pair's failure (it is reported); raises only when ``ranks`` itself
    fails. Without the transport every rank returns ``status="unavailable"`` with the reason.
    """
    rank, world = ranks.rank, ranks.world_size
    av = availability()
    report: dict[str, Any] = {
        "status": "ok", "error": None, "available": bool(av), "reason": av.reason,
        "environment": environment(), "devices": [], "p2p": [], "p2p_detail": [], "pairs": [],
        "local_copy_us": [], "all_verified": False,
    }
    everyone_ok = ranks.all_gather(bool(av))
    if not all(everyone_ok):
        missing = [r for r, ok in enumerate(everyone_ok) if not ok]
        report.update(status="unavailable",
                      error=f"Level Zero unavailable on rank(s) {missing}" + ("" if av else f": {av.reason}"))
        return report
    n = _ze.num_devices()
    dev = _pick_device(rank, device_indices, n)
    info = _ze.device_info(dev)
    me = {"rank": rank, "index": dev, "name": info["name"], "uuid": info["uuid"],
          "bus_id": (info["pci"] or {}).get("address")}
    devs = ranks.all_gather(me)
    # P2P rows: my device against every rank's device (found by uuid among my devices).
    by_uuid = {_ze.device_info(i)["uuid"]: i for i in range(n)}
    row = []
    for d in devs:
        j = by_uuid.get(d["uuid"])
        if j is None:
            row.append({"access": False, "atomics": False, "can_access_peer": None, "flags": None,
                        "error": f"device {d['uuid']} is not visible to rank {rank} (ZE_AFFINITY_MASK?)"})
        else:
            q = _ze.p2p(dev, j)
            row.append({**decode_p2p_flags(q["flags"]), "can_access_peer": q["can_access_peer"],
                        "flags": q["flags"], "error": q["flags_error"] or q["can_access_peer_error"] or None})
    detail = ranks.all_gather(row)
    report["p2p_detail"] = detail
    report["p2p"] = [[bool(c["access"]) for c in r] for r in detail]

    region = None
    try:
        region = LevelZeroRegion(world, rank, nbytes, device_index=dev, timeout_s=min(timeout_s, 30.0))
        created = None
    except TransportError as e:
        created = str(e)
    created_all = ranks.all_gather(created)
    if any(created_all):
        bad = {r: c for r, c in enumerate(created_all) if c}
        report.update(status="error", error=f"region creation failed on rank(s) {sorted(bad)}: "
                      f"{next(iter(bad.values()))}")
        if region is not None:
            region.close()
        return report
    try:
        me["uncompressed_hint"] = region.uncompressed_hint
        devs = ranks.all_gather(me)
        map_errors = region._import_all(ranks, fd_exchange, timeout_s)
        checks = region._check_pairs(ranks)
        pushes: dict[str, dict[str, Any]] = {}
        for s in range(world):
            for d in range(world):
                if s == d:
                    continue
                ranks.all_gather(None)  # one ordered pair at a time
                if rank == s and checks[f"{s}->{d}"]["ok"]:
                    pushes[f"{s}->{d}"] = _time_sizes(region, d, sizes, iters, warmup)
        local = _time_sizes(region, rank, [b for b in sizes if 2 * b <= region._chunk()], iters, warmup)
        gathered = ranks.all_gather({"pushes": pushes, "local": local})
    finally:
        region.close()
    report["devices"] = devs
    report["local_copy_us"] = [g["local"] for g in gathered]
    all_push = {}
    for g in gathered:
        all_push.update(g["pushes"])
    for s in range(world):
        for d in range(world):
            if s == d:
                continue
            key = f"{s}->{d}"
            c = checks[key]
            push = all_push.get(key, {})
            first = push.get(str(sizes[0])) if sizes else None
            report["pairs"].append({
                "src": s, "dst": d, "src_device": devs[s]["index"], "dst_device": devs[d]["index"],
                "mapped": c["mapped"] and key not in map_errors, "verified": c["ok"],
                "error": map_errors.get(key) or c["error"] or (push.get("error") if push else None),
                "fill": c["fill"], "verify": c["verify"], "read": c["read"],
                "push_us_p50": first.get("p50_us") if isinstance(first, dict) else None,
                "push_us_p99": first.get("p99_us") if isinstance(first, dict) else None,
                "push_us": push,
            })
    report["all_verified"] = all(p["verified"] for p in report["pairs"])
    return report


def _time_sizes(region: LevelZeroRegion, peer: int, sizes, iters, warmup) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for b in sizes:
        try:
            out[str(b)] = region.push_latency(peer, b, iters=iters, warmup=warmup)
        except (ZeError, ValueError, TransportError) as e:
            out["error"] = f"{b} bytes: {e}"
            break
    return out


# --------------------------------------------------------------------------- local spawning
class _HubExchange:
    """All-gather through the parent process (multiprocessing queues): for local runs."""

    def __init__(self, rank: int, world_size: int, to_hub, inbox, timeout_s: float):
        self.rank = rank
        self.world_size = world_size
        self._to_hub = to_hub
        self._inbox = inbox
        self._timeout_s = timeout_s
        self._round = 0

    def all_gather(self, obj: Any) -> list[Any]:
        self._round += 1
        self._to_hub.put(("ag", self.rank, self._round, obj))
        try:
            kind, rnd, objs = self._inbox.get(timeout=self._timeout_s)
        except queue.Empty:
            raise TransportError(
                f"rank {self.rank}: all-gather {self._round} timed out after {self._timeout_s:.0f}s"
            ) from None
        if kind != "ag" or rnd != self._round:
            raise TransportError(f"rank {self.rank}: the job was aborted ({objs})")
        return objs


def _rank_main(target, rank, world, to_hub, inbox, timeout_s, args) -> None:
    exchange = _HubExchange(rank, world, to_hub, inbox, timeout_s)
    try:
        result = target(rank, world, exchange, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent, which decides
        result = {"error": traceback.format_exc(limit=8)}
    to_hub.put(("result", rank, 0, result))


def _spawn_ranks(target, world: int, args: tuple = (), timeout_s: float = 120.0) -> list[Any]:
    """Runs ``target(rank, world, exchange, *args)`` in ``world`` fresh processes (spawn) with
    an all-gather hub in this process; returns their results in rank order. Bounded: a rank
    that dies or hangs aborts the others and its result is {"error": ...}."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    to_hub = ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(world)]
    procs = [
        ctx.Process(target=_rank_main, args=(target, r, world, to_hub, inboxes[r], timeout_s, args),
                    daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    rounds: dict[int, dict[int, Any]] = {}
    deadline = time.monotonic() + timeout_s
    aborted = False
    try:
        while len(results) < world:
            try:
                kind, rank, rnd, obj = to_hub.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results]
                late = time.monotonic() > deadline
                if (dead or late) and not aborted:
                    aborted = True
                    why = f"rank(s) {dead} died" if dead else f"timeout after {timeout_s:.0f}s"
                    for r in range(world):
                        inboxes[r].put(("abort", 0, why))
                    for r in dead:
                        results[r] = {"error": f"rank {r} exited with code {procs[r].exitcode}"}
                if late and time.monotonic() > deadline + 3:
                    for r in range(world):
                        results.setdefault(r, {"error": f"rank {r} did not finish in {timeout_s:.0f}s"})
                continue
            if kind == "result":
                results[rank] = obj
            elif kind == "ag" and not aborted:
                rounds.setdefault(rnd, {})[rank] = obj
                if len(rounds[rnd]) == world:
                    got = rounds.pop(rnd)
                    objs = [got[r] for r in range(world)]
                    for r in range(world):
                        inboxes[r].put(("ag", rnd, objs))
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == world and not aborted else 1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world)]


def _probe_rank(rank, world, exchange, kwargs, mock):
    if mock is not None:
        _ze.install_mock(**mock)
    return probe_pairs(exchange, **kwargs)


def probe_local(
    device_indices: Sequence[int] | None = None, *, timeout_s: float = 120.0, _mock: dict | None = None,
    **kwargs,
) -> dict[str, Any]:
    """probe_local(device_indices=None, *, timeout_s=120.0, **probe_pairs_kwargs) -> dict

    :func:`probe_pairs` without a launcher: spawns one process per entry of ``device_indices``
    (default: every Level Zero GPU) and returns rank 0's report. ``_mock`` (testing only)
    makes every rank use the in-process mock driver with that configuration. Local.
    """
    if _mock is not None:
        _ze.install_mock(**_mock)
    av = availability()
    if not av:
        return {"status": "unavailable", "available": False, "reason": av.reason, "error": av.reason,
                "environment": environment(), "devices": [], "p2p": [], "p2p_detail": [],
                "pairs": [], "local_copy_us": [], "all_verified": False}
    if device_indices is None:
        device_indices = list(range(_ze.num_devices()))
    world = len(device_indices)
    kwargs = dict(kwargs, device_indices=list(device_indices))
    results = _spawn_ranks(_probe_rank, world, (kwargs, _mock), timeout_s)
    errors = [(r, res["error"]) for r, res in enumerate(results)
              if isinstance(res, dict) and res.get("error") and res.get("status") is None]
    if errors:
        return {"status": "error", "error": "; ".join(f"rank {r}: {e}" for r, e in errors),
                "available": True, "reason": av.reason, "pairs": [], "all_verified": False,
                "ranks": results}
    return results[0]


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m ccl.transport.level_zero``: the standalone probe, its report as JSON."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(
        prog="python -m ccl.transport.level_zero",
        description="Level Zero devices, P2P matrix, per-pair map/fill/verify and one-way push "
                    "latency between local processes (one per device).",
    )
    p.add_argument("--devices", default=None, help="comma-separated device indices (default: all; "
                   "'0,0' runs two ranks on one GPU)")
    p.add_argument("--sizes", default="8,10240,65536", help="push sizes in bytes")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--json", default=None, help="also write the report to this file")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    # Under ``python -m`` this file runs as __main__; the spawned ranks must unpickle the
    # functions of the real module, so use that one.
    from ccl.transport import level_zero as lz

    indices = [int(x) for x in args.devices.split(",")] if args.devices else None
    sizes = tuple(int(x) for x in args.sizes.split(","))
    report = {"devices_all": lz.devices(), "p2p_matrix_all": lz.p2p_matrix(),
              **lz.probe_local(indices, timeout_s=args.timeout, iters=args.iters, sizes=sizes)}
    text = json.dumps(report, indent=1, default=str)
    sys.stdout.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if report.get("all_verified") else 1


if __name__ == "__main__":
    raise SystemExit(_main())
