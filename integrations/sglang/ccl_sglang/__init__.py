"""ccl_sglang: the SGLang hook of mailbox-ccl.

Routes SGLang's tensor-parallel all-reduce (``GroupCoordinator.all_reduce``) and its fused
all-reduce + residual add + RMSNorm entries (``GroupCoordinator.fused_allreduce_rmsnorm``,
``RMSNorm.forward_with_allreduce_fusion`` and the layer boundary's fusion candidates) through
``ccl.Communicator`` when the payload fits its mailboxes, and through SGLang's own path
otherwise. Written against SGLang 0.5.23; docs/README-sglang.md has the entry points, line
references and what was verified against the real modules.

Turn it on in one of these ways (each process of the SGLang job must run it: SGLang starts its
TP workers with ``spawn``):

- ``import ccl_sglang; ccl_sglang.enable()`` at the top level of the script that starts
  ``sglang.Engine`` (spawned workers re-import that script, so they enable too);
- ``CCL_SGLANG=1`` with the ``sglang.srt.plugins`` entry point ``ccl = ccl_sglang:plugin``
  (SGLang runs general plugins in every scheduler process), or with the startup hook that
  ``python -m ccl_sglang install-pth`` writes;
- ``python -m ccl_sglang.launch_server <sglang.launch_server arguments>``.

Without any of these nothing is patched and nothing beyond this package is imported.
"""

import os

__all__ = ["enable", "disable", "enabled", "env_enabled", "plugin", "autoload", "stats"]

ENV = "CCL_SGLANG"


def env_enabled() -> bool:
    """True when ``CCL_SGLANG`` is 1 / true / yes / on."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def enable() -> None:
    """enable() -> None. Local, idempotent.

    Patches SGLang's all-reduce and fused all-reduce + residual + RMSNorm entry points in this
    process: at once for the SGLang modules already imported, through an import hook for the
    others (nothing is imported here). Groups built afterwards whose name is in
    ``CCL_SGLANG_GROUPS`` (default tp, attention_tp, moe_tp, moe_ep) get a ccl communicator;
    payloads above ``CCL_MAX_BYTES`` stay on SGLang's path. ``CCL_SGLANG_FUSE=0`` leaves the
    fused entries alone. Sets ``CCL_SGLANG=1`` so that the processes this one starts follow.
    Logs once (INFO, logger ``ccl_sglang``) what it routes.
    """
    os.environ[ENV] = "1"
    from ccl_sglang import _hook

    _hook.enable()


def disable() -> list:
    """disable() -> list of restored entry points. Local.

    Restores SGLang's entry points, removes the import hook and closes this process's ccl
    communicators. Every rank must call it (ranks that keep ccl would wait for the others).
    """
    import sys

    hook = sys.modules.get("ccl_sglang._hook")
    return hook.disable() if hook is not None else []


def enabled() -> bool:
    """Whether enable() is in effect in this process."""
    import sys

    hook = sys.modules.get("ccl_sglang._hook")
    return hook is not None and hook.is_enabled()


def autoload() -> bool:
    """autoload() -> bool. Calls :func:`enable` when ``CCL_SGLANG`` is on; does nothing (and
    imports nothing) otherwise. Returns whether it enabled."""
    if env_enabled():
        enable()
        return True
    return False


def plugin() -> None:
    """plugin() -> None. The SGLang general-plugin entry point (group ``sglang.srt.plugins``),
    run by SGLang's ``load_plugins()`` early in every process; same as :func:`autoload`."""
    autoload()


def stats() -> dict:
    """stats() -> dict. This process's counters (``all_reduce``, ``all_reduce_fallback``,
    ``fused``, ``fused_fallback``), its routed groups and the patched entry points. Local."""
    import sys

    ops = sys.modules.get("ccl_sglang._ops")
    hook = sys.modules.get("ccl_sglang._hook")
    out = ops.stats() if ops is not None else {"pid": os.getpid(), "counters": {}, "groups": []}
    out["enabled"] = enabled()
    out["patched"] = hook.patched() if hook is not None else {}
    return out
