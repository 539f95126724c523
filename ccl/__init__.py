"""mailbox-ccl: mailbox collectives for tensor-parallel LLM decode.

Every rank pushes its payload into its peers' inboxes as flag-in-word packets and polls only
its own inbox; the all-reduce is fused with residual-add + RMSNorm and the TP-sharded Q/K norm.
"""

from ccl.comm import Communicator, NormStyle, ReduceOp
from ccl import backend as _backend  # noqa: F401  (importing it registers the "mbx" backend)
from ccl.errors import (
    CclError,
    CollectiveMismatch,
    CollectiveTimeout,
    CommunicatorClosed,
    ConfigError,
    TransportError,
)

__version__ = "0.1.0"

__all__ = [
    "Communicator",
    "NormStyle",
    "ReduceOp",
    "CclError",
    "CollectiveMismatch",
    "CollectiveTimeout",
    "CommunicatorClosed",
    "ConfigError",
    "TransportError",
]
