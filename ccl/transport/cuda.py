"""CUDA transport: one device-memory region per rank, mapped by every peer's GPU.

Mechanism (DESIGN.md §5): driver-API virtual memory management, reached through a dlopen'ed
``libcuda.so.1`` (``csrc/cuda/``), so ``ccl._C`` imports and the host transport works on
machines without CUDA. The owner allocates with ``cuMemCreate`` (pinned device memory, POSIX
fd handle type, size rounded up to the allocation granularity), maps it, grants its own GPU
read/write access, **zeroes it**, and only then exports an fd with
``cuMemExportToShareableHandle`` — so a fast peer can never see stale flags. The fd crosses
processes exactly like the host transport's memfd (SCM_RIGHTS, ``ccl.rendezvous``); the
importer maps it with ``cuMemImportFromShareableHandle`` + ``cuMemMap`` and grants access to
its OWN GPU with ``cuMemSetAccess``. Every call runs in the device's primary context (the one
PyTorch uses), made current for the call and restored afterwards.

Why VMM and not ``cudaIpc*`` handles: the VMM fd reuses the fd exchange the host transport
already has (and its SO_PEERCRED checks), needs no CUDA runtime, maps at a granularity we
choose, and does not depend on the caching allocator's block boundaries. ``cudaIpc`` handles
would need a second, opaque-bytes exchange path and the runtime library.

Peer access is trusted only after a real write/read-back (``verify_peers``): the driver's
``cuDeviceCanAccessPeer`` can report P2P that silently corrupts (IOMMU, ACS, root-complex
limits). Each rank writes a 64-byte record — derived from (writer rank, target rank, random
token) — into its own slot of a scratch area at the end of every peer's region, through its
mapping of that region; after a barrier each rank checks every record in its own region and
reads each peer's self-written record back through its mapping (the remote-read path). The
writes are host-to-device copies issued in the writer's context through its mapping of the
peer, so the writer GPU's page tables and the NVLink/PCIe path are exercised; SM-issued stores
are exercised by :func:`probe_pairs` (in-kernel ping-pong) and bench/cuda_transport_smoke.py.

Fallback (issue "GPU path", item 6). When two GPUs cannot map each other, one of these fails:
``import_peer`` (``cuMemImportFromShareableHandle``/``cuMemMap``/``cuMemSetAccess`` return an
error) or ``verify_peers`` (a record did not arrive intact). ``verify_peers`` is collective
and agreed: every rank learns every rank's failures through the exchange and every rank
raises the same :class:`~ccl.errors.TransportError`, which names the ranks, devices and the
failing call. The Communicator catches it, closes the region and falls back to the
host-memory mailbox or the wrapped backend, logging the reason once. Nothing ever runs on a
mapping that failed verification: no silent corruption.

Probing: :func:`availability` (never raises), :func:`devices`, :func:`p2p_matrix` (driver's
word), :func:`probe_local_pairs` (verified, in one process) and :func:`probe_pairs` (the
collective ``ccl-probe`` report with per-pair latency).

Environment: ``CCL_CUDA_DRIVER=/path/libcuda.so.1`` loads another driver library (a CUDA
forward-compat driver; the tests point it at ``csrc/cuda/fake/fake_libcuda.c``). CUDA does not
survive ``fork()``: a child forked after the driver was initialised reports itself unavailable.

Typical use (collective; ``connect`` is ``exchange_fds`` + ``import_peer`` + ``verify_peers``
with failures agreed across ranks)::

    region = CudaRegion(world_size, rank, nbytes, torch.cuda.current_device())
    try:
        region.connect(exchange)
    except TransportError:
        region.close()
        ...  # fall back
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import struct
from collections.abc import Sequence
from typing import Any

from ccl import _C
from ccl.errors import TransportError
from ccl.transport.base import Availability

logger = logging.getLogger(__name__)

__all__ = [
    "Availability",
    "CudaRegion",
    "PairProbe",
    "availability",
    "devices",
    "p2p_matrix",
    "probe_local_pairs",
    "probe_pairs",
]

_cuda = _C.cuda

# Scratch area for the write/read-back check: one record per writer rank, placed after the
# caller's nbytes (the mailbox never touches it).
SCRATCH_RECORD_BYTES = 64
_SCRATCH_ALIGN = 256
_RECORD_HEADER = struct.Struct("<QIIQ")  # magic, writer, target, token
_RECORD_MAGIC = 0x6B636568635F6C63  # "cl_check"

_FALLBACK_HINT = (
    "CUDA peer-to-peer access is not usable between these GPUs (no NVLink/PCIe P2P, IOMMU or "
    "ACS settings, or GPUs hidden from each other by CUDA_VISIBLE_DEVICES); the Communicator "
    "falls back to the host-memory mailbox or the wrapped backend"
)


# --------------------------------------------------------------------------- pure helpers
def _round_up(n: int, granularity: int) -> int:
    if granularity <= 0:
        raise ValueError(f"granularity must be positive, got {granularity}")
    return -(-n // granularity) * granularity


def _layout(nbytes: int, world_size: int) -> tuple[int, int]:
    """(scratch_offset, required_bytes) of a region carrying ``nbytes`` for the caller.

    The allocation is ``required_bytes`` rounded up to the device granularity.
    """
    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    scratch = _round_up(nbytes, _SCRATCH_ALIGN)
    return scratch, scratch + world_size * SCRATCH_RECORD_BYTES


def _record(writer: int, target: int, token: int) -> bytes:
    """The 64-byte record rank ``writer`` puts into rank ``target``'s region: every byte
    depends on (writer, target, token), so a stale, misrouted or torn write cannot match."""
    head = _RECORD_HEADER.pack(_RECORD_MAGIC, writer, target, token)
    tail = hashlib.blake2b(head, digest_size=SCRATCH_RECORD_BYTES - len(head)).digest()
    return head + tail


def _describe_record(data: bytes) -> str:
    if len(data) < _RECORD_HEADER.size:
        return f"{len(data)} bytes"
    if not any(data):
        return "zeros (nothing arrived)"
    magic, writer, target, token = _RECORD_HEADER.unpack_from(data)
    if magic != _RECORD_MAGIC:
        return f"garbage {data[:16].hex()}..."
    intact = data == _record(writer, target, token)
    return (
        f"a record from rank {writer} for rank {target} token {token:#x}"
        f"{'' if intact else ' with a corrupted tail'}"
    )


def _check_records(
    data: bytes, rank: int, tokens: Sequence[int], writers: Sequence[int]
) -> list[str]:
    """Problems found in rank ``rank``'s scratch area (``data``), for the given writers."""
    problems = []
    for w in writers:
        got = data[w * SCRATCH_RECORD_BYTES : (w + 1) * SCRATCH_RECORD_BYTES]
        want = _record(w, rank, tokens[w])
        if got != want:
            problems.append(
                f"rank {w} -> rank {rank}: the write did not arrive intact (rank {rank} reads "
                f"{_describe_record(got)})"
            )
    return problems


def _version_str(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "unknown"


@contextlib.contextmanager
def _driver_errors(context: str):
    """Turns driver failures into TransportError("<context>: <call> failed: NAME (code): ...")."""
    try:
        yield
    except _cuda.CudaError as e:
        raise TransportError(f"{context}: {e}") from e
    except _cuda.DriverUnavailable as e:
        raise TransportError(f"{context}: CUDA transport unavailable: {e}") from e


# --------------------------------------------------------------------------- probing
def availability(device_index: int | None = None) -> Availability:
    """availability(device_index=None) -> Availability

    Whether the CUDA transport can run here (on ``device_index``, or on every visible device),
    and why not: no driver (``libcuda.so.1`` not found), no device, or a device without
    virtual memory management / POSIX-fd export. Local; never raises.
    """
    status = _cuda.driver_status()
    if not status["loaded"]:
        return Availability(False, status["reason"])
    try:
        count = _cuda.device_count()
        if count == 0:
            return Availability(
                False,
                "no CUDA device: the driver reports 0 devices (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})",
            )
        if device_index is not None and not 0 <= device_index < count:
            return Availability(
                False, f"no CUDA device {device_index}: {count} device(s) are visible"
            )
        indices = range(count) if device_index is None else [device_index]
        for i in indices:
            info = _cuda.device_info(i)
            if not info["vmm"]:
                return Availability(
                    False,
                    f"device {i} ({info['name']}) does not support virtual memory management "
                    "(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 0)",
                )
            if not info["posix_fd"]:
                return Availability(
                    False,
                    f"device {i} ({info['name']}) cannot export memory as a POSIX fd "
                    "(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 0)",
                )
    except _cuda.CudaError as e:
        return Availability(False, f"CUDA driver query failed: {e}")
    return Availability(
        True,
        f"CUDA driver {_version_str(status['driver_version'])}: VMM + POSIX fd export on "
        f"{len(indices)} device(s)",
    )


def devices() -> list[dict[str, Any]]:
    """devices() -> list[dict]

    One dict per visible device: index, name, pci_bus_id, compute_capability, vmm, posix_fd.
    Raises TransportError when the driver is absent. Local.
    """
    with _driver_errors("listing CUDA devices"):
        return [_cuda.device_info(i) for i in range(_cuda.device_count())]


def p2p_matrix() -> list[list[bool]]:
    """p2p_matrix() -> list[list[bool]]

    ``m[i][j]``: the driver reports that device i can access device j's memory
    (``cuDeviceCanAccessPeer``; the diagonal is True). The driver's word only: see
    :func:`probe_local_pairs` for the verified answer. Raises TransportError without a
    driver. Local.
    """
    with _driver_errors("querying CUDA peer access"):
        n = _cuda.device_count()
        return [[i == j or _cuda.can_access_peer(i, j) for j in range(n)] for i in range(n)]


@dataclasses.dataclass(frozen=True)
class PairProbe:
    """One ordered device pair: can ``src``'s GPU write and read ``dst``'s memory?"""

    src: int
    dst: int
    driver_p2p: bool  # cuDeviceCanAccessPeer(src, dst)
    verified: bool  # a write through src's mapping landed intact in dst's memory, and read back
    reason: str  # what failed, or how it was verified


def probe_local_pairs(device_indices: Sequence[int] | None = None) -> list[PairProbe]:
    """probe_local_pairs(device_indices=None) -> list[PairProbe]

    For every ordered pair of distinct devices (all visible devices by default): the driver's
    P2P answer and a verified one. In this process, ``dst`` memory is allocated as the
    transport allocates it, mapped a second time with access for ``src`` (the same handle in
    ``src``'s page tables), a record is written through that mapping in ``src``'s context and
    read back through ``dst``'s own mapping and through ``src``'s. The cross-process path
    (fd export/import) is checked by :meth:`CudaRegion.verify_peers`. Local; raises
    TransportError only when the driver is absent.
    """
    with _driver_errors("probing CUDA peer access"):
        indices = list(range(_cuda.device_count())) if device_indices is None else list(
            device_indices
        )
    results = []
    owners: dict[int, Any] = {}
    try:
        for dst in indices:
            try:
                owners[dst] = _cuda.Allocation.create(dst, SCRATCH_RECORD_BYTES)
            except (_cuda.CudaError, ValueError) as e:
                owners[dst] = e
        for src in indices:
            for dst in indices:
                if src != dst:
                    results.append(_probe_pair(src, dst, owners[dst]))
    finally:
        for owner in owners.values():
            if isinstance(owner, _cuda.Allocation):
                owner.close()
    return results


def _probe_pair(src: int, dst: int, owner: Any) -> PairProbe:
    try:
        driver_p2p = _cuda.can_access_peer(src, dst)
    except _cuda.CudaError as e:
        return PairProbe(src, dst, False, False, f"cuDeviceCanAccessPeer failed: {e}")
    if not isinstance(owner, _cuda.Allocation):
        return PairProbe(src, dst, driver_p2p, False, f"allocating on device {dst}: {owner}")
    token = int.from_bytes(os.urandom(8), "little")
    want = _record(src, dst, token)
    view = None
    try:
        view = _cuda.Allocation.alias(owner, src)
        view.write(0, want)
        got = owner.read(0, len(want))
        if got != want:
            return PairProbe(
                src, dst, driver_p2p, False,
                f"device {src} wrote through its mapping, device {dst} reads "
                f"{_describe_record(got)}",
            )
        back = view.read(0, len(want))
        if back != want:
            return PairProbe(
                src, dst, driver_p2p, False,
                f"device {dst} holds the record but device {src} reads back "
                f"{_describe_record(back)}",
            )
        owner.memset(0, len(want), 0)
    except (_cuda.CudaError, ValueError) as e:
        return PairProbe(src, dst, driver_p2p, False, str(e))
    finally:
        if view is not None:
            view.close()
    return PairProbe(src, dst, driver_p2p, True, "write + read-back through the peer mapping")


# --------------------------------------------------------------------------- ccl-probe
_PROBE_BYTES = 64 * 1024
_PING_LINE = 128  # ping / pong words on their own lines, after the records
_PING_REPS = 20  # timed kernels per pair (p50 / p99 over them)
_PING_ROUND_TRIPS = 50  # round trips inside one kernel


def _local_device(rank: int) -> int:
    """The GPU a probe rank uses: LOCAL_RANK (as launchers set it) or rank, modulo the count."""
    count = _cuda.device_count()
    local = int(os.environ.get("LOCAL_RANK", rank))
    return local % count


def probe_pairs(worker, *, round_trips: int = _PING_ROUND_TRIPS) -> dict[str, Any]:
    """probe_pairs(worker, *, round_trips=50) -> dict

    The ``ccl-probe`` report of the CUDA transport. This is a collective operation over
    ``worker`` (rank, world_size, all_gather(obj), barrier()): one process per GPU (device
    ``LOCAL_RANK`` or ``rank``, modulo the visible count). Every rank allocates a region,
    the fds cross over SCM_RIGHTS, every rank maps every peer; then for each ordered pair
    (src, dst): src writes a record into dst's region through its mapping, src reads it back
    through the mapping and dst in its own memory ("verified"); and, when torch has CUDA and
    Triton is installed, a ping-pong between the two GPUs inside one kernel per side (plain
    stores into the peer's word, volatile polling of one's own: no peer atomics), timed with
    CUDA events; ``push_us`` is half the round trip. Returns::

        {"devices": [{"rank", "index", "name", "bus_id"}],
         "p2p": [[bool]],       # driver-reported (cuDeviceCanAccessPeer), [src rank][dst rank]
         "pairs": [{"src", "dst", "mapped", "verified", "error",
                    "push_us_p50", "push_us_p99", "rtt_us_p50", "round_trips"}],
         "latency": "<how push_us was measured, or why not>"}
    """
    from ccl.rendezvous import exchange_fds  # noqa: PLC0415 - avoids an import cycle

    rank, world = worker.rank, worker.world_size
    with _driver_errors(f"rank {rank}: CUDA probe"):
        device = _local_device(rank)
        info = _cuda.device_info(device)
    devices = worker.all_gather(
        {"rank": rank, "index": device, "name": info["name"], "bus_id": info["pci_bus_id"]}
    )
    row = []
    for d in devices:
        try:
            row.append(d["index"] == device or _cuda.can_access_peer(device, d["index"]))
        except _cuda.CudaError:
            row.append(False)
    p2p = worker.all_gather(row)

    errors: dict[int, str] = {}
    region = None
    try:
        region = CudaRegion(world, rank, _PROBE_BYTES, device)
    except TransportError as e:
        errors.update({p: str(e) for p in range(world) if p != rank})
    fds: dict[int, int] = {}
    try:
        # Every rank takes part, with a dummy fd if it has no region (peers then fail on it).
        my_fd = region.fd if region is not None else os.open("/dev/null", os.O_RDONLY)
        try:
            fds = exchange_fds(worker, my_fd, timeout_s=60.0)
        finally:
            if region is None:
                os.close(my_fd)
    except Exception as e:  # noqa: BLE001 - reported per pair
        errors.update({p: f"fd exchange: {e}" for p in range(world) if p != rank})
    for peer, fd in sorted(fds.items()):
        if region is None:
            os.close(fd)
            continue
        try:
            region.import_peer(peer, fd)
        except TransportError as e:
            errors[peer] = region._peer_errors.get(peer, str(e))  # without the fallback hint
    try:
        report = _probe_with_region(worker, region, errors, round_trips)
    finally:
        if region is not None:
            region.close()
    report.update(devices=devices, p2p=p2p)
    return report


def _probe_with_region(worker, region, errors, round_trips) -> dict[str, Any]:
    rank, world = worker.rank, worker.world_size
    token = int.from_bytes(os.urandom(8), "little")
    mapped = [] if region is None else [p for p in range(world) if region.bases[p]]
    wrote: dict[int, str | None] = {}
    for dst in mapped:
        if dst == rank:
            continue
        try:
            region.write(dst, region.scratch_offset + rank * SCRATCH_RECORD_BYTES,
                         _record(rank, dst, token))
            wrote[dst] = None
        except TransportError as e:
            wrote[dst] = str(e)
    tokens_written = worker.all_gather((token, sorted(d for d, e in wrote.items() if e is None)))
    owned: dict[int, str | None] = {}
    for dst in [d for d, e in wrote.items() if e is None]:
        try:
            got = region.read(dst, region.scratch_offset + rank * SCRATCH_RECORD_BYTES,
                              SCRATCH_RECORD_BYTES)
            if got != _record(rank, dst, token):
                wrote[dst] = f"read back through the mapping: {_describe_record(got)}"
        except TransportError as e:
            wrote[dst] = str(e)
    if region is not None:
        try:
            data = region.read(rank, region.scratch_offset, world * SCRATCH_RECORD_BYTES)
        except TransportError as e:
            data = b""
            errors.update({p: str(e) for p in range(world) if p != rank})
        for src, (tok, targets) in enumerate(tokens_written):
            if src != rank and rank in targets and data:
                bad = _check_records(data, rank, [tok] * world, [src])
                owned[src] = bad[0] if bad else None

    latency, method = _ping_pairs(worker, region, round_trips, mapped)
    everyone = worker.all_gather(
        {"errors": errors, "wrote": wrote, "owned": owned,
         "latency": {f"{a}->{b}": v for (a, b), v in latency.items()}}
    )
    pairs = []
    for src in range(world):
        for dst in range(world):
            if src == dst:
                continue
            s, d = everyone[src], everyone[dst]
            error = s["errors"].get(dst) or d["errors"].get(src)
            mapped_ok = error is None and dst in s["wrote"]
            problems = [m for m in (s["wrote"].get(dst), d["owned"].get(src)) if m]
            verified = mapped_ok and not problems and src in d["owned"]
            lat = s["latency"].get(f"{src}->{dst}", {})
            pairs.append({
                "src": src, "dst": dst, "mapped": mapped_ok, "verified": verified,
                "error": error or (problems[0] if problems else None) or lat.get("error"),
                "push_us_p50": lat.get("push_us_p50"), "push_us_p99": lat.get("push_us_p99"),
                "rtt_us_p50": lat.get("rtt_us_p50"), "round_trips": lat.get("round_trips", 0),
            })
    return {"pairs": pairs, "latency": method,
            "all_verified": all(p["verified"] for p in pairs)}


def _tensor_at(addr: int, n: int, dtype, device: int):
    """A torch tensor on GPU ``device`` over ``n`` elements at device address ``addr`` (not
    owned: valid while the region is open)."""
    import torch  # noqa: PLC0415

    dev = torch.device("cuda", device)
    nbytes = n * torch.empty(0, dtype=dtype).element_size()
    storage = torch._C._construct_storage_from_data_pointer(addr, dev, nbytes)
    return torch.empty(0, dtype=dtype, device=dev).set_(storage, 0, (n,), (1,))


def _ping_kernels():
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    @triton.jit(do_not_specialize=["iters", "tag", "max_spin"])
    def ping(remote_ping, my_pong, status, iters, tag, max_spin):
        # Initiator: store v into the peer's word, spin (bounded) on our own until it echoes v.
        i = 0
        ok = 1
        while (i < iters) & (ok == 1):
            v = (tag + i + 1).to(tl.int64)
            tl.store(remote_ping, v)
            got = tl.load(my_pong, volatile=True)
            spins = 0
            while (got != v) & (spins < max_spin):
                got = tl.load(my_pong, volatile=True)
                spins += 1
            ok = (got == v).to(tl.int32)
            i += 1
        tl.store(status, i - 1 + ok)  # completed round trips

    @triton.jit(do_not_specialize=["iters", "tag", "max_spin"])
    def pong(my_ping, remote_pong, status, iters, tag, max_spin):
        # Responder: spin (bounded) on our own word until v arrives, store v into the peer's.
        i = 0
        ok = 1
        while (i < iters) & (ok == 1):
            v = (tag + i + 1).to(tl.int64)
            got = tl.load(my_ping, volatile=True)
            spins = 0
            while (got != v) & (spins < max_spin):
                got = tl.load(my_ping, volatile=True)
                spins += 1
            ok = (got == v).to(tl.int32)
            tl.store(remote_pong, v)
            i += 1
        tl.store(status, i - 1 + ok)

    return ping, pong


def _ping_pairs(worker, region, round_trips, mapped):
    """{(a, b): latency dict} for the pairs this rank initiated, and the method used.

    Collective: every rank runs the same barriers whatever it can do locally."""
    rank, world = worker.rank, worker.world_size
    reason = None
    try:
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            reason = f"torch {torch.__version__} has no CUDA"
        else:
            ping, pong = _ping_kernels()
    except ImportError as e:
        reason = f"needs torch with CUDA and Triton ({e})"
    can = worker.all_gather(reason is None and region is not None)
    method = (
        f"in-kernel ping-pong (Triton, plain store to the peer + volatile poll of our own word),"
        f" {_PING_REPS} kernels x {round_trips} round trips, CUDA events; push = rtt / 2"
    )
    if not all(can):
        return {}, f"no latency: {reason or 'some rank cannot run GPU kernels'}"
    device = region.device_index
    base = region.scratch_offset - _round_up(2 * world * _PING_LINE, 256)  # below the records
    if base < 0 or region.nbytes < 2 * world * _PING_LINE:
        return {}, "no latency: probe region too small"
    latency = {}
    max_spin = 1 << 22  # ~1-4 s of volatile loads: a missing peer cannot hang the probe
    with torch.cuda.device(device):
        status = torch.zeros(1, device=f"cuda:{device}", dtype=torch.int32)
        # Compile and load both kernels before any pair starts (zero round trips), so that
        # one side's JIT time cannot exhaust the other side's bounded spin.
        # Same specialisation as the real launches: 16-byte aligned words, i32 and i64 tags.
        scratch = torch.zeros(32, device=f"cuda:{device}", dtype=torch.int64)
        for kernel in (ping, pong):
            for tag in (1, 1 << 40):
                kernel[(1,)](scratch[0:], scratch[16:], status, 0, tag, max_spin, num_warps=1)
        torch.cuda.synchronize()

        def word(owner, kind, partner):  # kind 0 = ping (in b's region), 1 = pong (in a's)
            off = base + (kind * world + partner) * _PING_LINE
            return _tensor_at(region.bases[owner] + off, 1, torch.int64, device)

        for a in range(world):
            for b in range(world):
                if a == b:
                    continue
                # Everyone takes part in the handshake; only a and b run kernels.
                peer = b if rank == a else a
                ok = worker.all_gather(rank not in (a, b) or peer in mapped)
                if not (ok[a] and ok[b]) or rank not in (a, b):
                    continue
                tag = (a * world + b) << 24
                # The ping word lives in b's region (slot a), the pong word in a's (slot b):
                # each side polls its own memory and stores into the other's.
                args = (word(b, 0, a), word(a, 1, b), status)
                kernel = ping if rank == a else pong
                starts = [torch.cuda.Event(enable_timing=True) for _ in range(_PING_REPS + 1)]
                ends = [torch.cuda.Event(enable_timing=True) for _ in range(_PING_REPS + 1)]
                done = []
                for rep in range(_PING_REPS + 1):  # rep 0: warm-up (compile, rank skew)
                    t = tag + rep * round_trips
                    starts[rep].record()
                    kernel[(1,)](*args, round_trips, t, max_spin, num_warps=1)
                    ends[rep].record()
                    done.append(status.clone())
                torch.cuda.synchronize()
                if rank != a:
                    continue
                if any(int(x) != round_trips for x in done):
                    latency[(a, b)] = {"error": f"ping-pong incomplete: {[int(x) for x in done]}"
                                                f" of {round_trips} round trips per kernel"}
                    continue
                rtt = sorted(s.elapsed_time(e) * 1e3 / round_trips
                             for s, e in zip(starts[1:], ends[1:]))
                p50, p99 = rtt[len(rtt) // 2], rtt[min(len(rtt) - 1, int(len(rtt) * 0.99))]
                latency[(a, b)] = {"rtt_us_p50": p50, "push_us_p50": p50 / 2,
                                   "push_us_p99": p99 / 2,
                                   "round_trips": round_trips * _PING_REPS}
    return latency, method


# --------------------------------------------------------------------------- the region
class CudaRegion:
    """CudaRegion(world_size, rank, nbytes, device_index)

    This rank's mailbox region in the memory of GPU ``device_index``, plus the mappings of its
    peers' regions. ``ptr`` is the region's device address, ``fd`` the exported handle (send it
    with ``ccl.rendezvous.exchange_fds``), ``bytes`` the mapped size (``nbytes`` plus a small
    verification scratch area, rounded up to the allocation granularity; the caller uses
    ``[0, nbytes)``), ``bases[r]`` rank r's region as mapped here (device addresses usable by
    kernels on ``device_index``; ``bases[rank] == ptr``; 0 until imported).

    Construction is local; raises TransportError (with the reason) when the transport is
    unavailable or the allocation fails, so there is never a half-built region.
    """

    def __init__(self, world_size: int, rank: int, nbytes: int, device_index: int):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        if device_index < 0:
            raise ValueError(f"device_index must be >= 0, got {device_index}")
        self.world_size = world_size
        self.rank = rank
        self.nbytes = nbytes
        self.device_index = device_index
        self.fd = -1
        self.ptr = 0
        self.bytes = 0
        self.bases: list[int] = [0] * world_size
        self.verified = False
        self._own = None
        self._peers: dict[int, Any] = {}
        self._peer_errors: dict[int, str] = {}

        available = availability(device_index)
        if not available:
            raise TransportError(
                f"rank {rank}: CUDA transport unavailable on device {device_index}: "
                f"{available.reason}"
            )
        self.scratch_offset, required = _layout(nbytes, world_size)
        with _driver_errors(f"rank {rank}: allocating {required} bytes on cuda:{device_index}"):
            own = _cuda.Allocation.create(device_index, required)  # zeroed before export
            try:
                self.fd = own.export_fd()
            except BaseException:
                own.close()
                raise
        self._own = own
        self.ptr = own.ptr
        self.bytes = own.bytes
        self.bases[rank] = own.ptr
        logger.debug(
            "rank %d: CUDA region of %d bytes at %#x on device %d (fd %d)",
            rank, self.bytes, self.ptr, device_index, self.fd,
        )

    # ------------------------------------------------------------------ peers
    def import_peer(self, peer: int, fd: int, nbytes: int | None = None) -> None:
        """import_peer(peer, fd, nbytes=None)

        Maps rank ``peer``'s region from its fd (closed here) for access from this rank's GPU.
        ``nbytes`` is the peer's region size (default: ours; every rank computes the same).
        Local. Raises TransportError when the GPUs cannot map each other; the failure is also
        kept for :meth:`verify_peers`, which reports it on every rank.
        """
        try:
            if self._own is None:
                raise TransportError(f"rank {self.rank}: import_peer on a closed CudaRegion")
            if not 0 <= peer < self.world_size or peer == self.rank:
                raise ValueError(
                    f"peer must be another rank in [0, {self.world_size}), got {peer}"
                )
            if peer in self._peers:
                raise ValueError(f"rank {self.rank}: rank {peer}'s region is already mapped")
            size = self.bytes if nbytes is None else nbytes
            try:
                alloc = _cuda.Allocation.import_fd(self.device_index, fd, size)
            except (_cuda.CudaError, _cuda.DriverUnavailable, ValueError) as e:
                msg = (
                    f"rank {self.rank} (cuda:{self.device_index}) cannot map rank {peer}'s "
                    f"region of {size} bytes: {e}"
                )
                self._peer_errors[peer] = msg
                raise TransportError(f"{msg}. {_FALLBACK_HINT}") from e
        finally:
            os.close(fd)
        self._peers[peer] = alloc
        self.bases[peer] = alloc.ptr
        self._peer_errors.pop(peer, None)

    def verify_peers(self, exchange) -> None:
        """verify_peers(exchange)

        Write/read-back through every mapping; the driver's word is not enough. This is a
        collective operation over ``exchange`` (``StoreExchange``/``MpiExchange``: three
        all-gathers); call it after ``import_peer`` on every rank. Either every rank returns,
        or every rank raises the same TransportError listing each failed pair (including
        imports that failed anywhere) — so all ranks fall back together.
        """
        if self._own is None:
            raise TransportError(f"rank {self.rank}: verify_peers on a closed CudaRegion")
        if exchange.rank != self.rank or exchange.world_size != self.world_size:
            raise ValueError(
                f"the exchange is rank {exchange.rank} of {exchange.world_size} but this region "
                f"is rank {self.rank} of {self.world_size}"
            )
        rank, world = self.rank, self.world_size
        token = int.from_bytes(os.urandom(8), "little")
        mine = {
            "rank": rank,
            "world": world,
            "bytes": self.bytes,
            "scratch_offset": self.scratch_offset,
            "device": self.device_index,
            "token": token,
        }
        metas = exchange.all_gather(mine)
        problems: list[str] = []
        for m in metas:
            for key in ("world", "bytes", "scratch_offset"):
                if m[key] != mine[key]:
                    problems.append(
                        f"rank {m['rank']} has {key}={m[key]} but rank {rank} has {key}="
                        f"{mine[key]} (create every rank's region with the same nbytes / "
                        "max_bytes and world size)"
                    )
        consistent = not problems
        tokens = [m["token"] for m in metas]
        writable: list[int] = []  # ranks whose regions we reached (ours included)

        # 1. Write our record into every region we map (ours too), each stream-synchronised.
        if consistent:
            for target in range(world):
                alloc = self._own if target == rank else self._peers.get(target)
                if alloc is None:
                    problems.append(
                        self._peer_errors.get(
                            target,
                            f"rank {rank} never imported rank {target}'s region "
                            "(call import_peer for every peer first)",
                        )
                    )
                    continue
                offset = self.scratch_offset + rank * SCRATCH_RECORD_BYTES
                try:
                    alloc.write(offset, _record(rank, target, token))
                    writable.append(target)
                except (_cuda.CudaError, ValueError) as e:
                    problems.append(
                        f"rank {rank} (cuda:{self.device_index}) -> rank {target}: write "
                        f"through the peer mapping failed: {e}"
                    )
        written = exchange.all_gather(sorted(writable))  # barrier: every write has landed

        # 2. Check every record in our own region; read each peer's own record remotely.
        if consistent:
            writers = [w for w in range(world) if rank in written[w]]
            try:
                data = self._own.read(self.scratch_offset, world * SCRATCH_RECORD_BYTES)
                problems += _check_records(data, rank, tokens, writers)
            except _cuda.CudaError as e:
                problems.append(f"rank {rank}: reading its own region failed: {e}")
            for peer, alloc in sorted(self._peers.items()):
                if peer not in written[peer]:
                    continue  # the owner could not write its own record: reported there
                offset = self.scratch_offset + peer * SCRATCH_RECORD_BYTES
                try:
                    got = alloc.read(offset, SCRATCH_RECORD_BYTES)
                except _cuda.CudaError as e:
                    problems.append(f"rank {rank} -> rank {peer}: read through the mapping "
                                    f"failed: {e}")
                    continue
                if got != _record(peer, peer, tokens[peer]):
                    problems.append(
                        f"rank {rank} reads rank {peer}'s region through its mapping and gets "
                        f"{_describe_record(got)} instead of rank {peer}'s own record"
                    )

        verdicts = exchange.all_gather(problems)
        failures = [p for v in verdicts for p in v]
        if failures:
            shown = "; ".join(dict.fromkeys(failures))  # de-duplicated, order kept
            raise TransportError(
                f"rank {rank}: CUDA peer access verification failed among {world} ranks "
                f"(devices {[m['device'] for m in metas]}): {shown}. {_FALLBACK_HINT}"
            )
        with _driver_errors(f"rank {rank}: clearing the verification area"):
            self._own.memset(self.scratch_offset, world * SCRATCH_RECORD_BYTES, 0)
        self.verified = True
        logger.debug("rank %d: CUDA peer mappings verified for %d ranks", rank, world)

    def connect(self, exchange, *, method: str = "socket", timeout_s: float = 60.0) -> None:
        """connect(exchange, *, method="socket", timeout_s=60.0)

        ``exchange_fds`` + ``import_peer`` for every peer + ``verify_peers``. This is a
        collective operation. Import failures do not raise locally: they are reported by
        ``verify_peers`` on every rank, so either every rank returns with verified mappings or
        every rank raises the same TransportError.
        """
        from ccl.rendezvous import exchange_fds  # noqa: PLC0415 - avoids an import cycle

        if self._own is None:
            raise TransportError(f"rank {self.rank}: connect on a closed CudaRegion")
        fds = exchange_fds(exchange, self.fd, method=method, timeout_s=timeout_s)
        for peer, fd in sorted(fds.items()):
            try:
                self.import_peer(peer, fd)
            except TransportError:
                pass  # recorded in _peer_errors; verify_peers reports it on every rank
        self.verify_peers(exchange)

    # ------------------------------------------------------------------ slow-path access
    def write(self, target: int, offset: int, data: bytes) -> None:
        """write(target, offset, data)

        Copies ``data`` into rank ``target``'s region at ``offset`` through this process's
        mapping (a host-to-device copy issued by this rank's GPU context), and waits until it
        has landed. For set-up, probes and tests, not the data path. Local.
        """
        with _driver_errors(f"rank {self.rank}: writing {len(data)} bytes to rank {target}"):
            self._mapping(target).write(offset, bytes(data))

    def read(self, target: int, offset: int, n: int) -> bytes:
        """read(target, offset, n) -> bytes

        ``n`` bytes of rank ``target``'s region at ``offset``, read through this process's
        mapping. For set-up, probes and tests, not the data path. Local.
        """
        with _driver_errors(f"rank {self.rank}: reading {n} bytes of rank {target}"):
            return self._mapping(target).read(offset, n)

    def _mapping(self, target: int):
        if self._own is None:
            raise TransportError(f"rank {self.rank}: the CudaRegion is closed")
        if target == self.rank:
            return self._own
        if target not in self._peers:
            raise ValueError(f"rank {self.rank} has no mapping of rank {target}'s region")
        return self._peers[target]

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Unmaps every peer region and this rank's, releases the memory, closes the fd.

        Local and idempotent. The caller must have finished every kernel that uses the
        mappings (e.g. ``torch.cuda.synchronize()``). Peers keep their own mappings of this
        rank's memory alive until they close too.
        """
        errors = []
        for peer in sorted(self._peers):
            try:
                self._peers[peer].close()
            except _cuda.CudaError as e:
                errors.append(str(e))
            self.bases[peer] = 0
        self._peers.clear()
        if self._own is not None:
            try:
                self._own.close()
            except _cuda.CudaError as e:
                errors.append(str(e))
            self._own = None
            self.bases[self.rank] = 0
            self.ptr = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.verified = False
        if errors:
            logger.warning("rank %d: closing the CUDA region: %s", self.rank, "; ".join(errors))

    def __enter__(self) -> CudaRegion:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_own", None) is not None or getattr(self, "fd", -1) >= 0:
            with contextlib.suppress(Exception):
                self.close()
