"""Process launch for the command-line tools (``ccl-bench``, ``ccl-probe``).

Three ways to run a tool on N ranks:

- **spawn** (no launcher): the command spawns ``--ranks`` copies of itself
  (``python -m <module> ...``) and hosts a TCPStore on a free port for them; the children see
  ``CCL_CLI_LAUNCHER=spawn`` plus RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
- **mpi** (``mpiexec -n N ccl-bench``): bootstrap through mpi4py; rank 0 hosts a TCPStore on a
  free port and broadcasts it, so a gloo group (the baseline) can be built beside MPI.
- **torchrun** (RANK / WORLD_SIZE set): ``torch.distributed.rendezvous("env://")``, which also
  handles torchrun's agent-hosted store.

Every rank ends up with a :class:`Worker`: rank, world size, a store, optionally the default
gloo process group, and bounded small-object all-gathers. Nothing here prints.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

__all__ = ["Worker", "detect_launcher", "spawn", "join", "machine_info", "rank_info"]

_LAUNCHER_ENV = "CCL_CLI_LAUNCHER"
# Variables that would make a spawned child think it runs under MPI.
_MPI_ENV_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "HYDRA_", "MV2_")


def _mpi_world_from_env(env) -> int:
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    mpi = sys.modules.get("mpi4py.MPI")  # already initialised by the caller: ask it
    if mpi is not None:
        return mpi.COMM_WORLD.Get_size()
    return 0


def detect_launcher(env=None) -> str:
    """ "spawn-worker", "mpi", "torchrun" or "none" (nothing launched us: spawn the ranks)."""
    env = os.environ if env is None else env
    if env.get(_LAUNCHER_ENV) == "spawn":
        return "spawn-worker"
    if _mpi_world_from_env(env) > 1:
        return "mpi"
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    return "none"


def _host_store(timeout_s: float):
    """A TCPStore server on a free port (port 0: no pick-then-bind race)."""
    import torch.distributed as dist

    return dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )


def spawn(module: str, argv: list[str], ranks: int, *, timeout_s: float) -> int:
    """Runs ``python -m module *argv`` as ``ranks`` local ranks; returns their exit status.

    The first child that fails (or the overall ``timeout_s``) ends the others: a crashed rank
    must not leave its peers waiting. Rank 0 inherits stdout; every rank inherits stderr.
    """
    store = _host_store(timeout_s)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(_MPI_ENV_PREFIXES)}
    base_env.update(
        {
            _LAUNCHER_ENV: "spawn",
            "WORLD_SIZE": str(ranks),
            "LOCAL_WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port),
        }
    )
    procs: list[subprocess.Popen] = []
    try:
        for r in range(ranks):
            env = dict(base_env, RANK=str(r), LOCAL_RANK=str(r))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", module, *argv],
                    env=env,
                    stdout=None if r == 0 else subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + timeout_s
        status = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                how = f"signal {-code}" if code < 0 else f"status {code}"
                status = 128 - code if code < 0 else code
                # A rank reporting failed results exits beside the others; a crashed one
                # leaves them waiting in a collective: after a short grace they are stopped.
                grace = time.monotonic() + 5.0
                while any(p.poll() is None for p in procs) and time.monotonic() < grace:
                    _wait_any(procs, grace - time.monotonic())
                if any(p.poll() is None for p in procs):
                    sys.stderr.write(
                        f"{module}: rank {rank} exited with {how}; stopping the others\n"
                    )
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                sys.stderr.write(
                    f"{module}: ranks still running after {timeout_s:.0f}s, stopping them\n"
                )
                status = 124
                break
            _wait_any(procs, deadline - time.monotonic())
        return status
    except KeyboardInterrupt:
        return 130
    finally:
        _stop(procs)
        del store


def _wait_any(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Sleeps until a child exits or ``timeout_s`` passes, without waking up the machine
    in between (pidfds where available: the ranks are being timed meanwhile)."""
    live = [p for p in procs if p.returncode is None]
    timeout_s = max(0.0, timeout_s)
    try:
        fds = [os.pidfd_open(p.pid) for p in live]
    except (AttributeError, OSError):
        time.sleep(min(timeout_s, 0.2))
        return
    try:
        select.select(fds, [], [], timeout_s)
    finally:
        for fd in fds:
            os.close(fd)


def _stop(procs: list[subprocess.Popen]) -> None:
    """Ends the children we started (by their own handle), politely first."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@dataclass
class Worker:
    """One rank's view of the job: identity, a store, optionally the default gloo group."""

    rank: int
    world_size: int
    launcher: str  # "spawn", "mpi" or "torchrun"
    store: Any
    timeout_s: float
    mpi_comm: Any = None
    gloo: bool = False
    _round: int = field(default=0, repr=False)

    def all_gather(self, obj: Any) -> list[Any]:
        """Small-object all-gather (collective), bounded by the store timeout."""
        from ccl.rendezvous import StoreExchange

        self._round += 1
        return StoreExchange(
            self.store, self.rank, self.world_size, f"ccl-cli/{self._round}"
        ).all_gather(obj)

    def barrier(self) -> None:
        """Collective: returns once every rank reached it."""
        if self.gloo:
            import torch.distributed as dist

            dist.barrier()
        else:
            self.all_gather(None)

    def make_communicator(self, **kwargs):
        """The ccl.Communicator for this job, bootstrapped the way the job was launched."""
        from ccl import Communicator

        if self.mpi_comm is not None:
            return Communicator(self.mpi_comm, **kwargs)
        if not self.gloo:
            raise RuntimeError("make_communicator needs join(..., gloo=True) outside MPI")
        return Communicator(None, **kwargs)  # the default (gloo) process group

    def close(self) -> None:
        """Collective: tears down the gloo group; the rank hosting the store leaves last."""
        if self.gloo:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.gloo = False
        # Under MPI rank 0 hosts the store: it must outlive every peer's last store access.
        left = self.store.add("ccl-cli/exit", 1)
        deadline = time.monotonic() + min(self.timeout_s, 30.0)
        while self.rank == 0 and left < self.world_size and time.monotonic() < deadline:
            time.sleep(0.005)
            left = self.store.add("ccl-cli/exit", 0)


def join(launcher: str, *, timeout_s: float, gloo: bool) -> Worker:
    """Called in every rank: connects to the job the launcher started.

    With ``gloo=True`` the default torch.distributed process group is a gloo group over the
    job's store (the baseline of ``ccl-bench`` and the Communicator's wrapped backend).
    """
    import torch.distributed as dist

    mpi_comm = None
    if launcher == "spawn-worker":
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            None,
            False,
            timeout=timedelta(seconds=timeout_s),
        )
        launcher = "spawn"
    elif launcher == "mpi":
        from mpi4py import MPI

        mpi_comm = MPI.COMM_WORLD
        rank, world = mpi_comm.Get_rank(), mpi_comm.Get_size()
        server = _host_store(timeout_s) if rank == 0 else None
        port = mpi_comm.bcast(server.port if server is not None else None, root=0)
        # The host transport needs one node, so the loopback address reaches rank 0.
        store = (
            server
            if server is not None
            else dist.TCPStore("127.0.0.1", port, None, False, timeout=timedelta(seconds=timeout_s))
        )
    elif launcher == "torchrun":
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store, rank, world = next(
            dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=timeout_s))
        )
    else:
        raise ValueError(f"unknown launcher {launcher!r}")
    if gloo:
        dist.init_process_group(
            "gloo",
            store=dist.PrefixStore("ccl-cli/gloo", store),
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
    return Worker(rank, world, launcher, store, timeout_s, mpi_comm=mpi_comm, gloo=gloo)


# ---------------------------------------------------------------------- descriptions
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What a result file needs to say where it was measured."""
    import platform

    import torch

    import ccl

    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ccl": ccl.__version__,
    }


def rank_info(rank: int) -> dict[str, Any]:
    """One line per rank in the output header (nccl-tests style)."""
    import platform

    import torch

    try:
        affinity = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = []
    return {
        "rank": rank,
        "pid": os.getpid(),
        "host": platform.node(),
        "affinity": affinity,
        "torch_threads": torch.get_num_threads(),
    }


def cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)
