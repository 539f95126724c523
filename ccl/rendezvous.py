"""Getting ranks to know each other: small-object all-gathers for bootstrap, and fd exchange.

Bootstrap sources (``exchange_for``): a torch.distributed process group or store, an mpi4py
communicator, or the usual environment variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT).

fds cross processes over a Unix socket with SCM_RIGHTS (works under Yama ptrace_scope=1 and
in containers). The receiving side checks its peer with SO_PEERCRED: same uid, and the pid
that the claimed rank published through the bootstrap exchange; anything else is refused.
``pidfd_getfd`` is the opt-in alternative (``CCL_FD_EXCHANGE=pidfd``); it needs ptrace
rights over the peer, which the exporter grants with ``PR_SET_PTRACER_ANY``.

The fd passing uses Python's own ``socket.send_fds``/``recv_fds``: a well-kept library for a
path that runs once per communicator, not per call.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import pickle
import select
import socket
import struct
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from ccl import _C
from ccl.errors import CollectiveTimeout, TransportError

logger = logging.getLogger(__name__)

__all__ = [
    "Exchange",
    "StoreExchange",
    "MpiExchange",
    "PeerInfo",
    "node_id",
    "exchange_fds",
]


class Exchange(Protocol):
    """All-gather of small picklable objects among the ranks of one group."""

    rank: int
    world_size: int

    def all_gather(self, obj: Any) -> list[Any]: ...


_store_ids = itertools.count()


class StoreExchange:
    """StoreExchange(store, rank, world_size, prefix, timeout_s=None)

    All-gather through a torch.distributed Store (TCPStore, FileStore, PrefixStore...). Each
    call uses fresh keys, so prefixes must be unique per use. Every wait is bounded by
    ``timeout_s`` (default: the store's own timeout); on expiry a CollectiveTimeout names the
    ranks whose keys never appeared.
    """

    def __init__(self, store, rank: int, world_size: int, prefix: str,
                 timeout_s: float | None = None):
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._round = 0

    def all_gather(self, obj: Any) -> list[Any]:
        key = f"{self.prefix}/ag{self._round}"
        self._round += 1
        self.store.set(f"{key}/{self.rank}", pickle.dumps(obj))
        keys = [f"{key}/{r}" for r in range(self.world_size)]
        if self.timeout_s is not None:
            try:
                self.store.wait(keys, timedelta(seconds=self.timeout_s))
            except Exception as e:  # torch raises DistStoreError / RuntimeError by version
                missing = [r for r, k in enumerate(keys) if not self.store.check([k])]
                raise CollectiveTimeout(
                    f"rank {self.rank}: bootstrap exchange timed out after "
                    f"{self.timeout_s:.1f}s waiting for rank(s) {missing} ({e})",
                    missing, self.rank, self.timeout_s,
                ) from None
        return [pickle.loads(self.store.get(k)) for k in keys]


class MpiExchange:
    """MpiExchange(comm): all-gather through an mpi4py communicator."""

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()

    def all_gather(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)


_env_stores: dict[tuple, Any] = {}


def env_store(timeout_s: float = 300.0):
    """(store, rank, world_size) from RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.

    One TCPStore per (address, port, rank, world) for the life of the process: only one
    server can listen on MASTER_PORT, so later communicators share it (with their own key
    prefixes)."""
    import torch.distributed as dist

    try:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ["MASTER_PORT"])
    except KeyError as e:
        raise TransportError(
            f"cannot bootstrap from the environment: {e.args[0]} is not set (set RANK, "
            "WORLD_SIZE, MASTER_ADDR, MASTER_PORT, or pass a process group / mpi4py comm)"
        ) from None
    key = (addr, port, rank, world)
    store = _env_stores.get(key)
    if store is None:
        store = dist.TCPStore(
            addr, port, world, is_master=(rank == 0), timeout=timedelta(seconds=timeout_s)
        )
        _env_stores[key] = store
    return store, rank, world


def node_id() -> str:
    """Identity of this host: processes with equal ids can share memory.

    ``CCL_NODE_ID`` overrides it (tests declare several "nodes" on one machine with it).
    """
    override = os.environ.get("CCL_NODE_ID")
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}:{boot}"


@dataclass(frozen=True)
class PeerInfo:
    rank: int
    pid: int
    uid: int
    node: str
    address: str  # abstract Unix socket name
    fd: int  # the exported fd number in the owner's process (for pidfd_getfd)


_HELLO = struct.Struct("!16sI")  # job id, claimed rank
_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value


def _set_ptracer(value: int) -> None:
    """prctl(PR_SET_PTRACER): lets peers pidfd_getfd our fd under Yama ptrace_scope=1."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PTRACER, ctypes.c_ulong(value), 0, 0, 0)
    except OSError:  # pragma: no cover - non-Linux
        pass


def exchange_fds(
    exchange: Exchange,
    my_fd: int,
    *,
    method: str = "socket",
    timeout_s: float = 60.0,
    job: bytes | None = None,
) -> dict[int, int]:
    """Sends ``my_fd`` to every peer and returns {peer rank: received fd}. Collective.

    ``method`` is "socket" (SCM_RIGHTS, default) or "pidfd" (pidfd_getfd, needs ptrace
    rights). Every peer must be on this node. Received fds are owned by the caller.
    """
    rank, world = exchange.rank, exchange.world_size
    if method not in ("socket", "pidfd"):
        raise ValueError(f"fd exchange method must be 'socket' or 'pidfd', got {method!r}")
    job_id = job or uuid.uuid4().bytes
    listener = None
    address = ""
    if method == "socket":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        address = f"\0ccl-{uuid.uuid4().hex}"
        listener.bind(address)
        listener.listen(max(world, 8))
    else:
        _set_ptracer(_PR_SET_PTRACER_ANY)
    try:
        mine = PeerInfo(rank, os.getpid(), os.getuid(), node_id(), address, my_fd)
        infos: list[PeerInfo] = exchange.all_gather((mine, job_id if rank == 0 else None))
        job_id = infos[0][1]
        peers = [info for info, _ in infos]
        for p in peers:
            if p.node != mine.node:
                raise TransportError(
                    f"rank {p.rank} is on node {p.node!r} but rank {rank} is on {mine.node!r}: "
                    "mailbox transports need every rank on one host (multi-node: use the torch backend \"mbx\")"
                )
        if method == "pidfd":
            try:
                fds = {p.rank: _C.host.pidfd_dup(p.pid, p.fd) for p in peers if p.rank != rank}
            except RuntimeError as e:
                raise TransportError(f"rank {rank}: pidfd fd exchange failed: {e}") from None
            finally:
                # Everyone has its fds once all are past this point: revoke the grant.
                exchange.all_gather(None)
                _set_ptracer(0)
            return fds
        return _socket_exchange(listener, peers, rank, my_fd, job_id, timeout_s)
    finally:
        if listener is not None:
            listener.close()


def _socket_exchange(
    listener: socket.socket,
    peers: list[PeerInfo],
    rank: int,
    my_fd: int,
    job_id: bytes,
    timeout_s: float,
) -> dict[int, int]:
    # Listening sockets accept connects before accept() runs (backlog >= world), and the
    # hello is tiny, so sending to everyone first cannot deadlock.
    for p in peers:
        if p.rank == rank:
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout_s)
            try:
                s.connect(p.address)
                # The message and its fd stay queued on the receiver's side after we close.
                socket.send_fds(s, [_HELLO.pack(job_id, rank)], [my_fd])
            except OSError as e:
                raise TransportError(
                    f"rank {rank}: cannot reach rank {p.rank}'s fd socket (pid {p.pid}): {e}"
                ) from None
    received: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    expected = {p.rank: p for p in peers if p.rank != rank}
    while len(received) < len(expected):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([listener], [], [], left)[0]:
            missing = sorted(set(expected) - set(received))
            for fd in received.values():
                os.close(fd)
            raise TransportError(
                f"rank {rank}: fd exchange timed out after {timeout_s:.0f}s waiting for "
                f"rank(s) {missing}"
            )
        conn, _ = listener.accept()
        with conn:
            fd = _accept_one(conn, expected, received, rank, job_id)
            if fd is not None:
                received[fd[0]] = fd[1]
    return received


def _accept_one(conn, expected, received, rank, job_id):
    """Validates one connection; returns (peer rank, fd) or None when refused."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    conn.settimeout(5.0)
    try:
        msg, fds, _flags, _addr = socket.recv_fds(conn, _HELLO.size, 1)
    except (OSError, TimeoutError):
        logger.warning("rank %d: refused a connection from pid %d: no hello received", rank, pid)
        return None
    reason = None
    if len(msg) != _HELLO.size or len(fds) != 1:
        reason = "malformed hello"
    else:
        peer_job, peer = _HELLO.unpack(msg)
        if peer_job != job_id:
            reason = "hello from another job"
        elif peer not in expected or peer in received:
            reason = f"unexpected rank {peer}"
        elif uid != os.getuid():
            reason = f"uid {uid} differs from ours ({os.getuid()})"
        elif pid != expected[peer].pid:
            reason = f"pid {pid} is not rank {peer}'s published pid {expected[peer].pid}"
    if reason is not None:
        for fd in fds:
            os.close(fd)
        logger.warning("rank %d: refused an fd from pid %d (uid %d): %s", rank, pid, uid, reason)
        return None
    return peer, fds[0]
