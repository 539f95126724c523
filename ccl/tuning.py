"""Algorithm thresholds, in one table keyed by (transport, world_size).

Values are payload bytes per rank above which the two-shot algorithm is used. They are filled
from ``ccl-bench --tune`` runs (bench/results/*.json); every rank computes the same choice
from the same table, so they always agree on the algorithm.
"""

from __future__ import annotations

import os

__all__ = ["two_shot_threshold", "ONE_SHOT", "TWO_SHOT"]

ONE_SHOT = 0
TWO_SHOT = 1

_NEVER = 1 << 62

# (transport, world_size) -> bytes. Host: measured with `ccl-bench --tune` on the 2-core CI
# machine class (bench/results/cpu-{2,4,8}rank.json): with 2 ranks one-shot wins at every size
# that fits a mailbox; with 4 and 8 ranks (oversubscribed there) two-shot wins from 16 KB and
# 8 KB. Re-tune on hosts with a core per rank.
_TWO_SHOT_ABOVE: dict[tuple[str, int], int] = {
    ("host", 2): _NEVER,
    ("host", 3): 256 * 1024,
    ("host", 4): 8 * 1024,
    ("host", 8): 4 * 1024,
    ("cuda", 2): _NEVER,
    ("cuda", 4): 512 * 1024,
    ("cuda", 8): 256 * 1024,
    ("level_zero", 2): _NEVER,
    ("level_zero", 4): 256 * 1024,
}
_DEFAULT_BY_TRANSPORT = {"host": 128 * 1024, "cuda": 256 * 1024, "level_zero": 256 * 1024}


def two_shot_threshold(transport: str, world_size: int) -> int:
    """Bytes above which two-shot runs. ``CCL_TWO_SHOT_ABOVE`` overrides (same on all ranks)."""
    env = os.environ.get("CCL_TWO_SHOT_ABOVE")
    if env is not None:
        return int(env)
    if world_size <= 1:
        return _NEVER
    return _TWO_SHOT_ABOVE.get(
        (transport, world_size), _DEFAULT_BY_TRANSPORT.get(transport, _NEVER)
    )
