"""The error tree of mailbox-ccl. Messages name the rank, the sizes and the fix."""

from __future__ import annotations

__all__ = [
    "CclError",
    "CollectiveTimeout",
    "CollectiveMismatch",
    "TransportError",
    "ConfigError",
    "CommunicatorClosed",
]


class CclError(RuntimeError):
    """Base class of every error raised by mailbox-ccl."""


class CollectiveTimeout(CclError):
    """A bounded wait expired: some ranks did not reach the collective in time.

    ``missing_ranks`` lists the ranks that had not delivered their part. The communicator that
    raised it is unusable afterwards (ranks disagree on the sequence number): close it.
    """

    def __init__(self, message: str, missing_ranks: list[int], rank: int, timeout_s: float):
        super().__init__(message)
        self.missing_ranks = missing_ranks
        self.rank = rank
        self.timeout_s = timeout_s


class CollectiveMismatch(CclError, ValueError):
    """Ranks called the same collective with different ops, dtypes, shapes or eps.

    Detected from the header every rank sends before its payload; nothing was written to the
    outputs, and the communicator stays usable.
    """

    def __init__(self, message: str, rank: int, peer: int):
        super().__init__(message)
        self.rank = rank
        self.peer = peer


class TransportError(CclError):
    """A transport could not be set up (no driver, peer not mappable, fd exchange refused)."""


class ConfigError(CclError, ValueError):
    """Inconsistent configuration (for example ranks created with different capacities)."""


class CommunicatorClosed(CclError):
    """The communicator was closed (or broken by an earlier timeout) and cannot run ops."""
