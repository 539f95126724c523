"""The SGLang entry points that ``ccl_sglang.enable()`` patches, one function per module.

Target: SGLang 0.5.23 (paths relative to ``python/sglang/srt/``; docs/README-sglang.md has the
line numbers and the call chains).

``distributed/parallel_state.py`` — :func:`patch_parallel_state`
    ``GroupCoordinator.__init__``: after SGLang builds a group whose name is in
    ``CCL_SGLANG_GROUPS`` (default tp, attention_tp, moe_tp, moe_ep) and that has more than one
    rank, its ranks agree on and build a ``ccl.Communicator`` over the group's gloo
    ``cpu_group`` (on the group's device). Collective, in group-creation order.
    ``GroupCoordinator.all_reduce(input_)``: through ccl when the payload fits, else SGLang's.
    ``GroupCoordinator.fused_allreduce_rmsnorm(input_, residual_inp_, weight_, eps)``:
    SGLang's communicator-native fused entry (``tensor_model_parallel_fused_allreduce_rmsnorm``).
    ``GroupCoordinator.destroy()``: closes the ccl communicator.
``layers/layernorm.py`` — :func:`patch_layernorm`
    ``_forward_with_allreduce_fusion(norm_module, x, residual, post_residual_addition, weight,
    use_attn_tp_group)``: the body of ``RMSNorm.forward_with_allreduce_fusion`` and
    ``GemmaRMSNorm.forward_with_allreduce_fusion`` (which passes ``1 + w``).
``layers/layer_boundary/fusions/allreduce.py`` — :func:`patch_boundary_fusions`
    ``fused_ffn_input`` / ``fused_attn_input``: the candidates the layer boundary tries before
    it runs the all-reduce and the norm separately. SGLang lets them run only where FlashInfer
    (sm90/sm100) or aiter (ROCm) fusion applies; patched, they also run where the group has a
    ccl communicator and ccl carries the batch, and they return None (SGLang's unfused path)
    otherwise.

Every patched function falls back to the original whenever ccl does not carry the call, so
groups without a ccl communicator, payloads over ``CCL_MAX_BYTES`` and norms with other
semantics run exactly as before.
"""

import functools
import logging

import torch

from ccl_sglang._config import TARGETS, fuse_enabled, groups_enabled

logger = logging.getLogger("ccl_sglang")

__all__ = ["PATCHERS", "restore_all", "group_entry", "is_patched"]

_ATTR = "_ccl_sglang_entry"  # instance attribute of a routed GroupCoordinator

# (owner, attribute name, original value) of every patch applied in this process.
_applied: list = []


def _set(owner, name: str, value) -> None:
    _applied.append((owner, name, owner.__dict__[name]))
    value.__ccl_sglang__ = True  # functools.wraps copied the rest (name, module, doc)
    setattr(owner, name, value)


def is_patched(fn) -> bool:
    """Whether ``fn`` is one of ccl_sglang's replacements."""
    return getattr(fn, "__ccl_sglang__", False)


def restore_all() -> list:
    """Undoes every patch (newest first); returns the names restored. Local."""
    names = []
    while _applied:
        owner, name, original = _applied.pop()
        setattr(owner, name, original)
        names.append(f"{getattr(owner, '__name__', owner)}.{name}")
    return names


def _missing(module, *names) -> list:
    return [n for n in names if not hasattr(module, n)]


# ============================================================================ parallel_state
def patch_parallel_state(mod) -> list:
    """Patches ``GroupCoordinator``; returns the entry points patched."""
    gc = getattr(mod, "GroupCoordinator", None)
    missing = ["GroupCoordinator"] if gc is None else _missing(
        gc, "__init__", "all_reduce", "fused_allreduce_rmsnorm", "destroy"
    )
    if missing:
        logger.warning(
            "ccl_sglang: %s has no %s (SGLang version other than 0.5.x?); its all-reduce stays "
            "on SGLang's path (set CCL_SGLANG=0 to silence)", mod.__name__, ", ".join(missing),
        )
        return []
    orig_init = gc.__init__
    orig_all_reduce = gc.all_reduce
    orig_fused = gc.fused_allreduce_rmsnorm
    orig_destroy = gc.destroy

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        _setup_group(self, orig_all_reduce)

    @functools.wraps(orig_all_reduce)
    def all_reduce(self, input_):
        e = getattr(self, _ATTR, None)
        if e is None or e.comm is None:
            return orig_all_reduce(self, input_)
        if torch.compiler.is_compiling():
            # The decision (size, dtype) is the op's, at run time: a branch here would be
            # frozen into the graph at the size seen while tracing.
            out = input_ if e.in_place else input_.clone()
            torch.ops.ccl_sglang.all_reduce_(out, e.handle)
            return out
        if not e.takes(input_):
            _ops()._counts["all_reduce_fallback"] += 1
            return orig_all_reduce(self, input_)
        out = input_ if e.in_place else input_.clone()
        e.comm.all_reduce(out)
        _ops()._counts["all_reduce"] += 1
        return out

    @functools.wraps(orig_fused)
    def fused_allreduce_rmsnorm(self, input_, residual_inp_, weight_, eps):
        e = getattr(self, _ATTR, None)
        if e is not None and e.comm is not None and fuse_enabled():
            out = _fused(e, input_, residual_inp_, weight_, eps)
            if out is not None:
                return out
        return orig_fused(self, input_, residual_inp_, weight_, eps)

    @functools.wraps(orig_destroy)
    def destroy(self):
        e = self.__dict__.pop(_ATTR, None)
        if e is not None:
            comm = e.comm
            _ops().remove_group(e)
            if comm is not None:
                comm.close()
            _ops().write_stats()
        return orig_destroy(self)

    _set(gc, "__init__", __init__)
    _set(gc, "all_reduce", all_reduce)
    _set(gc, "fused_allreduce_rmsnorm", fused_allreduce_rmsnorm)
    _set(gc, "destroy", destroy)
    return [
        "GroupCoordinator.__init__ (ccl communicator per group)",
        "GroupCoordinator.all_reduce",
        "GroupCoordinator.fused_allreduce_rmsnorm",
    ]


def _ops():
    from ccl_sglang import _ops as ops  # registers the ccl_sglang:: torch ops on first import

    return ops


def _fused(e, x, residual, weight, eps):
    """(out, residual_out) through ccl's fused op, or None when ccl does not carry it (the
    caller then runs SGLang's own path). Collective when it returns a value."""
    if torch.compiler.is_compiling():
        return torch.ops.ccl_sglang.all_reduce_add_rms_norm(x, residual, weight, float(eps),
                                                            e.handle)
    if not e.takes_fused(x, residual, weight):
        _ops()._counts["fused_fallback"] += 1
        return None
    return _ops().fused(e, x, residual, weight, float(eps))


def _setup_group(group, orig_all_reduce) -> None:
    """Builds the ccl communicator of ``group`` when its name is routed. Collective over the
    group's ``cpu_group`` (every rank of the group constructs it, in the same order)."""
    name = str(getattr(group, "unique_name", ""))
    if getattr(group, "world_size", 1) <= 1 or name.split(":")[0] not in groups_enabled():
        return
    device = torch.device(getattr(group, "device", "cpu"))
    reason = _agree(group, _local_reason(device))
    comm = None
    if reason is None:
        err = None
        try:
            comm = _make_communicator(group.cpu_group, device)
            if getattr(comm, "transport", "host") == "fallback":
                err = f"no ccl mailboxes on {device}: {comm.fallback_reason}"
        except Exception as ex:  # noqa: BLE001 - any failure: stay on SGLang's path, say why
            err = f"{type(ex).__name__}: {ex}"
        reason = _agree(group, err)
        if reason is not None and comm is not None:
            comm.close()
            comm = None
    if comm is None:
        logger.warning(
            "ccl_sglang: group %s stays on SGLang's all-reduce: %s (set CCL_SGLANG=0 or "
            "CCL_SGLANG_GROUPS to silence)", name, reason,
        )
        return

    def fallback(x, _group=group):
        y = orig_all_reduce(_group, x)
        if y is not x:
            x.copy_(y)

    ops = _ops()
    e = ops.add_group(name, comm, fallback, in_place=device.type == "cpu", device=device)
    group.__dict__[_ATTR] = e
    logger.info(
        "ccl_sglang: group %s rank %d/%d: all-reduce%s through ccl %s mailboxes (handle %d, up "
        "to %d B per call; larger payloads use SGLang's path)", name, comm.rank, comm.world_size,
        " and all-reduce + residual + RMSNorm" if fuse_enabled() else "",
        getattr(comm, "transport", "?"), e.handle, comm.max_bytes,
    )


def _agree(group, local):
    """All-gathers each rank's reason to stay off over the gloo cpu_group; returns the first
    (with its rank) or None. Collective."""
    gathered: list = [None] * group.world_size
    torch.distributed.all_gather_object(gathered, local, group=group.cpu_group)
    for r, why in enumerate(gathered):
        if why is not None:
            return f"rank {r}: {why}"
    return None


def _local_reason(device: torch.device):
    """Why this process cannot build a ccl communicator on ``device`` (None: it can try)."""
    if device.type not in ("cpu", "cuda", "xpu"):
        return f"ccl has no mailbox transport for device type {device.type!r}"
    try:
        import ccl  # noqa: F401
    except Exception as ex:  # noqa: BLE001
        return f"cannot import ccl ({type(ex).__name__}: {ex})"
    return None


def _make_communicator(cpu_group, device: torch.device):
    import ccl

    if device.type == "cpu":
        return ccl.Communicator(cpu_group)
    return ccl.Communicator(cpu_group, device=device)


def group_entry(group):
    """The routed entry of a GroupCoordinator, or None."""
    if group is None:
        return None
    e = getattr(group, _ATTR, None)
    return e if e is not None and e.comm is not None else None


# ============================================================================ layernorm
def _norm_classes():
    import sys

    mod = sys.modules.get("sglang.srt.layers.layernorm")
    if mod is None:
        return ()
    return tuple(c for c in (getattr(mod, "RMSNorm", None), getattr(mod, "GemmaRMSNorm", None))
                 if c is not None)


def _plain_norm(norm, x) -> bool:
    """Whether ``norm`` is SGLang's RMSNorm / GemmaRMSNorm with the plain semantics ccl's fused
    op computes (no variance override, fp32 residual, pre-multiply cast, dtype override, pad)."""
    classes = _norm_classes()
    return (
        isinstance(norm, classes)
        and getattr(norm, "variance_size_override", None) is None
        and not getattr(norm, "fp32_residual", False)
        and not getattr(norm, "cast_x_before_out_mul", False)
        and getattr(norm, "override_orig_dtype", None) in (None, x.dtype)
        and not getattr(norm, "x_pad_to_multiple", 0)
    )


def _fusion_group(use_attn_tp_group: bool):
    """The group SGLang's fused kernel reduces over: attention TP, or the post-experts
    reduction group (layernorm.py:_forward_with_allreduce_fusion, moe/utils.py:900)."""
    if use_attn_tp_group:
        from sglang.srt.distributed.parallel_state import get_attn_tp_group

        return get_attn_tp_group()
    from sglang.srt.layers.moe.utils import post_experts_reduction_group

    return post_experts_reduction_group()


def patch_layernorm(mod) -> list:
    """Patches ``_forward_with_allreduce_fusion``; returns the entry points patched."""
    missing = _missing(mod, "_forward_with_allreduce_fusion", "RMSNorm")
    if missing:
        logger.warning(
            "ccl_sglang: %s has no %s (SGLang version other than 0.5.x?); the fused all-reduce + "
            "RMSNorm entry stays SGLang's (set CCL_SGLANG_FUSE=0 to silence)", mod.__name__,
            ", ".join(missing),
        )
        return []
    orig = mod._forward_with_allreduce_fusion

    @functools.wraps(orig)
    def _forward_with_allreduce_fusion(
        norm_module, x, residual, post_residual_addition, weight, use_attn_tp_group=True
    ):
        if residual is not None and fuse_enabled() and _plain_norm(norm_module, x):
            try:
                group = _fusion_group(use_attn_tp_group)
            except (RuntimeError, ValueError, AttributeError):  # no parallel context yet
                group = None
            e = group_entry(group)
            if e is not None:
                res = residual
                if post_residual_addition is not None:
                    res = residual + post_residual_addition
                out = _fused(e, x, res, weight, norm_module.variance_epsilon)
                if out is not None:
                    return out
        return orig(norm_module, x, residual, post_residual_addition, weight, use_attn_tp_group)

    _set(mod, "_forward_with_allreduce_fusion", _forward_with_allreduce_fusion)
    return ["layernorm._forward_with_allreduce_fusion "
            "(RMSNorm/GemmaRMSNorm.forward_with_allreduce_fusion)"]


# ============================================================================ layer boundary
def _standard_fusion_norm(norm) -> bool:
    """``norm.forward_with_allreduce_fusion`` is RMSNorm's or GemmaRMSNorm's own."""
    classes = _norm_classes()
    fw = getattr(type(norm), "forward_with_allreduce_fusion", None)
    return any(fw is c.__dict__.get("forward_with_allreduce_fusion") for c in classes)


def _gate(norm, hidden_states, residual, group):
    """(out, residual_out) through ccl for a boundary fusion candidate, or None."""
    if residual is None or not fuse_enabled():
        return None
    e = group_entry(group)
    if e is None or not _standard_fusion_norm(norm) or not _plain_norm(norm, hidden_states):
        return None
    gemma = [c for c in _norm_classes() if c.__name__ == "GemmaRMSNorm"]
    # GemmaRMSNorm.forward_with_allreduce_fusion passes its precomputed 1 + w (layernorm.py).
    weight = norm.gemma_weight if gemma and isinstance(norm, gemma[0]) else norm.weight
    return _fused(e, hidden_states, residual, weight, norm.variance_epsilon)


def patch_boundary_fusions(mod) -> list:
    """Patches ``fused_ffn_input`` / ``fused_attn_input``; returns the entry points patched."""
    missing = _missing(mod, "fused_ffn_input", "fused_attn_input")
    if missing:
        logger.warning(
            "ccl_sglang: %s has no %s (SGLang version other than 0.5.x?); the layer boundary "
            "does not offer ccl's fused all-reduce + RMSNorm (set CCL_SGLANG_FUSE=0 to silence)",
            mod.__name__, ", ".join(missing),
        )
        return []
    orig_ffn = mod.fused_ffn_input
    orig_attn = mod.fused_attn_input

    @functools.wraps(orig_ffn)
    def fused_ffn_input(plan, hidden_states, residual, forward_batch):
        try:
            group = _fusion_group(True)
        except (RuntimeError, ValueError, AttributeError):
            group = None
        out = _gate(plan.norm, hidden_states, residual, group)
        if out is not None:
            return out
        return orig_ffn(plan, hidden_states, residual, forward_batch)

    @functools.wraps(orig_attn)
    def fused_attn_input(plan, owed, residual, forward_batch, post_residual_addition, *,
                         fuses_quant, keep_bf16):
        unreduced = getattr(mod, "UnreducedOutput", None)
        if (
            unreduced is not None
            and isinstance(owed, unreduced)
            and post_residual_addition is None
            and not fuses_quant
            and getattr(owed, "complete_sum", None) is None
            and getattr(owed, "reduce_to_dp_local", None) is None
        ):
            out = _gate(plan.norm, owed.partial, residual, owed.group)
            if out is not None:
                return out
        return orig_attn(plan, owed, residual, forward_batch, post_residual_addition,
                         fuses_quant=fuses_quant, keep_bf16=keep_bf16)

    _set(mod, "fused_ffn_input", fused_ffn_input)
    _set(mod, "fused_attn_input", fused_attn_input)
    return ["layer_boundary fused_ffn_input / fused_attn_input (fusion candidates)"]


#: module name -> patch function; applied when the module is (or has been) imported.
PATCHERS = dict(zip(TARGETS, (patch_parallel_state, patch_layernorm, patch_boundary_fusions)))
