"""vLLM device communicators whose tensor-parallel all-reduce runs through ccl.

``CclCpuCommunicator``, ``CclCudaCommunicator`` and ``CclXpuCommunicator`` are vLLM's
``CpuCommunicator`` / ``CudaCommunicator`` / ``XpuCommunicator`` with :class:`CclRouting`
mixed in front. vLLM builds one per process group in ``GroupCoordinator.__init__`` from the
qualname that the platform's ``get_device_communicator_cls()`` returns (the plugin patches it),
inside every worker process. The classes are created on first attribute access (module
``__getattr__``), so importing this module never imports the communicator of a platform the
process does not run on.

Only ``tp*`` groups get a ccl communicator; every other group, and every payload ccl does not
carry (over capacity, unsupported dtype or layout), stays on vLLM's own path. vLLM's gather,
all-gather, broadcast and send/recv are untouched.
"""

import importlib
import inspect
import logging

import torch

from ccl_vllm import _ops

logger = logging.getLogger("vllm.ccl_vllm")

__all__ = ["OURS", "CclRouting", "make_communicator_cls"]

_VLLM_DC = "vllm.distributed.device_communicators"
# vLLM communicator qualname -> (our class name, whether all_reduce works in place).
# CpuCommunicator.all_reduce mutates and returns its argument (cpu_communicator.py:84-86);
# CudaCommunicator / XpuCommunicator return a new tensor.
_CLASSES = {
    f"{_VLLM_DC}.cpu_communicator.CpuCommunicator": ("CclCpuCommunicator", True),
    f"{_VLLM_DC}.cuda_communicator.CudaCommunicator": ("CclCudaCommunicator", False),
    f"{_VLLM_DC}.xpu_communicator.XpuCommunicator": ("CclXpuCommunicator", False),
}
#: vLLM communicator qualname -> the qualname of its ccl-routing subclass.
OURS = {base: f"{__name__}.{name}" for base, (name, _) in _CLASSES.items()}
_BASE_OF = {name: (base, in_place) for base, (name, in_place) in _CLASSES.items()}


class CclRouting:
    """Mixin for a vLLM ``DeviceCommunicatorBase`` subclass: ``all_reduce`` through ccl.

    Construction (collective over the group's gloo ``cpu_group``, in group-creation order,
    like every vLLM communicator): for a ``tp*`` group, every rank checks that it can build
    a ccl communicator, the ranks agree, they build ``ccl.Communicator(cpu_group)`` (CPU) or
    ``ccl.Communicator(cpu_group, device=device)`` (GPU), and agree again; if any rank
    cannot, none uses ccl and the reason is logged once. The group is registered with the
    ops either way (``_ccl_handle``), so that a compiled graph that names the handle still
    runs, through vLLM's path.
    """

    _ccl_in_place = True
    _ccl_handle = -1
    _ccl_comm = None
    _ccl_off_reason = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if str(self.unique_name).startswith("tp"):
            self._ccl_setup()

    # ------------------------------------------------------------------ the op
    def all_reduce(self, input_):
        if self._ccl_comm is None:
            return super().all_reduce(input_)
        out = input_ if self._ccl_in_place else input_.clone()
        if torch.compiler.is_compiling():
            torch.ops.ccl.all_reduce_(out, self._ccl_handle)
        else:  # eager: call the impl directly, the dispatcher costs several µs per call
            _ops.all_reduce_(out, self._ccl_handle)
        return out

    def _ccl_base_all_reduce(self, x: torch.Tensor) -> None:
        """vLLM's own all-reduce of this group, in place (the ops' fallback)."""
        y = super().all_reduce(x)
        if y is not x:
            x.copy_(y)

    def destroy(self):
        comm, self._ccl_comm = self._ccl_comm, None
        if self._ccl_handle >= 0:
            _ops.remove_communicator(self._ccl_handle)
            _ops.write_stats()
        if comm is not None:
            comm.close()
        super().destroy()

    # ------------------------------------------------------------------ set-up
    def _ccl_setup(self) -> None:
        reason = _stateless_reason(self.cpu_group)
        comm = None
        if reason is None:  # same answer on every rank: no collective needed to skip
            reason = self._ccl_agree(_local_reason(self.device))
        if reason is None:
            err = None
            try:
                comm = _make_communicator(self.cpu_group, self.device)
                if getattr(comm, "transport", "host") == "fallback":
                    # No mailboxes (e.g. GPUs that cannot map each other): ccl would send
                    # everything to its wrapped backend, which is no better than vLLM's path.
                    err = f"no ccl mailboxes on {self.device}: {comm.fallback_reason}"
            except Exception as e:  # noqa: BLE001 - any failure: fall back, say why
                err = f"{type(e).__name__}: {e}"
            reason = self._ccl_agree(err)
            if reason is not None and comm is not None:
                comm.close()
                comm = None
        self._ccl_handle = _ops.add_communicator(
            comm, self._ccl_base_all_reduce, device_type=self.device.type, name=self.unique_name
        )
        if comm is None:
            self._ccl_off_reason = reason
            logger.warning(
                "ccl_vllm: %s all-reduce stays on vLLM's %s path: %s (set CCL_VLLM=0 to "
                "silence)", self.unique_name, _vllm_base(self).__name__, reason,
            )
            return
        self._ccl_comm = comm
        logger.info(
            "ccl_vllm: %s rank %d/%d all-reduce through ccl %s mailboxes (handle %d, up to "
            "%d B per call; larger payloads use vLLM's path)",
            self.unique_name, comm.rank, comm.world_size, getattr(comm, "transport", "?"),
            self._ccl_handle, comm.max_bytes,
        )

    def _ccl_agree(self, local: str | None) -> str | None:
        """All-gathers each rank's reason to stay off; the first one (with its rank) or None.
        Collective over the gloo cpu_group."""
        gathered: list = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, local, group=self.cpu_group)
        for r, why in enumerate(gathered):
            if why is not None:
                return f"rank {r}: {why}"
        return None


def _vllm_base(obj) -> type:
    mro = type(obj).__mro__
    return mro[mro.index(CclRouting) + 1]


def _stateless_reason(cpu_group) -> str | None:
    from torch.distributed.distributed_c10d import _world

    if _world.pg_map.get(cpu_group) is None:
        return "stateless process group (no torch.distributed store to bootstrap from)"
    return None


def _local_reason(device: torch.device) -> str | None:
    """Why this process cannot build a ccl communicator for ``device`` (None: it can try)."""
    try:
        import ccl
    except Exception as e:  # noqa: BLE001
        return f"cannot import ccl ({type(e).__name__}: {e})"
    if device.type != "cpu" and "device" not in inspect.signature(ccl.Communicator).parameters:
        return (
            f"this mailbox-ccl build has no {device.type} communicator (ccl.Communicator takes "
            "no device= argument yet)"
        )
    return None


def _make_communicator(cpu_group, device: torch.device):
    import ccl

    if device.type == "cpu":
        return ccl.Communicator(cpu_group)
    return ccl.Communicator(cpu_group, device=device)


def make_communicator_cls(base: type, name: str, *, in_place: bool) -> type:
    """The class ``name(CclRouting, base)``: ``base`` with its all_reduce routed through ccl.
    ``in_place`` says whether ``base.all_reduce`` mutates and returns its input."""
    return type(
        name,
        (CclRouting, base),
        {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"vLLM's {base.__name__} with the TP all-reduce routed through ccl.",
            "_ccl_in_place": in_place,
        },
    )


def __getattr__(name: str):
    try:
        base_qualname, in_place = _BASE_OF[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module, _, cls_name = base_qualname.rpartition(".")
    base = getattr(importlib.import_module(module), cls_name)
    cls = make_communicator_cls(base, name, in_place=in_place)
    globals()[name] = cls
    return cls
