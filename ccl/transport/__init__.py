"""Transports: each one allocates a peer-visible buffer, exports it as an fd, imports a peer's
fd and frees. They know nothing about kernels (DESIGN.md §2)."""

from ccl.transport.base import Availability

__all__ = ["Availability"]
