"""Host transport: one memfd-backed shared-memory region per rank, mapped by every peer.

A real transport for CPU inference (not a mock): ranks are separate processes on one host,
the region is created with ``memfd_create`` and shared by passing its fd (SCM_RIGHTS, see
``ccl.rendezvous``).
"""

from __future__ import annotations

import os
import sys

from ccl import _C
from ccl.errors import ConfigError, TransportError
from ccl.transport.base import Availability

__all__ = ["HostRegion", "availability"]

_host = _C.host


def availability() -> Availability:
    """Availability of the host transport (Linux with memfd_create)."""
    if not sys.platform.startswith("linux"):
        return Availability(False, f"needs Linux memfd_create, this is {sys.platform}")
    return Availability(True, "memfd_create + mmap shared memory")


class HostRegion:
    """HostRegion(world_size, rank, capacity_bytes)

    This rank's mailbox region plus the mappings of its peers' regions. ``bases`` lists the
    address of every rank's region as mapped in this process.
    """

    def __init__(self, world_size: int, rank: int, capacity_bytes: int):
        self.world_size = world_size
        self.rank = rank
        self.capacity_bytes = capacity_bytes
        self.region_bytes = _host.region_bytes(world_size, capacity_bytes)
        fd, addr, _ = _host.shm_create(f"ccl-mailbox-r{rank}", self.region_bytes)
        self.fd = fd
        self.bases: list[int] = [0] * world_size
        self.bases[rank] = addr
        # Initialised before the fd leaves this process, so no peer can observe a region whose
        # sequence number is reset after it started pushing.
        _host.init_control(addr, world_size, rank, os.getpid(), capacity_bytes, self.region_bytes)

    def import_peer(self, peer: int, fd: int) -> None:
        """Maps peer ``peer``'s region from its fd (closed here) and checks its identity."""
        try:
            size = _host.fd_size(fd)
            if size != self.region_bytes:
                raise ConfigError(
                    f"rank {peer}'s mailbox region is {size} bytes but rank {self.rank} expects "
                    f"{self.region_bytes}: ranks were created with different capacities or "
                    "world sizes (set the same max_bytes / CCL_MAX_BYTES everywhere)"
                )
            addr = _host.shm_map(fd, self.region_bytes)
        finally:
            os.close(fd)
        ctl = _host.read_control(addr)
        if (
            ctl["magic"] != _host.MAGIC
            or ctl["version"] != _host.LAYOUT_VERSION
            or ctl["rank"] != peer
            or ctl["world"] != self.world_size
        ):
            _host.shm_unmap(addr, self.region_bytes)
            raise TransportError(
                f"rank {self.rank}: the region received as rank {peer}'s does not hold a "
                f"mailbox of this job (control block {ctl})"
            )
        self.bases[peer] = addr

    def verify_peers(self) -> None:
        """Write/read-back through every mapping: the driver's word is not enough."""
        for peer, addr in enumerate(self.bases):
            ctl = _host.read_control(addr)
            if ctl["magic"] != _host.MAGIC or ctl["rank"] != peer:
                raise TransportError(f"rank {self.rank}: mapping of rank {peer} is not readable")

    def close(self) -> None:
        """Unmaps every region and closes this rank's fd. Idempotent."""
        for i, addr in enumerate(self.bases):
            if addr:
                _host.shm_unmap(addr, self.region_bytes)
                self.bases[i] = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
