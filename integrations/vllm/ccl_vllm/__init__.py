"""ccl_vllm: the vLLM plugin of mailbox-ccl.

Installed with the ``mailbox-ccl`` package as the ``vllm.general_plugins`` entry point
``ccl = ccl_vllm:register``; vLLM calls :func:`register` in every process it starts (API
server, engine core, each TP worker). It does nothing unless ``CCL_VLLM=1``. Then:

- the tensor-parallel all-reduce of vLLM's device communicator (CPU; CUDA and XPU as soon
  as ``ccl.Communicator(group, device=...)`` exists) runs through ccl's mailboxes when the
  payload fits (``CCL_MAX_BYTES``), and through vLLM's own path otherwise;
- in Llama-shaped models the all-reduce of o_proj / down_proj is fused with the residual add
  and RMSNorm that follow it (``CCL_VLLM_FUSE=0`` turns only this off);
- both run as ``torch.ops.ccl.*`` ops, so vLLM's compiled graphs keep them.

Counters (how many calls ccl carried) are read with :func:`stats` inside a worker, or
written per worker to ``$CCL_VLLM_STATS/ccl_vllm.pid<pid>.json`` (every few seconds and at
shutdown).
See docs/README-vllm.md.
"""

import os

__all__ = ["enabled", "register", "stats"]

_registered = False


def enabled() -> bool:
    """True when ``CCL_VLLM`` is set to 1 / true / yes / on."""
    return os.environ.get("CCL_VLLM", "").strip().lower() in ("1", "true", "yes", "on")


def register() -> None:
    """register() -> None. The vLLM plugin entry point. Idempotent, local.

    With ``CCL_VLLM`` unset or 0 it returns at once: it imports nothing and changes nothing.
    """
    global _registered
    if _registered:
        return
    _registered = True
    if not enabled():
        return
    import logging

    try:
        from ccl_vllm import _plugin

        _plugin.install()
    except ImportError as e:
        logging.getLogger("vllm.ccl_vllm").warning(
            "ccl_vllm: CCL_VLLM=1 but the plugin cannot load (%s); vLLM runs unchanged", e
        )


def stats() -> dict:
    """stats() -> dict. This process's counters (``mailbox_all_reduce``, ``fused``, ...) and
    its registered TP groups. Local; call it inside a vLLM worker (e.g. through
    ``LLM.collective_rpc``)."""
    import sys

    ops = sys.modules.get("ccl_vllm._ops")  # not imported: the plugin never ran here
    out = ops.stats() if ops is not None else {"pid": os.getpid(), "counters": {}, "groups": []}
    out["enabled"] = _registered and enabled()
    return out
