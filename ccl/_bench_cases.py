"""What ``ccl-bench`` measures: one :class:`Case` per (op, dtype, size), with its inputs, the
ccl calls, the same-run baseline calls, and the correctness checks against
``ccl.kernels.reference``.

Device-specific pieces sit behind two small tables so a GPU backend can be plugged in by
adding entries, without touching the bench loop:

- ``TIMERS[device]``: how a block of calls is timed (CPU: ``time.perf_counter_ns`` around
  each call; a GPU timer would capture the calls in a graph and replay them between events);
- ``BASELINES[(device, op)]``: the baseline composition (CPU: gloo all_reduce + torch).

Inputs are deterministic per (seed, op, size, rotation, rank), so every rank computes the
reference from every rank's inputs without communicating. Each case holds ``NROT`` input
sets used in rotation (call i uses set i % NROT, with its own output buffer): a stale slot
from call i-2 then carries different data than call i, and after a block the last NROT
outputs can all be checked. Nothing is allocated inside a timed call of ccl.
"""

from __future__ import annotations

import functools
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ccl import tuning
from ccl.kernels.reference import (
    add_rms_norm_reference_parts,
    all_reduce_reference,
    qk_rms_norm_reference,
)

__all__ = [
    "OPS",
    "SHORT_NAMES",
    "TIMED_FORMS",
    "Case",
    "CaseConfig",
    "build_case",
    "case_sizes",
    "TIMERS",
]

OPS = ("all_reduce", "all_reduce_add_rms_norm", "qk_rms_norm")
SHORT_NAMES = {
    "all_reduce": "allreduce",
    "all_reduce_add_rms_norm": "ar_rmsnorm",
    "qk_rms_norm": "qk_rmsnorm",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NROT = 3
EPS = 1e-6

# (rtol, atol) for the normalised outputs; all_reduce on the mailbox path must be bitwise.
_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}


@dataclass
class CaseConfig:
    device: str
    dtype: torch.dtype
    seed: int
    hidden: int  # all_reduce_add_rms_norm: rows x min(numel, hidden)
    qk_dims: tuple[int, int]  # qk_rms_norm: full (all-rank) q and k widths
    qk_max_tokens: int
    fallback: str  # name of the Communicator's wrapped backend: "gloo" or "mpi"
    tune: bool = False


@dataclass
class Case:
    """One benchmark point. ``impls[name]`` holds NROT zero-argument calls (one per input
    set); "ccl" and "base" always, "one_shot" / "two_shot" with --tune."""

    op: str
    dtype: torch.dtype
    size_bytes: int  # bytes all-reduced per rank (qk_rms_norm: the [tokens, 2] fp32 sums)
    count: int  # elements (qk_rms_norm: tokens)
    shape: str
    algo: str  # "1shot", "2shot", or the wrapped backend's name
    impls: dict[str, list[Callable[[], object]]]
    checked: frozenset[str]  # impls whose outputs are checked after every block
    poison: Callable[[], None]
    check: Callable[[], int]  # wrong outputs among the NROT output buffers
    digest: Callable[[], object] | None  # identical on every rank, when the op promises that
    base_verified: bool
    notes: dict = field(default_factory=dict)
    # Untimed calls that produce the checked outputs, per impl (run after each timed block,
    # before ``check``), for impls whose timed form cannot be checked (in place on a zero
    # buffer); None: the timed calls write the checked outputs themselves.
    verify: Callable[[str], None] | None = None
    checks_per_block: int = NROT  # outputs compared by one ``check()``


# ---------------------------------------------------------------------- timing backends
class CpuTimer:
    """Times each call with ``time.perf_counter_ns``: both clock reads sit right around the
    call, the sample is stored after the second read."""

    name = "perf_counter_ns per call"

    def run(self, calls: list[Callable[[], object]], n: int) -> list[int]:
        seq = (calls * (n // len(calls) + 1))[:n]
        pc = time.perf_counter_ns
        out: list[int] = []
        append = out.append
        for f in seq:
            t0 = pc()
            f()
            t1 = pc()
            append(t1 - t0)
        return out

    def untimed(self, calls: list[Callable[[], object]], n: int) -> None:
        for i in range(n):
            calls[i % len(calls)]()

    def overhead_ns(self) -> float:
        """Median cost of an empty timed call (reported in the header)."""
        ts = self.run([_noop], 2001)
        ts.sort()
        return float(ts[len(ts) // 2])


def _noop() -> None:
    return None


TIMERS: dict[str, type] = {"cpu": CpuTimer}


# ---------------------------------------------------------------------- sizes and shapes
def case_sizes(op: str, sizes: list[int], cfg: CaseConfig, capacity: int) -> list[int]:
    """Sizes of the sweep that ``op`` runs at (qk_rms_norm: 8 B per token, up to the cap)."""
    esize = torch.empty((), dtype=cfg.dtype).element_size()
    if op == "qk_rms_norm":
        return [s for s in sizes if s % 8 == 0 and s // 8 <= cfg.qk_max_tokens and s <= capacity]
    return [s for s in sizes if s % esize == 0]


def _algo(nbytes: int, world: int, capacity: int, fallback: str) -> str:
    if nbytes > capacity:
        return fallback
    return "2shot" if nbytes > tuning.two_shot_threshold("host", world) else "1shot"


def _gen(shape, dtype, device, *key) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()) * 7919 + len(key))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype).to(device)


def _digest(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def _poison(tensors: list[torch.Tensor]) -> Callable[[], None]:
    def poison() -> None:
        for t in tensors:
            t.fill_(float("nan"))

    return poison


# ---------------------------------------------------------------------- baselines (CPU)
def _gloo_all_reduce(buf: torch.Tensor) -> Callable[[], object]:
    """dist.all_reduce in place on a zero buffer: stays zero, so no overflow or denormals."""
    import torch.distributed as dist

    return functools.partial(dist.all_reduce, buf)


def _gloo_add_rms_norm(buf, residual, weight, res_out, eps) -> Callable[[], object]:
    """gloo all_reduce, then torch add + F.rms_norm: the unfused framework path."""
    import torch.distributed as dist

    shape = (weight.shape[0],)

    def base():
        dist.all_reduce(buf)
        torch.add(buf, residual, out=res_out)
        return F.rms_norm(res_out, shape, weight, eps)

    return base


def _gloo_qk_rms_norm(q, k, qw, kw, dims, eps) -> Callable[[], object]:
    """Local sums of squares, gloo all_reduce of [tokens, 2] fp32, torch scaling."""
    import torch.distributed as dist

    def base():
        qf, kf = q.float(), k.float()
        ss = torch.stack((qf.square().sum(-1), kf.square().sum(-1)), 1)
        dist.all_reduce(ss)
        inv = torch.rsqrt(ss / dims + eps)
        return (qf * inv[:, :1] * qw.float()).to(q.dtype), (kf * inv[:, 1:] * kw.float()).to(
            k.dtype
        )

    return base


# The call form each side is timed in (recorded in the JSON config and in every result):
# the same form for both where the op has one (all_reduce: in place on a zero buffer, so the
# values neither overflow nor turn denormal; the results are checked on separate, untimed
# calls on real data), otherwise the closest each side offers.
TIMED_FORMS: dict[str, dict[str, str]] = {
    "all_reduce": {
        "ccl": "in place on a zero buffer (comm.all_reduce(buf)); checked on untimed "
        "in-place and out= calls on real data",
        "baseline": "in place on a zero buffer (dist.all_reduce(buf))",
    },
    "all_reduce_add_rms_norm": {
        "ccl": "caller-owned outputs (out=, residual_out=), inputs intact; checked",
        "baseline": "all_reduce in place on a zero buffer, torch.add(out=res_out), "
        "F.rms_norm allocating its output",
    },
    "qk_rms_norm": {
        "ccl": "caller-owned outputs (q_out=, k_out=), inputs intact; checked",
        "baseline": "torch ops allocating their outputs, all_reduce in place on the "
        "[tokens,2] sums",
    },
}

BASELINES: dict[tuple[str, str], tuple[str, Callable]] = {
    ("cpu", "all_reduce"): ("gloo all_reduce (torch.distributed, in place)", _gloo_all_reduce),
    ("cpu", "all_reduce_add_rms_norm"): (
        "gloo all_reduce + torch.add + F.rms_norm",
        _gloo_add_rms_norm,
    ),
    ("cpu", "qk_rms_norm"): (
        "local sum of squares + gloo all_reduce of [tokens,2] fp32 + torch scaling",
        _gloo_qk_rms_norm,
    ),
}


def baseline(device: str, op: str) -> tuple[str, Callable]:
    try:
        return BASELINES[(device, op)]
    except KeyError:
        raise NotImplementedError(f"no {op} baseline for device {device!r} yet") from None


# ---------------------------------------------------------------------- cases
def build_case(op: str, size: int, comm, cfg: CaseConfig) -> Case:
    """Inputs, calls and checks of one point. Collective (verifies the baseline once)."""
    builder = {
        "all_reduce": _all_reduce_case,
        "all_reduce_add_rms_norm": _add_rms_norm_case,
        "qk_rms_norm": _qk_rms_norm_case,
    }[op]
    return builder(size, comm, cfg)


def _all_reduce_case(size: int, comm, cfg: CaseConfig) -> Case:
    dt, dev, world, rank = cfg.dtype, cfg.device, comm.world_size, comm.rank
    numel = size // torch.empty((), dtype=dt).element_size()
    algo = _algo(size, world, comm.max_bytes, cfg.fallback)
    parts = [
        [_gen(numel, dt, dev, cfg.seed, "ar", size, k, r) for r in range(world)]
        for k in range(NROT)
    ]
    xs = [p[rank] for p in parts]
    expected = [all_reduce_reference(p) for p in parts]
    del parts
    outs = [torch.empty_like(x) for x in xs]  # out= results of the untimed checks
    works = [torch.empty_like(x) for x in xs]  # in-place results of the untimed checks
    # Timed: in place on a zero buffer, the baseline's form (a sum of zeros stays zero).
    zero = torch.zeros_like(xs[0])
    algos = {"ccl": None}
    if cfg.tune and size <= comm.max_bytes:
        algos.update(one_shot="one_shot", two_shot="two_shot")
    impls = {n: [functools.partial(comm.all_reduce, zero, algorithm=a)] for n, a in algos.items()}
    exact = algo != cfg.fallback  # the wrapped backend may sum in another order

    def verify(name: str) -> None:
        a = algos[name]
        for x, o, w in zip(xs, outs, works):
            comm.all_reduce(x, out=o, algorithm=a)
            w.copy_(x)
            comm.all_reduce(w, algorithm=a)

    def check() -> int:
        got = outs + works
        want = expected + expected
        bad = int(bool(zero.any()))  # the timed calls must leave the zero buffer zero
        if exact:
            return bad + sum(not torch.equal(o, e) for o, e in zip(got, want))
        rtol, atol = _TOL[dt]
        return bad + sum(
            not torch.allclose(o, e, rtol=rtol, atol=atol) for o, e in zip(got, want)
        )

    # Baseline: verified once on real data, then timed on a zero buffer.
    name, make = baseline(dev, "all_reduce")
    probe = xs[0].clone()
    make(probe)()
    rtol, atol = _TOL[dt]
    base_ok = bool(torch.allclose(probe, expected[0], rtol=rtol, atol=atol))
    impls["base"] = [make(torch.zeros_like(xs[0]))]
    return Case(
        "all_reduce",
        dt,
        size,
        numel,
        f"{numel}",
        algo,
        impls,
        frozenset(impls) - {"base"},
        _poison(outs + works),
        check,
        lambda: (_digest(outs[0]), _digest(works[0])),
        base_ok,
        {"baseline_impl": name, "timed_form": TIMED_FORMS["all_reduce"]},
        verify=verify,
        checks_per_block=2 * NROT + 1,
    )


def _add_rms_norm_case(size: int, comm, cfg: CaseConfig) -> Case:
    dt, dev, world, rank = cfg.dtype, cfg.device, comm.world_size, comm.rank
    numel = size // torch.empty((), dtype=dt).element_size()
    hidden = min(numel, cfg.hidden)
    rows = numel // hidden
    shape = (rows, hidden)
    algo = _algo(size, world, comm.max_bytes, cfg.fallback)
    weight = (1.0 + 0.1 * _gen(hidden, torch.float32, "cpu", cfg.seed, "w", size)).to(dt).to(dev)
    residual = _gen(shape, dt, dev, cfg.seed, "res", size)
    parts = [
        [_gen(shape, dt, dev, cfg.seed, "arn", size, k, r) for r in range(world)]
        for k in range(NROT)
    ]
    xs = [p[rank] for p in parts]
    expected = [add_rms_norm_reference_parts(p, residual, weight, EPS) for p in parts]
    del parts
    outs = [(torch.empty_like(x), torch.empty_like(x)) for x in xs]

    def call(x, o, ro, algorithm=None):
        return functools.partial(
            comm.all_reduce_add_rms_norm,
            x,
            residual,
            weight,
            EPS,
            out=o,
            residual_out=ro,
            algorithm=algorithm,
        )

    impls = {"ccl": [call(x, o, ro) for x, (o, ro) in zip(xs, outs)]}
    if cfg.tune and size <= comm.max_bytes:
        for a in ("one_shot", "two_shot"):
            impls[a] = [call(x, o, ro, a) for x, (o, ro) in zip(xs, outs)]
    rtol, atol = _TOL[dt]

    def check() -> int:
        return sum(
            not (
                torch.allclose(o, eo, rtol=rtol, atol=atol)
                and torch.allclose(ro, ero, rtol=rtol, atol=atol)
            )
            for (o, ro), (eo, ero) in zip(outs, expected)
        )

    name, make = baseline(dev, "all_reduce_add_rms_norm")
    res_out = torch.empty_like(residual)
    out = make(xs[0].clone(), residual, weight, res_out, EPS)()
    base_ok = bool(
        torch.allclose(out, expected[0][0], rtol=rtol, atol=atol)
        and torch.allclose(res_out, expected[0][1], rtol=rtol, atol=atol)
    )
    impls["base"] = [make(torch.zeros_like(xs[0]), residual, weight, res_out, EPS)]
    return Case(
        "all_reduce_add_rms_norm",
        dt,
        size,
        numel,
        f"{rows}x{hidden}",
        algo,
        impls,
        frozenset(impls) - {"base"},
        _poison([t for pair in outs for t in pair]),
        check,
        lambda: _digest(outs[0][0]) ^ _digest(outs[0][1]),
        base_ok,
        {"baseline_impl": name, "timed_form": TIMED_FORMS["all_reduce_add_rms_norm"]},
    )


def _qk_rms_norm_case(size: int, comm, cfg: CaseConfig) -> Case:
    dt, dev, world, rank = cfg.dtype, cfg.device, comm.world_size, comm.rank
    tokens = size // 8
    qc, kc = (max(1, d // world) for d in cfg.qk_dims)
    qws = [
        (1.0 + 0.1 * _gen(qc, torch.float32, "cpu", cfg.seed, "qw", r)).to(dt).to(dev)
        for r in range(world)
    ]
    kws = [
        (1.0 + 0.1 * _gen(kc, torch.float32, "cpu", cfg.seed, "kw", r)).to(dt).to(dev)
        for r in range(world)
    ]
    qs, ks, expected = [], [], []
    for rot in range(NROT):
        qp = [_gen((tokens, qc), dt, dev, cfg.seed, "q", size, rot, r) for r in range(world)]
        kp = [_gen((tokens, kc), dt, dev, cfg.seed, "k", size, rot, r) for r in range(world)]
        expected.append(qk_rms_norm_reference(qp, kp, qws, kws, EPS)[rank])
        qs.append(qp[rank])
        ks.append(kp[rank])
    qw, kw = qws[rank], kws[rank]
    outs = [(torch.empty_like(q), torch.empty_like(k)) for q, k in zip(qs, ks)]
    impls = {
        "ccl": [
            functools.partial(comm.qk_rms_norm, q, k, qw, kw, EPS, q_out=qo, k_out=ko)
            for q, k, (qo, ko) in zip(qs, ks, outs)
        ]
    }
    rtol, atol = _TOL[dt]

    def check() -> int:
        return sum(
            not (
                torch.allclose(qo, eq, rtol=rtol, atol=atol)
                and torch.allclose(ko, ek, rtol=rtol, atol=atol)
            )
            for (qo, ko), (eq, ek) in zip(outs, expected)
        )

    name, make = baseline(dev, "qk_rms_norm")
    dims = torch.tensor([qc * world, kc * world], dtype=torch.float32, device=dev)
    bq, bk = make(qs[0], ks[0], qw, kw, dims, EPS)()
    base_ok = bool(
        torch.allclose(bq, expected[0][0], rtol=rtol, atol=atol)
        and torch.allclose(bk, expected[0][1], rtol=rtol, atol=atol)
    )
    impls["base"] = [make(q, k, qw, kw, dims, EPS) for q, k in zip(qs, ks)]
    return Case(
        "qk_rms_norm",
        dt,
        size,
        tokens,
        f"{tokens}x{qc}+{kc}",
        "1shot",
        impls,
        frozenset({"ccl"}),
        _poison([t for pair in outs for t in pair]),
        check,
        None,
        base_ok,
        {
            "baseline_impl": name,
            "timed_form": TIMED_FORMS["qk_rms_norm"],
            "q_cols": qc,
            "k_cols": kc,
        },
    )
