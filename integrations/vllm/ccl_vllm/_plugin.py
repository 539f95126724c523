"""What ``ccl_vllm.register()`` installs when ``CCL_VLLM=1`` (once per process).

1. All-reduce routing: the current platform's ``get_device_communicator_cls`` returns our
   subclass of its communicator (CPU, CUDA, XPU; ``_communicator.py``). vLLM resolves it when
   it creates each process group, which happens after plugins load in the worker.
2. Fusion (unless ``CCL_VLLM_FUSE=0``): ``BaseModelLoader.load_model`` is wrapped; after
   loading, the model is rewired (``_fusion.py``) when the TP group uses ccl.
3. Compile cache: ``vllm.envs.compile_factors`` gains the plugin's settings and state (TP
   groups on ccl, fused pairs), so that vLLM's torch.compile cache never hands a graph built
   with the plugin to a run without it, or the other way round: the CCL_* variables are not
   otherwise part of its key. With ``CCL_VLLM`` unset the key is vLLM's own.
4. Counters: with ``CCL_VLLM_STATS=<dir>`` each worker writes ``<dir>/ccl_vllm.pid<pid>.json``
   every ``CCL_VLLM_STATS_INTERVAL`` seconds, when its TP group is destroyed and at exit.
"""

import atexit
import functools
import logging
import os

logger = logging.getLogger("vllm.ccl_vllm")


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off")


def _fuse_enabled() -> bool:
    return _flag("CCL_VLLM_FUSE", "1")


def _gemv_enabled() -> bool:
    """CCL_VLLM_FUSE_GEMV=1: the row-parallel GEMVs move into the fused norms too (opt-in:
    their weights are then held twice, see _fusion)."""
    return _fuse_enabled() and _flag("CCL_VLLM_FUSE_GEMV", "0")


def install() -> None:
    from vllm.platforms import current_platform

    from ccl_vllm import _communicator  # also registers the ccl:: torch ops

    fuse = _fuse_enabled()
    platform_cls = type(current_platform)
    base = platform_cls.get_device_communicator_cls()
    ours = _communicator.OURS.get(base)
    if ours is None:
        logger.warning(
            "ccl_vllm: platform %s uses communicator %s, which ccl_vllm does not wrap; vLLM "
            "is unchanged (set CCL_VLLM=0 to silence)", platform_cls.__name__, base,
        )
        return
    platform_cls.get_device_communicator_cls = classmethod(lambda cls: ours)
    if fuse:
        _wrap_load_model()
    if _gemv_enabled():
        _keep_row_parallel_weights()
    _key_compile_cache(fuse)
    atexit.register(_write_stats_at_exit)
    logger.info(
        "ccl_vllm: enabled (CCL_VLLM=1): TP all-reduce of %s through ccl (%s)%s",
        platform_cls.__name__, ours.rpartition(".")[2],
        "; all-reduce + add + RMSNorm fused at model load" if fuse else
        "; fusion off (CCL_VLLM_FUSE=0)",
    )


def _wrap_load_model() -> None:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    orig = BaseModelLoader.load_model

    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        model = orig(self, *args, **kwargs)
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        _maybe_fuse(model, vllm_config)
        return model

    BaseModelLoader.load_model = load_model


def _maybe_fuse(model, vllm_config) -> int:
    from vllm.distributed import get_tp_group

    from ccl_vllm import _fusion
    from ccl_vllm._communicator import CclRouting

    tp = get_tp_group()
    if tp.world_size == 1:
        return 0
    comm = tp.device_communicator
    if not isinstance(comm, CclRouting) or comm._ccl_comm is None:
        logger.warning(
            "ccl_vllm: all-reduce + RMSNorm fusion off: the TP group does not use ccl (%s)",
            getattr(comm, "_ccl_off_reason", None) or type(comm).__name__,
        )
        return 0
    _fusion.fuse_qk_norms(model, comm._ccl_handle, vllm_config)
    return _fusion.fuse_model(model, comm._ccl_handle, vllm_config, gemv=_gemv_enabled())


def _keep_row_parallel_weights() -> None:
    """Keeps a reference to each RowParallelLinear's unpacked weight (``layer._ccl_weight``)
    before vLLM's CPU GEMM dispatch repacks it and drops ``layer.weight``."""
    from vllm.model_executor.layers.linear import RowParallelLinear, UnquantizedLinearMethod

    orig = UnquantizedLinearMethod.process_weights_after_loading

    @functools.wraps(orig)
    def process_weights_after_loading(self, layer):
        if isinstance(layer, RowParallelLinear):
            layer._ccl_weight = layer.weight.detach()
        return orig(self, layer)

    UnquantizedLinearMethod.process_weights_after_loading = process_weights_after_loading


def _key_compile_cache(fuse: bool) -> None:
    from vllm import envs

    orig = envs.compile_factors

    from ccl_vllm import _ops

    @functools.wraps(orig)
    def compile_factors():
        # Called when a worker compiles or looks up its graph: after its groups exist and the
        # model is fused, so the key says what the graph contains, not just what was asked.
        factors = orig()
        factors["CCL_VLLM"] = "1"
        factors["CCL_VLLM_FUSE"] = "1" if fuse else "0"
        factors["CCL_VLLM_FUSE_GEMV"] = "1" if _gemv_enabled() else "0"
        factors["ccl_vllm_state"] = (
            f"ccl_groups={sum(e.comm is not None for e in _ops._entries)},"
            f"fused_pairs={_ops._counts['rewired_pairs']},"
            f"gemv_pairs={_ops._counts['gemv_pairs']}"
        )
        return factors

    envs.compile_factors = compile_factors


def _write_stats_at_exit() -> None:
    from ccl_vllm import _ops

    if _ops._entries:
        try:
            _ops.write_stats()
        except OSError as e:
            logger.warning("ccl_vllm: could not write CCL_VLLM_STATS: %s", e)
