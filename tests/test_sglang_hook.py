"""The SGLang hook (integrations/sglang/ccl_sglang), in the main venv, without SGLang.

What runs here:
- enabling: with ``CCL_SGLANG`` unset nothing is imported or patched; with it on, one INFO
  line; the import hook patches modules imported after enable(); disable() restores; the
  ``python -m ccl_sglang install-pth`` startup hook and the ``sglang.srt.plugins`` entry point;
- the ``ccl_sglang::`` torch ops (mutation in the schema, fake impls);
- the routing on 2 and 3 real ranks (real ccl.Communicator, real shared memory) against
  **STAND-INS** for SGLang's modules, written below from the 0.5.23 signatures recorded in
  docs/README-sglang.md. They are not SGLang: they reproduce the entry points the hook patches
  and the CPU behaviour of SGLang's original path (gloo all-reduce in place, fused candidates
  that decline on CPU, RMSNorm.forward_native math), so that the hook's patching, routing,
  fallbacks and numerics are exercised in CI.
- against SGLang's REAL modules only when a venv with SGLang 0.5.23 exists
  (``integrations/sglang/setup_venv.sh`` makes ``.venv-sglang``; ``CCL_SGLANG_PYTHON`` names
  another interpreter): ``integrations/sglang/check_real_sglang.py`` on 2 processes. Skipped,
  loudly, otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from _harness import REPO_DIR, bits_equal, digest, first_diff, gen, ref_add_rms_norm, ref_sum, tol

HOOK_DIR = os.path.join(REPO_DIR, "integrations", "sglang")
if HOOK_DIR not in sys.path:  # an editable install puts it there; a plain checkout may not
    sys.path.insert(0, HOOK_DIR)

MAX_BYTES = 64 * 1024

# ============================================================================ stand-ins
# STAND-INS for SGLang 0.5.23, NOT SGLang. Each mirrors the signature of the real entry point
# named in its docstring (paths under python/sglang/srt/), and what the real one does on a CPU
# host without sgl-kernel / FlashInfer / aiter.
STAND_IN = {
    "sglang/__init__.py": '''
        """STAND-IN for SGLang 0.5.23, written for tests/test_sglang_hook.py. Not SGLang."""
        __version__ = "0.5.23+ccl-stand-in"
        CCL_STAND_IN = True
    ''',
    "sglang/srt/__init__.py": "",
    "sglang/srt/distributed/__init__.py": '''
        from sglang.srt.distributed.communication_op import *  # noqa: F401,F403
        from sglang.srt.distributed.parallel_state import get_attn_tp_group, get_tp_group  # noqa
    ''',
    "sglang/srt/distributed/parallel_state.py": '''
        """Stand-in for distributed/parallel_state.py."""
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        _TP = None
        _ATTN_TP = None
        _counter = {}


        def _get_unique_name(name):
            n = _counter.get(name, 0)
            _counter[name] = n + 1
            return f"{name}:{n}"


        class GroupCoordinator:
            """GroupCoordinator (parallel_state.py:254); __init__ signature of :295."""

            def __init__(self, group_ranks, local_rank, torch_distributed_backend, use_pynccl,
                         use_mscclpp, use_custom_allreduce, use_torch_symm_mem_all_reduce,
                         use_hpu_communicator, use_xpu_communicator,
                         use_message_queue_broadcaster=False, group_name=None,
                         gloo_timeout=timedelta(seconds=7200), recovered_rank=False,
                         rank_offset=0, max_world_size=None):
                self.unique_name = _get_unique_name(group_name or "anonymous")
                self.rank = dist.get_rank()
                self.local_rank = local_rank
                self.device = torch.device("cpu")  # _group_coordinator_device on CPU
                self.ca_comm = None
                for ranks in group_ranks:
                    device_group = dist.new_group(ranks, backend=torch_distributed_backend)
                    cpu_group = dist.new_group(ranks, backend="gloo")
                    if self.rank in ranks:
                        self.ranks = ranks
                        self.world_size = len(ranks)
                        self.rank_in_group = ranks.index(self.rank)
                        self.device_group = device_group
                        self.cpu_group = cpu_group
                self.destroyed = False

            def all_reduce(self, input_):
                """all_reduce(input_) -> Tensor (:673); the CPU branch (:692-697) without
                sgl-kernel's shm_allreduce: torch.distributed on the device group, in place."""
                if self.world_size == 1:
                    return input_
                if input_.is_cpu:
                    dist.all_reduce(input_, group=self.device_group)
                    return input_
                raise NotImplementedError("stand-in: CPU only")

            def fused_allreduce_rmsnorm(self, input_, residual_inp_, weight_, eps):
                """(:811) ROCm custom all-reduce only: None without a ca_comm."""
                if self.ca_comm is None:
                    return None
                raise NotImplementedError

            def destroy(self):
                """(:2090)"""
                self.destroyed = True


        def get_tp_group():
            return _TP


        def get_attn_tp_group():
            return _ATTN_TP


        def set_groups_for_test(tp, attn_tp=None):
            """Stand-in only: what initialize_model_parallel publishes."""
            global _TP, _ATTN_TP
            _TP = tp
            _ATTN_TP = attn_tp if attn_tp is not None else tp
    ''',
    "sglang/srt/distributed/communication_op.py": '''
        """Stand-in for distributed/communication_op.py."""
        from sglang.srt.distributed.parallel_state import get_tp_group

        __all__ = ["tensor_model_parallel_all_reduce",
                   "tensor_model_parallel_fused_allreduce_rmsnorm"]


        def tensor_model_parallel_all_reduce(input_):
            """(:21)"""
            return get_tp_group().all_reduce(input_)


        def tensor_model_parallel_fused_allreduce_rmsnorm(input_, residual_inp_, weight_, eps):
            """(:31)"""
            return get_tp_group().fused_allreduce_rmsnorm(input_, residual_inp_, weight_, eps)
    ''',
    "sglang/srt/layers/__init__.py": "",
    "sglang/srt/layers/moe/__init__.py": '''
        from sglang.srt.layers.moe.utils import post_experts_reduction_group  # noqa: F401
    ''',
    "sglang/srt/layers/moe/utils.py": '''
        """Stand-in for layers/moe/utils.py."""
        from sglang.srt.distributed import parallel_state


        def post_experts_reduction_group():
            """(:900) the TP group when EP and MoE-TP merge (dense models)."""
            return parallel_state.get_tp_group()
    ''',
    "sglang/srt/layers/layernorm.py": '''
        """Stand-in for layers/layernorm.py."""
        import torch
        from torch import nn


        def _forward_with_allreduce_fusion(norm_module, x, residual, post_residual_addition,
                                           weight, use_attn_tp_group=True):
            """(:208). On CPU FlashInfer declines, so: all-reduce over the group, then the
            norm into a new residual tensor."""
            if residual is not None:
                from sglang.srt.distributed.parallel_state import get_attn_tp_group
                from sglang.srt.layers.moe.utils import post_experts_reduction_group

                group = get_attn_tp_group() if use_attn_tp_group else post_experts_reduction_group()
                if group.world_size > 1:
                    if post_residual_addition is not None:
                        residual = residual + post_residual_addition
                    x = group.all_reduce(x)
                    if post_residual_addition is None:
                        residual = residual.clone()
                    return norm_module.forward(x, residual, None)
            return norm_module.forward(x, residual, post_residual_addition)


        class RMSNorm(nn.Module):
            """RMSNorm (:458); forward = forward_native (:828), as on a CPU without AMX."""

            def __init__(self, hidden_size, eps=1e-6, var_hidden_size=None,
                         cast_x_before_out_mul=False, fp32_residual=False, has_weight=True,
                         weight_dtype=None, override_orig_dtype=None, x_pad_to_multiple=0,
                         force_native=False):
                super().__init__()
                self.weight = nn.Parameter(torch.ones(hidden_size, dtype=weight_dtype))
                self.variance_epsilon = eps
                self.hidden_size = hidden_size
                self.variance_size_override = (
                    None if var_hidden_size == hidden_size else var_hidden_size)
                self.cast_x_before_out_mul = cast_x_before_out_mul
                self.fp32_residual = fp32_residual
                self.override_orig_dtype = override_orig_dtype

            def forward(self, x, residual=None, post_residual_addition=None):
                dtype = x.dtype
                x = x.to(torch.float32)
                if residual is not None:
                    x = x + residual.to(torch.float32)
                    if post_residual_addition is not None:
                        x = x + post_residual_addition.to(torch.float32)
                    residual = x.to(dtype)
                x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.variance_epsilon)
                x = (x * self.weight).to(dtype)
                return x if residual is None else (x, residual)

            def forward_with_allreduce_fusion(self, x, residual=None,
                                              post_residual_addition=None,
                                              use_attn_tp_group=True):
                """(:928)"""
                return _forward_with_allreduce_fusion(
                    self, x, residual, post_residual_addition, self.weight, use_attn_tp_group)


        class GemmaRMSNorm(nn.Module):
            """GemmaRMSNorm (:1103): y = x * rsqrt(...) * (1 + w); gemma_weight = 1 + w."""

            def __init__(self, hidden_size, eps=1e-6):
                super().__init__()
                self.weight = nn.Parameter(torch.zeros(hidden_size))
                self.variance_epsilon = eps
                self.register_buffer("gemma_weight", torch.ones_like(self.weight),
                                     persistent=False)

            def refresh_gemma_weight(self):
                self.gemma_weight.copy_(self.weight.data).add_(1.0)

            def forward(self, x, residual=None, post_residual_addition=None):
                dtype = x.dtype
                if residual is not None:
                    x = x + residual
                    residual = x
                x = x.float()
                x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.variance_epsilon)
                x = (x * (1.0 + self.weight.float())).to(dtype)
                return x if residual is None else (x, residual)

            def forward_with_allreduce_fusion(self, x, residual=None,
                                              post_residual_addition=None,
                                              use_attn_tp_group=True):
                """(:1277) passes gemma_weight"""
                return _forward_with_allreduce_fusion(
                    self, x, residual, post_residual_addition, self.gemma_weight, True)
    ''',
    "sglang/srt/layers/layer_boundary/__init__.py": "",
    "sglang/srt/layers/layer_boundary/output.py": '''
        """Stand-in for layers/layer_boundary/output.py."""
        from dataclasses import dataclass
        from typing import Any, Callable, Optional


        @dataclass(frozen=True)
        class UnreducedOutput:
            """(:59) a partial sum owed over ``group``."""

            partial: Any
            group: Any = None
            reduce_to_dp_local: Optional[Callable] = None
            complete_sum: Optional[Callable] = None

            def complete(self):
                return self.group.all_reduce(self.partial)
    ''',
    "sglang/srt/layers/layer_boundary/fusions/__init__.py": "",
    "sglang/srt/layers/layer_boundary/fusions/allreduce.py": '''
        """Stand-in for layers/layer_boundary/fusions/allreduce.py: the candidates decline
        on CPU (flashinfer_ar_fusion_applies / aiter_ar_fusion_applies are False there)."""
        from dataclasses import dataclass
        from functools import partial
        from typing import Callable

        from sglang.srt.layers.layer_boundary.output import UnreducedOutput  # noqa: F401
        from sglang.srt.layers.layernorm import GemmaRMSNorm, RMSNorm  # noqa: F401


        @dataclass(frozen=True)
        class FfnInputFusion:
            completes: str
            run: Callable


        def fused_attn_input(plan, owed, residual, forward_batch, post_residual_addition, *,
                             fuses_quant, keep_bf16):
            """(:70)"""
            return None


        def ffn_input_fusions(plan):
            """(:114)"""
            if not hasattr(plan.norm, "forward_with_allreduce_fusion"):
                return ()
            return (FfnInputFusion(completes="ATTN_TP", run=partial(fused_ffn_input, plan)),)


        def fused_ffn_input(plan, hidden_states, residual, forward_batch):
            """(:150)"""
            return None
    ''',
}


def write_stand_in(root: str) -> str:
    for rel, text in STAND_IN.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text).lstrip("\n"))
    return root


@pytest.fixture
def stand_in(tmp_path) -> str:
    return write_stand_in(str(tmp_path / "stand_in"))


def _run_py(code: str, env_extra: dict, timeout: float = 120.0, pythonpath=()):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCL_SGLANG", "SGLANG_"))}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, HOOK_DIR, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_DIR)


# ============================================================================ enabling
_PROBE = """
import json, logging, sys, time
logging.basicConfig(level=logging.INFO)
t = time.perf_counter()
import ccl_sglang
on = ccl_sglang.autoload(); ccl_sglang.plugin()
dt = time.perf_counter() - t
print(json.dumps({"on": on, "mods": sorted(m for m in sys.modules
                   if m.split(".")[0] in ("torch", "sglang", "ccl", "ccl_sglang")),
                  "finders": [type(f).__module__ for f in sys.meta_path], "s": dt,
                  "stats": ccl_sglang.stats()}))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("value", [None, "0", "", "off"])
def test_disabled_imports_and_patches_nothing(value):
    p = _run_py(_PROBE, {} if value is None else {"CCL_SGLANG": value})
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["on"] is False
    assert out["mods"] == ["ccl_sglang"], out["mods"]  # no torch, no SGLang, no ccl
    assert "ccl_sglang._hook" not in out["finders"]
    assert out["stats"]["enabled"] is False and out["stats"]["patched"] == {}
    assert out["s"] < 0.5, f"import + autoload took {out['s']:.3f} s"
    assert p.stderr == "", p.stderr


@pytest.mark.timeout(120)
def test_enabled_without_sglang_logs_once_and_imports_no_torch():
    p = _run_py(_PROBE, {"CCL_SGLANG": "1"})
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["on"] is True and out["stats"]["enabled"] is True
    # The hook waits for SGLang: nothing heavy is imported by enabling.
    assert "torch" not in out["mods"] and "ccl_sglang._hook" in out["finders"]
    lines = [ln for ln in p.stderr.splitlines() if "ccl_sglang: enabled" in ln]
    assert len(lines) == 1, p.stderr  # autoload() + plugin(): logged once
    assert lines[0].startswith("INFO:ccl_sglang:")
    assert "attention_tp,moe_ep,moe_tp,tp" in lines[0] and "fused all-reduce" in lines[0]


@pytest.mark.timeout(120)
def test_install_pth_enables_every_process(tmp_path):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    p = _run_py(f"import sys; from ccl_sglang.__main__ import main; "
                f"sys.exit(main(['install-pth', '--site', {str(site_dir)!r}]))", {})
    assert p.returncode == 0, p.stderr
    (pth,) = site_dir.iterdir()
    assert pth.name == "ccl_sglang-autoload.pth"
    probe = ("import site, sys, json; site.addsitedir(sys.argv[1]); "
             "print(json.dumps(['ccl_sglang' in sys.modules, "
             "any(type(f).__module__ == 'ccl_sglang._hook' for f in sys.meta_path)]))")
    for value, expect in ((None, [False, False]), ("1", [True, True])):
        env = {} if value is None else {"CCL_SGLANG": value}
        q = _run_py("import sys; sys.argv[1:] = [%r]; exec(%r)" % (str(site_dir), probe), env)
        assert q.returncode == 0, q.stderr
        assert json.loads(q.stdout.strip().splitlines()[-1]) == expect, (value, q.stdout)
    r = _run_py(f"import sys; from ccl_sglang.__main__ import main; "
                f"sys.exit(main(['uninstall-pth', '--site', {str(site_dir)!r}]))", {})
    assert r.returncode == 0 and not list(site_dir.iterdir()), r.stderr


def test_sglang_plugin_entry_point():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(REPO_DIR, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert "integrations/sglang/ccl_sglang" in meta["tool"]["scikit-build"]["wheel"]["packages"]
    eps = meta["project"].get("entry-points", {}).get("sglang.srt.plugins")
    if eps is None:
        pytest.skip("pyproject.toml declares no [project.entry-points.\"sglang.srt.plugins\"] "
                    "(the file's owner adds `ccl = \"ccl_sglang:plugin\"`); until then use "
                    "`python -m ccl_sglang install-pth` or ccl_sglang.enable()")
    assert eps == {"ccl": "ccl_sglang:plugin"}


# ============================================================================ the ops
def test_op_schemas_and_fake_impls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ccl_sglang import _ops  # noqa: F401  (registers the ops)

    ar = torch.ops.ccl_sglang.all_reduce_.default._schema
    assert [a.name for a in ar.arguments] == ["x", "handle"]
    assert ar.arguments[0].alias_info.is_write and not ar.returns
    fused = torch.ops.ccl_sglang.all_reduce_add_rms_norm.default._schema
    assert [a.name for a in fused.arguments] == ["x", "residual", "weight", "eps", "handle"]
    assert all(a.alias_info is None for a in fused.arguments) and len(fused.returns) == 2
    with FakeTensorMode():
        x = torch.empty(3, 256, dtype=torch.bfloat16)
        w = torch.empty(256, dtype=torch.bfloat16)
        assert torch.ops.ccl_sglang.all_reduce_(x, 12345) is None  # no registry lookup
        o, r = torch.ops.ccl_sglang.all_reduce_add_rms_norm(x, x, w, 1e-6, 12345)
        assert o.shape == r.shape == x.shape and o.dtype == torch.bfloat16


def test_native_fallback_math_matches_stand_in_norm(stand_in):
    """The op's fallback add + RMSNorm is RMSNorm.forward_native's (single process)."""
    sys.path.insert(0, stand_in)
    try:
        from ccl_sglang import _ops
        from sglang.srt.layers.layernorm import RMSNorm

        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x, r = gen(1, "x", (5, 96), dtype), gen(1, "r", (5, 96), dtype)
            norm = RMSNorm(96, eps=1e-5)
            norm.weight.data = gen(1, "w", (96,), dtype)
            want = norm.forward(x, r)
            got = _ops.add_rms_norm_native(x, r, norm.weight.data, 1e-5)
            assert bits_equal(got[0], want[0]) and bits_equal(got[1], want[1]), dtype
    finally:
        sys.path.remove(stand_in)
        _purge_sglang()


# ============================================================================ multi-rank
def _purge_sglang():
    for m in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]:
        del sys.modules[m]


class _Env:
    """Sets environment variables for a block and restores them."""

    def __init__(self, **values):
        self.values = values
        self.saved = {}

    def __enter__(self):
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _with_stand_in(ctx, stand_in, body, *, enable=True, env=None):
    """Runs ``body()`` in a rank with the stand-in SGLang importable, ccl_sglang enabled
    before it is imported, and everything undone afterwards (the pool is reused)."""
    import ccl_sglang

    _purge_sglang()
    sys.path.insert(0, stand_in)
    env = {"CCL_MAX_BYTES": MAX_BYTES, "CCL_SGLANG": None, **(env or {})}
    try:
        with _Env(**env):
            if enable:
                ccl_sglang.enable()
            return body()
    finally:
        ccl_sglang.disable()
        os.environ.pop("CCL_SGLANG", None)
        sys.path.remove(stand_in)
        _purge_sglang()
        from ccl_sglang import _ops

        _ops._entries.clear()
        for k in _ops._counts:
            _ops._counts[k] = 0


def _new_group(name="tp", ranks=None):
    from sglang.srt.distributed import parallel_state as ps

    world = torch.distributed.get_world_size()
    return ps.GroupCoordinator(
        group_ranks=[ranks or list(range(world))], local_rank=torch.distributed.get_rank(),
        torch_distributed_backend="gloo", use_pynccl=False, use_mscclpp=False,
        use_custom_allreduce=False, use_torch_symm_mem_all_reduce=False,
        use_hpu_communicator=False, use_xpu_communicator=False, group_name=name)


def _counters():
    import ccl_sglang

    return dict(ccl_sglang.stats()["counters"])


def _roundings_apart(a, b, n: int) -> bool:
    """|a - b| <= n roundings of the dtype at the tensors' largest magnitude: what separates
    two evaluation orders that round intermediate sums differently."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return (a.double() - b.double()).abs().max().item() <= n * torch.finfo(a.dtype).eps * scale


def _rank_routing(ctx, stand_in, seed, dtype_name):
    dtype = getattr(torch, dtype_name)

    def body():
        import ccl_sglang
        from ccl_sglang import _patches
        from sglang.srt.distributed import communication_op as cop
        from sglang.srt.distributed import parallel_state as ps
        from sglang.srt.layers import layernorm as ln
        from sglang.srt.layers.layer_boundary import output as lb_output
        from sglang.srt.layers.layer_boundary.fusions import allreduce as lb_fusions

        assert getattr(ps.GroupCoordinator.all_reduce, "__ccl_sglang__", False)
        assert sorted(ccl_sglang.stats()["patched"]) == sorted(_patches.PATCHERS)
        orig = {n: o for (own, n, o) in _patches._applied}
        g = _new_group("tp")
        assert _patches.group_entry(g) is not None, "no ccl communicator on the tp group"
        ps.set_groups_for_test(g)
        world, rank = ctx.world, ctx.rank
        hidden, eps = 192, 1e-6
        parts = [gen(seed, ("x", r), (3, hidden), dtype) for r in range(world)]
        residual = gen(seed, "res", (3, hidden), dtype)
        weight = (1 + 0.1 * gen(seed, "w", (hidden,), torch.float32)).to(dtype)
        ref = ref_sum(parts)
        ref_out, ref_res = ref_add_rms_norm(parts, residual, weight, eps)
        out = {"digests": {}, "errors": []}

        def expect(name, cond, msg=""):
            if not cond:
                out["errors"].append(f"{name}: {msg}")

        # all-reduce (tensor_model_parallel_all_reduce -> GroupCoordinator.all_reduce)
        c0 = _counters()
        x = parts[rank].clone()
        y = cop.tensor_model_parallel_all_reduce(x)
        expect("all_reduce routed", _counters()["all_reduce"] == c0["all_reduce"] + 1)
        expect("all_reduce in place", y is x)
        expect("all_reduce == reference", bits_equal(y, ref), first_diff(y, ref))
        y_sg = orig["all_reduce"](g, parts[rank].clone())  # the stand-in's own (gloo) path
        expect("all_reduce ~ SGLang path", _roundings_apart(y, y_sg, world),
               first_diff(y, y_sg))
        out["digests"]["all_reduce"] = digest(y)
        out["sum"] = y.float().sum().item()

        # over capacity -> SGLang's path
        big = [gen(seed, ("big", r), (MAX_BYTES // 4 + 32,), torch.float32) for r in range(world)]
        c1 = _counters()
        yb = g.all_reduce(big[rank].clone())
        expect("over capacity falls back",
               _counters()["all_reduce_fallback"] == c1["all_reduce_fallback"] + 1)
        expect("over capacity == reference",
               first_diff(yb, ref_sum(big), rtol=1e-5, atol=1e-5) is None)

        def check_fused(name, got, c):
            o, r = got
            expect(f"{name} routed", _counters()["fused"] == c["fused"] + 1, str(_counters()))
            expect(f"{name} residual == reference", bits_equal(r, ref_res), first_diff(r, ref_res))
            expect(f"{name} out ~ reference", first_diff(o, ref_out, **tol(dtype)) is None,
                   first_diff(o, ref_out, **tol(dtype)))
            out["digests"][name] = digest(o, r)

        norm = ln.RMSNorm(hidden, eps=eps)
        norm.weight.data = weight.clone()
        c = _counters()
        check_fused("fused_allreduce_rmsnorm", cop.tensor_model_parallel_fused_allreduce_rmsnorm(
            parts[rank].clone(), residual.clone(), weight, eps), c)
        c = _counters()
        res_in = residual.clone()
        got = norm.forward_with_allreduce_fusion(parts[rank].clone(), res_in)
        check_fused("RMSNorm.forward_with_allreduce_fusion", got, c)
        expect("residual input untouched", bits_equal(res_in, residual))
        # SGLang's unfused path gives the same residual and a close output
        sg = lambda: orig["_forward_with_allreduce_fusion"](  # noqa: E731
            norm, parts[rank].clone(), residual.clone(), None, norm.weight, True)
        c = _counters()
        sg_o, sg_r = sg()
        expect("SGLang path bypasses ccl's fused op", _counters()["fused"] == c["fused"])
        # SGLang rounds the sum to the model dtype before the add (ccl does not): the results
        # are a few roundings apart, bitwise equal in fp32 at 2 ranks.
        expect("SGLang unfused residual ~ ccl", _roundings_apart(sg_r, got[1], world + 1),
               first_diff(sg_r, got[1]))
        expect("SGLang unfused out ~ ccl", _roundings_apart(sg_o, got[0], world + 3),
               first_diff(sg_o, got[0]))

        gnorm = ln.GemmaRMSNorm(hidden, eps=eps).to(dtype)
        gnorm.weight.data = (weight.float() - 1.0).to(dtype)
        gnorm.refresh_gemma_weight()
        c = _counters()
        gw = gnorm.gemma_weight
        got = gnorm.forward_with_allreduce_fusion(parts[rank].clone(), residual.clone())
        g_out, _ = ref_add_rms_norm(parts, residual, gw, eps)
        expect("Gemma routed", _counters()["fused"] == c["fused"] + 1)
        expect("Gemma out ~ reference(1 + w)", first_diff(got[0], g_out, **tol(dtype)) is None,
               first_diff(got[0], g_out, **tol(dtype)))

        class Plan:
            fusions = None

        plan = Plan()
        plan.norm = norm
        expect("original candidate declines", orig["fused_ffn_input"](
            plan, parts[rank].clone(), residual.clone(), None) is None)
        (cand,) = lb_fusions.ffn_input_fusions(plan)  # built after enable(): patched
        c = _counters()
        check_fused("ffn_input_fusions candidate", cand.run(parts[rank].clone(), residual.clone(),
                                                            None), c)
        c = _counters()
        owed = lb_output.UnreducedOutput(partial=parts[rank].clone(), group=g)
        check_fused("fused_attn_input", lb_fusions.fused_attn_input(
            plan, owed, residual.clone(), None, None, fuses_quant=False, keep_bf16=False), c)
        expect("fused_attn_input with post_residual_addition declines",
               lb_fusions.fused_attn_input(plan, owed, residual.clone(), None, residual,
                                           fuses_quant=False, keep_bf16=False) is None)
        # norms with other semantics are left to SGLang
        odd = ln.RMSNorm(hidden, eps=eps, cast_x_before_out_mul=True)
        plan.norm = odd
        c = _counters()
        expect("cast_x_before_out_mul declines",
               cand.run(parts[rank].clone(), residual.clone(), None) is None
               and _counters() == c)
        plan.norm = norm
        # over capacity: the candidate declines and counts a fused fallback
        nb = MAX_BYTES // (hidden * torch.empty(0, dtype=dtype).element_size()) + 1
        bx = gen(seed, ("bx", rank), (nb, hidden), dtype)
        c = _counters()
        expect("fused over capacity declines",
               cand.run(bx, gen(seed, "br", (nb, hidden), dtype), None) is None
               and _counters()["fused_fallback"] == c["fused_fallback"] + 1)
        c = _counters()
        o, r = norm.forward_with_allreduce_fusion(bx.clone(), gen(seed, "br", (nb, hidden), dtype))
        expect("fused over capacity: SGLang's path runs",
               _counters()["fused_fallback"] == c["fused_fallback"] + 1
               and _counters()["all_reduce_fallback"] == c["all_reduce_fallback"] + 1)
        out["counters"] = _counters()
        g.destroy()
        expect("destroy closes", _patches.group_entry(g) is None and g.destroyed)
        return out

    return _with_stand_in(ctx, stand_in, body)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_stand_in_routing(pools, stand_in, seed, world, dtype_name):
    """STAND-IN SGLang: every patched entry routes through ccl, matches the reference and
    SGLang's unfused path, falls back above capacity, and gives identical results per rank."""
    pool = pools.get(world)
    results = pool.run(_rank_routing, stand_in, seed, dtype_name, timeout=240)
    for r, res in enumerate(results):
        assert not res["errors"], f"rank {r}: " + "\n".join(res["errors"])
        c = res["counters"]
        assert c["all_reduce"] > 0 and c["fused"] >= 5 and c["all_reduce_fallback"] > 0
        assert c["fused_fallback"] >= 2
    assert len({json.dumps(res["digests"]) for res in results}) == 1, "ranks differ"
    assert len({res["sum"] for res in results}) == 1


def _rank_disabled(ctx, stand_in):
    def body():
        import ccl_sglang
        from sglang.srt.distributed import parallel_state as ps
        from sglang.srt.layers import layernorm as ln
        from sglang.srt.layers.layer_boundary.fusions import allreduce as lb_fusions

        before = (ps.GroupCoordinator.__dict__["all_reduce"], ln._forward_with_allreduce_fusion,
                  lb_fusions.fused_ffn_input)
        g = _new_group("tp")
        assert not hasattr(g, "_ccl_sglang_entry")
        x = gen(1, ("d", ctx.rank), (2, 64), torch.float32)
        y = g.all_reduce(x)
        assert not any(_counters().values())
        # enable() after the import patches at once; disable() puts SGLang's functions back
        ccl_sglang.enable()
        assert ps.GroupCoordinator.__dict__["all_reduce"] is not before[0]
        restored = ccl_sglang.disable()
        after = (ps.GroupCoordinator.__dict__["all_reduce"], ln._forward_with_allreduce_fusion,
                 lb_fusions.fused_ffn_input)
        return {"same": all(a is b for a, b in zip(before, after)), "restored": len(restored),
                "y": y.sum().item()}

    return _with_stand_in(ctx, stand_in, body, enable=False)


@pytest.mark.timeout(180)
def test_stand_in_disabled_changes_nothing(pools, stand_in):
    results = pools.get(2).run(_rank_disabled, stand_in, timeout=120)
    for res in results:
        assert res["same"] and res["restored"] == 7, res


def _rank_groups_and_fuse(ctx, stand_in):
    def body():
        from ccl_sglang import _patches
        from sglang.srt.distributed import parallel_state as ps
        from sglang.srt.layers import layernorm as ln

        with ctx.capture_logs("ccl_sglang") as logs:
            tp = _new_group("tp")
            attn = _new_group("attention_tp")
        ps.set_groups_for_test(tp, attn)
        norm = ln.RMSNorm(64)
        x = gen(2, ("g", ctx.rank), (2, 64), torch.float32)
        r = gen(2, "gr", (2, 64), torch.float32)
        c = _counters()
        o, ro = norm.forward_with_allreduce_fusion(x.clone(), r.clone())  # attn group: off
        y = tp.all_reduce(x.clone())
        return {"tp": _patches.group_entry(tp) is not None,
                "attn": _patches.group_entry(attn) is not None,
                "fused": _counters()["fused"] - c["fused"],
                "all_reduce": _counters()["all_reduce"] - c["all_reduce"],
                "logs": [(rec.levelname, rec.getMessage()) for rec in logs],
                "o": o.sum().item(), "y": y.sum().item()}

    return _with_stand_in(ctx, stand_in, body,
                          env={"CCL_SGLANG_GROUPS": "tp", "CCL_SGLANG_FUSE": "0"})


@pytest.mark.timeout(180)
def test_stand_in_group_filter_and_fuse_off(pools, stand_in):
    results = pools.get(2).run(_rank_groups_and_fuse, stand_in, timeout=120)
    for res in results:
        assert res["tp"] and not res["attn"], res
        assert res["fused"] == 0 and res["all_reduce"] == 1, res  # fusion off, routing on
        info = [m for lvl, m in res["logs"] if lvl == "INFO"]
        assert len(info) == 1 and "group tp:" in info[0] and "RMSNorm" not in info[0], res["logs"]
    assert len({res["o"] for res in results}) == 1


def _rank_agreement(ctx, stand_in):
    def body():
        from ccl_sglang import _patches

        real = _patches._local_reason
        if ctx.rank == 1:
            _patches._local_reason = lambda device: "cannot import ccl (simulated)"
        try:
            with ctx.capture_logs("ccl_sglang") as logs:
                g = _new_group("tp")
        finally:
            _patches._local_reason = real
        y = g.all_reduce(gen(3, ("a", ctx.rank), (4, 8), torch.float32))
        return {"routed": _patches.group_entry(g) is not None, "y": y.sum().item(),
                "logs": [(rec.levelname, rec.getMessage()) for rec in logs]}

    return _with_stand_in(ctx, stand_in, body)


@pytest.mark.timeout(180)
def test_stand_in_ranks_agree_to_stay_off(pools, stand_in):
    """One rank cannot use ccl: no rank does, every rank says why, SGLang's path runs."""
    results = pools.get(2).run(_rank_agreement, stand_in, timeout=120)
    for res in results:
        assert not res["routed"]
        warn = [m for lvl, m in res["logs"] if lvl == "WARNING"]
        assert len(warn) == 1 and "rank 1: cannot import ccl (simulated)" in warn[0], res["logs"]
    assert len({res["y"] for res in results}) == 1


def _rank_compile(ctx, stand_in, seed):
    def body():
        from sglang.srt.distributed import parallel_state as ps
        from sglang.srt.layers import layernorm as ln

        g = _new_group("tp")
        ps.set_groups_for_test(g)
        norm = ln.RMSNorm(128)
        norm.weight.data = 1 + 0.1 * gen(seed, "cw", (128,), torch.float32)
        parts = [gen(seed, ("c", r), (2, 128), torch.float32) for r in range(ctx.world)]
        resid = gen(seed, "cr", (2, 128), torch.float32)

        def step(a, res):
            a = g.all_reduce(a)
            return norm.forward_with_allreduce_fusion(a * 0.5, res)

        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)
        c = _counters()
        with torch.no_grad():  # as SGLang's model runner
            o, r = compiled(parts[ctx.rank].clone(), resid.clone())
        d = {k: _counters()[k] - c[k] for k in c}
        half = ref_sum(parts) * 0.5
        want_o, want_r = ref_add_rms_norm([half] * ctx.world, resid, norm.weight.data, 1e-6)
        return {"d": d, "r": first_diff(r, want_r), "o": first_diff(o, want_o, **tol(o.dtype))}

    return _with_stand_in(ctx, stand_in, body)


@pytest.mark.timeout(300)
def test_stand_in_torch_compile_fullgraph(pools, stand_in, seed):
    """Under torch.compile the routed calls become ccl_sglang:: ops (opaque, fake impls)."""
    for res in pools.get(2).run(_rank_compile, stand_in, seed, timeout=240):
        assert res["d"]["all_reduce"] == 1 and res["d"]["fused"] == 1, res
        assert res["r"] is None and res["o"] is None, res


# ============================================================================ real SGLang
def _sglang_python():
    py = os.environ.get("CCL_SGLANG_PYTHON") or os.path.join(REPO_DIR, ".venv-sglang", "bin",
                                                             "python")
    if not os.path.exists(py):
        return None, (f"no SGLang venv at {py} (run integrations/sglang/setup_venv.sh, or set "
                      "CCL_SGLANG_PYTHON): the hook was NOT checked against SGLang's real modules")
    probe = subprocess.run(
        [py, "-c", "import importlib.metadata as m; print(m.version('sglang')); import ccl._C"],
        capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return None, (f"{py} cannot import sglang + ccl ({probe.stderr.strip()[-300:]}): the hook"
                      " was NOT checked against SGLang's real modules")
    return py, probe.stdout.strip()


@pytest.mark.timeout(600)
def test_real_sglang_modules(tmp_path):
    """SGLang's REAL GroupCoordinator, communication_op, layernorm and layer boundary on 2 CPU
    processes (integrations/sglang/check_real_sglang.py)."""
    py, info = _sglang_python()
    if py is None:
        pytest.skip(info)
    report = tmp_path / "real.json"
    p = subprocess.run([py, os.path.join(HOOK_DIR, "check_real_sglang.py"), "--json",
                        str(report)], capture_output=True, text=True, timeout=540, cwd=REPO_DIR)
    print(p.stdout)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("sglang-hook-check: PASS"), last
    data = json.loads(report.read_text())
    assert "stand_in" not in data["results"][0]["sglang_file"]
    assert data["results"][0]["counters"]["all_reduce"] > 0
    assert data["results"][0]["counters"]["fused"] > 0
