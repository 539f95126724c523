"""Multi-process test harness: persistent rank processes that run test functions.

A :class:`RankPool` starts ``world`` Python processes (``subprocess`` + a socketpair per rank,
no fork of the pytest process), each bootstrapped once with a gloo process group on a private
TCPStore (``boot="gloo"``) or left bare (``boot="none"``, for the env / mpi bootstrap tests).
Test functions are sent to every rank as ``fn(ctx, *args)`` (pickled by reference, so they
must live at module level in a module importable from ``tests/``); each rank's return value,
or its exception with traceback, comes back to the parent, which fails with every rank's
story in one message.

Torch costs ~1-2 s per process to import, so pools are kept for the whole session
(:class:`PoolManager`, fixture ``pools`` in conftest.py). A pool that saw a failure, a hang or
a killed rank is thrown away and rebuilt for the next test, so one broken test never poisons
the next.

Shared helpers for rank functions live here too: deterministic inputs from a shared seed (every
rank can regenerate every rank's input, so references need no data transfer), the reference
semantics of every op (DESIGN.md §4, written independently of ccl.kernels.reference), bit views
and per-dtype tolerances.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)

# Environment of the rank processes: no inherited launcher variables (a CI runner started by
# torchrun must not leak RANK into the gloo-bootstrapped pools).
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                  "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
_BOOT_TIMEOUT_S = 180.0  # 4 processes importing torch on 2 busy cores


# ====================================================================== seeds and data
def fresh_seed() -> int:
    """A new seed per test (``CCL_TEST_SEED`` pins it to reproduce a failure)."""
    pinned = os.environ.get("CCL_TEST_SEED")
    if pinned:
        return int(pinned)
    return int.from_bytes(os.urandom(6), "little") ^ time.time_ns() & 0xFFFF_FFFF_FFFF


def mix(*parts: Any) -> int:
    """A 63-bit seed from any tuple of reprs (stable across processes, unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def gen(seed: int, key: Any, shape, dtype, scale: float = 1.0):
    """Standard-normal tensor (times ``scale``) for (seed, key), identical in every process."""
    import torch

    g = torch.Generator().manual_seed(mix(seed, key))
    return (torch.randn(tuple(shape), generator=g) * scale).to(dtype)


def bits(t):
    """Integer view of a tensor's bytes: torch.equal on it is bitwise equality (NaN-safe)."""
    import torch

    t = t.contiguous()
    ints = {4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.uint8}
    return t.view(ints[t.element_size()])


def bits_equal(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool((bits(a) == bits(b)).all())


def digest(*tensors) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(bits(t).numpy().tobytes())
    return h.hexdigest()


def poison_like(t):
    """A tensor shaped like ``t`` filled with NaN: catches every element a kernel forgets."""
    import torch

    return torch.full(t.shape, float("nan"), dtype=t.dtype)


# Tolerances of the normalised outputs against the float64 reference: one rounding of the
# output dtype plus fp32 accumulation error over a few thousand squares.
TOL = {
    "float32": dict(rtol=5e-5, atol=1e-5),
    "bfloat16": dict(rtol=1.6e-2, atol=1e-4),
    "float16": dict(rtol=2e-3, atol=1e-5),
}


def tol(dtype) -> dict:
    return TOL[str(dtype).replace("torch.", "")]


def first_diff(actual, expected, **kw) -> str | None:
    """None when actual ~= expected (kw: rtol/atol; none means bitwise), else a description."""
    import torch

    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return f"shape/dtype {tuple(actual.shape)}/{actual.dtype} != {tuple(expected.shape)}/{expected.dtype}"
    if not kw:
        bad = bits(actual) != bits(expected)
    else:
        a, e = actual.double(), expected.double()
        bad = ~torch.isclose(a, e, rtol=kw["rtol"], atol=kw["atol"])
    if not bool(bad.any()):
        return None
    idx = bad.flatten().nonzero()[:5].flatten().tolist()
    af, ef = actual.flatten(), expected.flatten()
    pairs = ", ".join(f"[{i}] {af[i].item()!r} vs {ef[i].item()!r}" for i in idx)
    return f"{int(bad.sum())}/{bad.numel()} elements differ, first: {pairs}"


# ====================================================================== references (§4)
def ref_sum(parts):
    """fp32 sum in rank order 0..N-1, stored in the inputs' dtype (exact spec of the kernel)."""
    acc = parts[0].float().clone()
    for p in parts[1:]:
        acc += p.float()
    return acc.to(parts[0].dtype)


def ref_add_rms_norm(parts, residual, weight, eps, gemma=False):
    """(out, residual_out). residual_out is exact (fp32 sum in rank order + residual, rounded
    once); out is computed in float64 from the fp32 residual_out (compare with ``tol``)."""
    import torch

    acc = parts[0].float().clone()
    for p in parts[1:]:
        acc += p.float()
    if residual is not None:
        acc = acc + residual.float()
    r = acc.double()
    w = weight.double() + (1.0 if gemma else 0.0)
    inv = torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
    return (r * inv * w).to(parts[0].dtype), acc.to(parts[0].dtype)


def ref_qk_rms_norm(q_parts, k_parts, q_ws, k_ws, eps):
    """Per rank (q_out, k_out), float64 math over the concatenated (full) head dimension."""
    import torch

    q_full = torch.cat([q.double() for q in q_parts], -1)
    k_full = torch.cat([k.double() for k in k_parts], -1)
    iq = torch.rsqrt(q_full.pow(2).mean(-1, keepdim=True) + eps)
    ik = torch.rsqrt(k_full.pow(2).mean(-1, keepdim=True) + eps)
    dt = q_parts[0].dtype
    return [
        ((q.double() * iq * qw.double()).to(dt), (k.double() * ik * kw.double()).to(dt))
        for q, k, qw, kw in zip(q_parts, k_parts, q_ws, k_ws)
    ]


# ====================================================================== rank side
class RankContext:
    """What a rank function receives as its first argument."""

    def __init__(self, rank: int, world: int, boot: str):
        self.rank = rank
        self.world = world
        self.boot = boot
        self.cache: dict[Any, Any] = {}  # survives between calls on one pool

    def comm(self, **kw):
        """A communicator cached on this pool by its kwargs (identical on every rank)."""
        import ccl

        kw.setdefault("timeout", 60.0)
        key = ("comm", tuple(sorted(kw.items())))
        c = self.cache.get(key)
        if c is None or c.closed:
            c = ccl.Communicator(**kw)
            self.cache[key] = c
        return c

    @contextlib.contextmanager
    def capture_logs(self, name: str = "ccl", level=logging.DEBUG):
        """Collects log records of logger ``name`` (and children) into a list."""
        records: list[logging.LogRecord] = []

        class _H(logging.Handler):
            def emit(self, record):
                records.append(record)

        h = _H(level)
        lg = logging.getLogger(name)
        old = lg.level
        lg.addHandler(h)
        lg.setLevel(level)
        try:
            yield records
        finally:
            lg.removeHandler(h)
            lg.setLevel(old)

    def close_all(self):
        for v in self.cache.values():
            close = getattr(v, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        self.cache.clear()


def _send(conn: Connection, obj) -> None:
    conn.send_bytes(pickle.dumps(obj))


def _recv(conn: Connection):
    return pickle.loads(conn.recv_bytes())


def _error_info(e: BaseException) -> dict:
    info = {
        "type": type(e).__name__,
        "module": type(e).__module__,
        "message": str(e),
        "traceback": traceback.format_exc(),
    }
    for attr in ("missing_ranks", "peer", "rank", "timeout_s"):
        if hasattr(e, attr):
            info[attr] = getattr(e, attr)
    return info


def worker_main() -> None:  # pragma: no cover - runs in the rank processes
    fd = int(os.environ.pop("CCL_TEST_HARNESS_FD"))
    rank = int(os.environ.pop("CCL_TEST_HARNESS_RANK"))
    world = int(os.environ.pop("CCL_TEST_HARNESS_WORLD"))
    boot = os.environ.pop("CCL_TEST_HARNESS_BOOT")
    conn = Connection(fd)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"[rank {rank} pid {os.getpid()}] %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)
    if boot == "gloo":
        from datetime import timedelta

        import torch.distributed as dist

        timeout = timedelta(seconds=_BOOT_TIMEOUT_S)
        if rank == 0:
            store = dist.TCPStore("127.0.0.1", 0, world, True, timeout=timeout,
                                  wait_for_workers=False)
            _send(conn, ("port", store.port))
        else:
            store = dist.TCPStore("127.0.0.1", _recv(conn), world, False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    import ccl  # noqa: F401  (import cost paid before the first test)

    ctx = RankContext(rank, world, boot)
    _send(conn, ("ready", os.getpid()))
    while True:
        try:
            msg = _recv(conn)
        except (EOFError, OSError):
            break
        if msg[0] == "exit":
            break
        _, fn, args, kwargs = msg
        try:
            reply = ("ok", fn(ctx, *args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            reply = ("err", _error_info(e))
        try:
            data = pickle.dumps(reply)
        except Exception as e:  # noqa: BLE001
            data = pickle.dumps(("err", {"type": "PicklingError", "module": "",
                                         "message": f"cannot pickle the result: {e!r}",
                                         "traceback": traceback.format_exc()}))
        try:
            conn.send_bytes(data)
        except OSError:
            break
        sys.stdout.flush()
        sys.stderr.flush()
    ctx.close_all()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: a process group whose peers are gone can block in its
    # destructor, and nothing here needs an orderly exit.
    os._exit(0)


# ====================================================================== parent side
class RankFailure(AssertionError):
    """One or more ranks failed; the message tells every rank's story."""


@dataclass
class Outcome:
    rank: int
    status: str  # "ok" | "err" | "dead" | "hung"
    value: Any = None
    error: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self, log_tail: str = "") -> str:
        if self.status == "ok":
            return f"rank {self.rank}: ok"
        if self.status == "err":
            e = self.error
            return (f"rank {self.rank}: raised {e['type']}: {e['message']}\n"
                    + _indent(e.get("traceback", "")))
        return f"rank {self.rank}: {self.error.get('message', self.status)}\n" + _indent(log_tail)


def _indent(text: str, pad: str = "    | ") -> str:
    return "".join(pad + line + "\n" for line in text.rstrip().splitlines()) if text else ""


class RankPool:
    """RankPool(world, boot="gloo", env=None)

    ``world`` persistent rank processes. ``boot="gloo"`` initialises torch.distributed (gloo)
    in each; ``boot="none"`` leaves them bare. ``env`` maps rank -> extra environment variables.
    """

    def __init__(self, world: int, boot: str = "gloo", env: dict[int, dict] | None = None):
        self.world = world
        self.boot = boot
        self.healthy = True
        self._busy = False
        self._logdir = tempfile.mkdtemp(prefix=f"ccl-test-w{world}-")
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self.pids: list[int] = []
        # A pool dropped without close() (or left at interpreter exit) still kills its ranks
        # and removes its logs.
        self._finalizer = weakref.finalize(self, _reap, self.procs, self._logdir)
        try:
            self._start(env or {})
        except BaseException:
            self.close()
            raise

    def _log_path(self, rank: int) -> str:
        return os.path.join(self._logdir, f"rank{rank}.log")

    def log_tail(self, rank: int, lines: int = 30) -> str:
        try:
            with open(self._log_path(rank), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def _start(self, env: dict[int, dict]) -> None:
        base = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
        base["PYTHONPATH"] = os.pathsep.join(
            [TESTS_DIR, REPO_DIR] + [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        base.setdefault("OMP_NUM_THREADS", "1")
        base["PYTHONUNBUFFERED"] = "1"
        for r in range(self.world):
            parent, child = socket.socketpair()
            e = dict(base)
            e.update({k: str(v) for k, v in env.get(r, {}).items()})
            e.update(CCL_TEST_HARNESS_FD=str(child.fileno()), CCL_TEST_HARNESS_RANK=str(r),
                     CCL_TEST_HARNESS_WORLD=str(self.world), CCL_TEST_HARNESS_BOOT=self.boot)
            with open(self._log_path(r), "wb") as log:
                p = subprocess.Popen(
                    [sys.executable, "-c", "import _harness; _harness.worker_main()"],
                    env=e, cwd=REPO_DIR, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT,
                )
            child.close()
            self.procs.append(p)
            self.conns.append(Connection(parent.detach()))
        deadline = time.monotonic() + _BOOT_TIMEOUT_S
        if self.boot == "gloo":
            kind, port = self._recv_boot(0, deadline)
            assert kind == "port", kind
            for r in range(1, self.world):
                _send(self.conns[r], port)
        self.pids = [0] * self.world
        for r in range(self.world):
            kind, pid = self._recv_boot(r, deadline)
            assert kind == "ready", kind
            self.pids[r] = pid

    def _recv_boot(self, r: int, deadline: float):
        conn = self.conns[r]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"rank {r} did not start within {_BOOT_TIMEOUT_S:.0f}s:\n"
                                   + self.log_tail(r))
            if conn.poll(min(left, 0.5)):
                try:
                    return _recv(conn)
                except EOFError:
                    pass
                raise RuntimeError(f"rank {r} died while starting (exit code "
                                   f"{self.procs[r].wait(5)}):\n{self.log_tail(r)}")
            if self.procs[r].poll() is not None:
                raise RuntimeError(f"rank {r} exited while starting (exit code "
                                   f"{self.procs[r].returncode}):\n{self.log_tail(r)}")

    # ------------------------------------------------------------------ running
    def submit(self, fn: Callable, *args, ranks=None, **kwargs) -> None:
        """Sends ``fn(ctx, *args, **kwargs)`` to ``ranks`` (default all) without waiting."""
        if not self.healthy:
            raise RuntimeError("this pool is broken; get a new one")
        if getattr(fn, "__module__", None) == "__main__":
            raise ValueError("rank functions must live in an importable module, not __main__")
        payload = pickle.dumps(("run", fn, args, kwargs))
        self._busy = True
        for r in (range(self.world) if ranks is None else ranks):
            self.conns[r].send_bytes(payload)

    def gather(self, timeout: float, ranks=None, grace: float = 5.0) -> list[Outcome]:
        """Waits for ``ranks`` (default all) up to ``timeout`` s. Once one rank has failed the
        others get ``grace`` s more (they are usually stuck in a collective it left)."""
        ranks = list(range(self.world)) if ranks is None else list(ranks)
        outcomes: dict[int, Outcome] = {}
        deadline = time.monotonic() + timeout
        pending = {self.conns[r]: r for r in ranks}
        failed = False
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for conn in wait(list(pending), timeout=min(left, 0.25)):
                r = pending.pop(conn)
                try:
                    kind, value = _recv(conn)
                except (EOFError, OSError):
                    code = self.procs[r].wait(5)
                    outcomes[r] = Outcome(r, "dead", error={
                        "message": f"process died (exit code {code}, pid {self.pids[r]})"})
                    failed = True
                    continue
                if kind == "ok":
                    outcomes[r] = Outcome(r, "ok", value=value)
                else:
                    outcomes[r] = Outcome(r, "err", error=value)
                    failed = True
            if failed:
                deadline = min(deadline, time.monotonic() + grace)
        for conn, r in pending.items():
            outcomes[r] = Outcome(r, "hung", error={
                "message": f"no answer within the harness deadline ({timeout:.0f}s, or "
                           f"{grace:.0f}s after another rank failed)"})
        result = [outcomes[r] for r in ranks]
        if pending or any(not o.ok for o in result):
            self.healthy = False  # ranks may be out of step: rebuild before reuse
        if not pending:
            self._busy = False
        return result

    def run(self, fn: Callable, *args, timeout: float = 120.0, note: str = "", **kwargs) -> list:
        """Runs ``fn(ctx, *args, **kwargs)`` on every rank; returns the values in rank order,
        or raises :class:`RankFailure` describing every rank."""
        self.submit(fn, *args, **kwargs)
        outcomes = self.gather(timeout)
        check(outcomes, self, f"{getattr(fn, '__qualname__', fn)}", note)
        return [o.value for o in outcomes]

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> None:
        self.healthy = False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pids[rank], sig)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                if not self._busy:
                    _send(conn, ("exit",))
        for p in self.procs:
            try:
                p.wait(2 if not self._busy else 0.01)
            except subprocess.TimeoutExpired:
                pass
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()
        self.conns = []
        self.healthy = False
        self._finalizer()  # reaps what is left and removes the logs (once)

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reap(procs: list[subprocess.Popen], logdir: str) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
    procs.clear()
    shutil.rmtree(logdir, ignore_errors=True)


def check(outcomes: list[Outcome], pool: RankPool | None, what: str = "", note: str = "") -> None:
    """Raises RankFailure unless every outcome is ok."""
    if all(o.ok for o in outcomes):
        return
    lines = [f"{what} failed on rank(s) {[o.rank for o in outcomes if not o.ok]}"
             + (f" [{note}]" if note else "")]
    for o in outcomes:
        tail = pool.log_tail(o.rank) if pool is not None and o.status in ("dead", "hung") else ""
        lines.append(o.describe(tail))
    raise RankFailure("\n".join(lines))


class PoolManager:
    """Session-wide gloo pools, one per world size, rebuilt after a failure."""

    def __init__(self):
        self._pools: dict[int, RankPool] = {}

    def get(self, world: int) -> RankPool:
        p = self._pools.get(world)
        if p is not None and (not p.healthy or p._busy
                              or any(q.poll() is not None for q in p.procs)):
            p.close()
            p = None
        if p is None:
            p = self._pools[world] = RankPool(world)
        return p

    def close(self) -> None:
        for p in self._pools.values():
            p.close()
        self._pools.clear()
