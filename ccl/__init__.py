"""mailbox-ccl: mailbox collectives for tensor-parallel LLM decode.

Every rank pushes its payload into its peers' inboxes as flag-in-word packets and polls only
its own inbox; the all-reduce is fused with residual-add + RMSNorm and the TP-sharded Q/K norm.
"""

from ccl.comm import Communicator, NormStyle, ReduceOp
from ccl import backend as _backend  # noqa: F401  (importing it registers the "mbx" backend)
from ccl.fused_linear import Int4Weights, linear_all_reduce_add_rms_norm, linear_qk_rms_norm
from ccl.fused_moe import ExpertWeights, moe_all_reduce_add_rms_norm
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
    "Int4Weights",
    "ExpertWeights",
    "linear_all_reduce_add_rms_norm",
    "linear_qk_rms_norm",
    "moe_all_reduce_add_rms_norm",
    "NormStyle",
    "ReduceOp",
    "CclError",
    "CollectiveMismatch",
    "CollectiveTimeout",
    "CommunicatorClosed",
    "ConfigError",
    "TransportError",
]
