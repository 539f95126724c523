"""Settings of ccl_sglang, read from the environment; imports nothing heavy (no torch)."""

import os

__all__ = ["TARGETS", "DEFAULT_GROUPS", "groups_enabled", "fuse_enabled"]

#: The SGLang modules ccl_sglang patches (see _patches.PATCHERS).
TARGETS = (
    "sglang.srt.distributed.parallel_state",
    "sglang.srt.layers.layernorm",
    "sglang.srt.layers.layer_boundary.fusions.allreduce",
)

DEFAULT_GROUPS = ("tp", "attention_tp", "moe_tp", "moe_ep")


def groups_enabled() -> frozenset:
    """Group names (``GroupCoordinator.unique_name`` before the ``:``) routed through ccl:
    env ``CCL_SGLANG_GROUPS`` (comma-separated), default tp, attention_tp, moe_tp, moe_ep."""
    raw = os.environ.get("CCL_SGLANG_GROUPS")
    if raw is None:
        return frozenset(DEFAULT_GROUPS)
    return frozenset(g.strip() for g in raw.split(",") if g.strip())


def fuse_enabled() -> bool:
    """False when ``CCL_SGLANG_FUSE`` is 0 / false / no / off (all-reduce routing only)."""
    return os.environ.get("CCL_SGLANG_FUSE", "1").strip().lower() not in ("0", "false", "no", "off")
