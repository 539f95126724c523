"""enable() / disable() and the import hook that applies the patches when SGLang is imported.

The patches (``_patches.PATCHERS``) target three SGLang modules. enable() patches those
already imported at once and installs a ``sys.meta_path`` finder that patches the others right
after SGLang's own code for them has run, so the order of imports does not matter, and nothing
of SGLang (or torch) is imported by enabling.
"""

import atexit
import importlib.abc
import importlib.util
import logging
import sys

logger = logging.getLogger("ccl_sglang")

__all__ = ["enable", "disable", "is_enabled", "patched"]

_state = {"enabled": False, "finder": None, "patched": {}, "logged": False}


def is_enabled() -> bool:
    return _state["enabled"]


def patched() -> dict:
    """module name -> the entry points patched in it (so far, in this process)."""
    return {k: list(v) for k, v in _state["patched"].items()}


def _apply(name: str, module) -> None:
    if name in _state["patched"] or not _state["enabled"]:
        return
    from ccl_sglang import _patches  # imports torch: only once SGLang itself is imported

    _state["patched"][name] = _patches.PATCHERS[name](module)
    logger.debug("ccl_sglang: patched %s: %s", name, _state["patched"][name])


class _Loader(importlib.abc.Loader):
    """Runs the module's own loader, then applies its patch."""

    def __init__(self, inner, name: str):
        self._inner = inner
        self._name = name

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _apply(self._name, module)

    def __getattr__(self, attr):  # get_source, get_filename, is_package, ... of the real one
        return getattr(self._inner, attr)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the patched SGLang modules; every other import passes through."""

    def __init__(self, names):
        self._names = frozenset(names)
        self._busy: set = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self._names or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the finders after this one
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, fullname)
        return spec


def enable() -> None:
    """Idempotent. See :func:`ccl_sglang.enable`."""
    if _state["enabled"]:
        return
    from ccl_sglang import _config

    _state["enabled"] = True
    finder = _Finder(_config.TARGETS)
    sys.meta_path.insert(0, finder)
    _state["finder"] = finder
    if not _state["logged"]:
        _state["logged"] = True
        groups = ",".join(sorted(_config.groups_enabled())) or "(none)"
        logger.info(
            "ccl_sglang: enabled: SGLang's all-reduce (GroupCoordinator.all_reduce) of groups "
            "%s%s goes through mailbox-ccl when the payload fits, SGLang's own path otherwise; "
            "patches apply as SGLang imports parallel_state, layernorm and the layer boundary",
            groups,
            " and the fused all-reduce + residual + RMSNorm (fused_allreduce_rmsnorm, "
            "forward_with_allreduce_fusion, layer-boundary fusion candidates)"
            if _config.fuse_enabled() else " (fusion off: CCL_SGLANG_FUSE=0)",
        )
    if not _state.get("atexit"):
        _state["atexit"] = True
        atexit.register(_write_stats_at_exit)
    for name in _config.TARGETS:
        module = sys.modules.get(name)
        if module is not None:
            _apply(name, module)


def _write_stats_at_exit() -> None:
    ops = sys.modules.get("ccl_sglang._ops")
    if ops is not None and ops._entries:
        try:
            ops.write_stats()
        except OSError as e:
            logger.warning("ccl_sglang: could not write CCL_SGLANG_STATS: %s", e)


def disable() -> list:
    """Undoes enable() in this process: restores every patched entry point, removes the
    import hook, closes the ccl communicators of the routed groups. Returns the restored
    names. Local (call it on every rank: the groups fall back to SGLang's path)."""
    finder = _state["finder"]
    if finder is not None and finder in sys.meta_path:
        sys.meta_path.remove(finder)
    _state.update(enabled=False, finder=None, patched={})
    patches = sys.modules.get("ccl_sglang._patches")
    restored = patches.restore_all() if patches is not None else []
    ops = sys.modules.get("ccl_sglang._ops")
    if ops is not None:
        for e in ops._entries:
            comm = e.comm
            ops.remove_group(e)
            if comm is not None:
                comm.close()
    return restored
