"""Ahead-of-time compile of every Triton mailbox kernel variant, with no GPU.

    python bench/gpu_compile_check.py [--target cuda:90|xpu] [--quick] [--json out.json]

Compiles ``ccl/kernels/triton_mailbox.py`` for a target through ``triton.compile`` and prints
one JSON line per variant. For CUDA and XPU targets it also compiles the fused-linear kernels
(``ccl/kernels/triton_fused_linear.py``: ``linear_add_rms_norm_kernel`` and the GEMV-only
``linear_kernel``) through their real launchers in ``ccl/fused_linear.py`` with the
arguments they get on a GPU (bf16 x, bf16 weight in nn.Linear and row-major layouts, INT4
GPTQ group 32/128 with bf16 scales; M = 1 and 8; the block configs of
``bench/gpu_fused_linear.py``): CPU tensors stand in for device tensors and a stub Triton
driver reports the target, so Triton's own argument specialisation (values equal to 1,
16-byte alignment) is the one a GPU launch gets. ``--only fused`` / ``--only mailbox``.
Catches what the interpreter accepts but a GPU compiler does not
(types, control flow, inline PTX, unsupported ops) before device time is spent. Exit status 1
on any failure. ``--quick`` compiles one variant per kernel and algorithm (used by CI).

- ``cuda:<sm>``: Triton's bundled ptxas (no driver needed); reports registers, stack and
  local memory (cuobjdump), and counts the volatile loads / strong stores in the PTX.
- ``xpu``: needs Intel's Triton (the ``triton-xpu`` wheel, e.g. installed with
  ``pip install --target DIR triton-xpu==3.3.0b1`` and ``PYTHONPATH=DIR``). The backend's
  constructor builds a small SYCL helper only to name the device architecture, which needs
  SYCL headers (oneAPI or the intel-sycl-rt wheel); it is replaced by a stub here, since
  SPIR-V generation itself runs in-process. Reports the SPIR-V size and, scanned from the
  binary, how many loads are volatile and whether cache-control decorations are present.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ccl.kernels import triton_mailbox as K  # noqa: E402

_PTR = {0: "*fp32", 1: "*bf16", 2: "*fp16"}


# Arguments that only some versions of the kernels have (the split fused norm's row scratch
# and chunk): filled in when the kernel takes them, so the check follows the kernels.
_OPTIONAL_TYPES = dict(rows_ptr="*i64", chunk="i32")
_OPTIONAL_CONSTEXPRS = dict(SPLIT=1, SPANS=False, POLL_DELAY=0, PDL=False, ROWWIDE=False)


def _sig(fn, types: dict, constexprs: dict):
    sig = {}
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    for name in fn.arg_names:
        if name not in types and name not in constexprs:
            if name in _OPTIONAL_CONSTEXPRS:
                constexprs[name] = _OPTIONAL_CONSTEXPRS[name]
            elif name in _OPTIONAL_TYPES:
                types[name] = _OPTIONAL_TYPES[name]
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types[name]
    return ASTSource(fn, sig, constexprs=constexprs)


def _common(types):
    types.update(
        table="*i64",
        ctrl="*i64",
        rank="i32",
        h0="i32",
        h1="i32",
        h2="i32",
        h3="i32",
        hop1_off="i32",
        slot_words="i32",
        hop2_off="i32",
        hop2_words="i32",
        limit="i32",
    )
    return types


def variants(quick: bool, world_sizes=(2, 4, 8), backends=(0,)):
    out = []
    dts = (0, 1) if quick else (0, 1, 2)
    worlds = world_sizes[:1] if quick else world_sizes
    for dt, world, two, be in itertools.product(dts, worlds, (False, True), backends):
        p = _PTR[dt]
        epw = 1 if dt == 0 else 2
        t = _common(dict(x_ptr=p, out_ptr=p, numel="i32", n_words="i32", shard_words="i32"))
        c = dict(DTYPE=dt, EPW=epw, WORLD=world, BLOCK=1024, TWO_SHOT=two, SOLO=False, BACKEND=be)
        out.append(
            (
                f"all_reduce dt{dt} w{world} {'two' if two else 'one'} be{be}",
                K.all_reduce_kernel,
                t,
                c,
                8,
            )
        )
        if "SPANS" in K.all_reduce_kernel.arg_names:  # one-reduction polls, no self poll
            out.append(
                (
                    f"all_reduce dt{dt} w{world} {'two' if two else 'one'} spans be{be}",
                    K.all_reduce_kernel,
                    dict(t),
                    dict(c, SPANS=True, POLL_DELAY=300),
                    8,
                )
            )
            if be in (0, 1) and "PDL" in K.all_reduce_kernel.arg_names:  # CUDA: PDL
                out.append((f"all_reduce dt{dt} w{world} {'two' if two else 'one'} spans pdl "
                            f"be{be}", K.all_reduce_kernel, dict(t),
                            dict(c, SPANS=True, POLL_DELAY=300, PDL=True), 8))
        t = _common(
            dict(
                x_ptr=p,
                res_ptr=p,
                weight_ptr=p,
                out_ptr=p,
                res_out_ptr=p,
                cols="i32",
                wpr="i32",
                eps="fp32",
                shard_words="i32",
            )
        )
        c = dict(
            DTYPE=dt,
            EPW=epw,
            WORLD=world,
            BLOCK=4096 if dt else 2048,
            TWO_SHOT=two,
            HAS_RES=True,
            HAS_RES_OUT=True,
            GEMMA=False,
            SOLO=True,
            BACKEND=be,
        )
        out.append(
            (
                f"add_rms_norm dt{dt} w{world} {'two' if two else 'one'} be{be}",
                K.add_rms_norm_kernel,
                t,
                c,
                16,
            )
        )
        if "SPLIT" in K.add_rms_norm_kernel.arg_names:  # rows split over programs (CUDA)
            c = dict(c, SPLIT=8, BLOCK=256, SOLO=False)
            out.append(
                (
                    f"add_rms_norm dt{dt} w{world} {'two' if two else 'one'} split8 be{be}",
                    K.add_rms_norm_kernel,
                    dict(t),
                    c,
                    2,
                )
            )
            if "SPANS" in K.add_rms_norm_kernel.arg_names:
                out.append(
                    (
                        f"add_rms_norm dt{dt} w{world} {'two' if two else 'one'} split8 spans "
                        f"be{be}",
                        K.add_rms_norm_kernel,
                        dict(t),
                        dict(c, SPANS=True, POLL_DELAY=300),
                        2,
                    )
                )
                if be in (0, 1) and "PDL" in K.add_rms_norm_kernel.arg_names:
                    out.append((f"add_rms_norm dt{dt} w{world} {'two' if two else 'one'} split8 "
                                f"spans pdl be{be}", K.add_rms_norm_kernel, dict(t),
                                dict(c, SPANS=True, POLL_DELAY=300, PDL=True), 2))
            if "ROWWIDE" in K.add_rms_norm_kernel.arg_names and not two:
                out.append(
                    (
                        f"add_rms_norm dt{dt} w{world} one split8 rowwide be{be}",
                        K.add_rms_norm_kernel,
                        dict(t),
                        dict(c, SPANS=True, POLL_DELAY=300, ROWWIDE=True, BLOCK=2048),
                        8,
                    )
                )
    for dt, world, be in itertools.product(dts, worlds, backends):
        p = _PTR[dt]
        t = _common(
            dict(
                q_ptr=p,
                q_stride="i32",
                k_ptr=p,
                k_stride="i32",
                qw_ptr=p,
                kw_ptr=p,
                qo_ptr=p,
                qo_stride="i32",
                ko_ptr=p,
                ko_stride="i32",
                q_cols="i32",
                k_cols="i32",
                eps="fp32",
            )
        )
        c = dict(DTYPE=dt, WORLD=world, BQ=256, BK=128, SOLO=False, BACKEND=be)
        out.append((f"qk_rms_norm dt{dt} w{world} be{be}", K.qk_rms_norm_kernel, t, c, 4))
    return out


def _resource_usage(cubin) -> dict:
    """Registers / stack / spills from the cubin (cuobjdump bundled with Triton)."""
    if not cubin:
        return {}
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", r.stdout)
    return dict(regs=int(m[1]), stack=int(m[2]), local=int(m[4])) if m else {}


def _xpu_target():
    """GPUTarget for Intel's backend without SYCL: stub the arch-name helper (see above)."""
    import types

    from triton.backends import backends

    stub = lambda src, name: types.SimpleNamespace(parse_device_arch=lambda arch: "")  # noqa: E731
    backends["intel"].compiler.__init__.__globals__["compile_module_from_src"] = stub
    arch = dict(
        name="Intel(R) Arc(TM) Pro B70",
        max_work_group_size=1024,
        max_num_sub_groups=64,
        sub_group_sizes=[16, 32],
        has_fp64=True,
        has_bfloat16_conversions=True,
        architecture=0,
    )
    return GPUTarget("xpu", arch, 16)


def _spirv_scan(spv: bytes) -> dict:
    """Counts in a SPIR-V module: OpLoad (61) with the Volatile memory-access bit, OpStore (62),
    atomics, and CacheControlLoadINTEL (6442) / CacheControlStoreINTEL (6443) decorations."""
    import struct

    words = struct.unpack("<%dI" % (len(spv) // 4), spv)
    i, loads, volatile, stores, atomics, cc_load, cc_store = 5, 0, 0, 0, 0, 0, 0
    while i < len(words):
        wc, op = words[i] >> 16, words[i] & 0xFFFF
        if wc == 0:
            break
        if op == 61:
            loads += 1
            volatile += int(wc > 4 and bool(words[i + 4] & 1))
        elif op == 62:
            stores += 1
        elif 227 <= op <= 242:
            atomics += 1
        elif op == 71 and wc >= 3:
            cc_load += int(words[i + 2] == 6442)
            cc_store += int(words[i + 2] == 6443)
        i += wc
    return dict(
        spirv_bytes=len(spv),
        loads=loads,
        volatile_loads=volatile,
        stores=stores,
        atomics=atomics,
        cache_control_load=cc_load,
        cache_control_store=cc_store,
    )


# ---------------------------------------------------------------- fused linear (launchers)
FUSED_SHAPES = dict(K=1536, N=3072, world=2)  # bench/gpu_fused_linear.py: K_total 3072 over 2
FUSED_BLOCKS = ("default", "warps8", "bn_half")  # bench/gpu_fused_linear.py variants


class _StubDriver:
    """Just enough of a Triton driver for JITFunction.run(warmup=True): no GPU is touched."""

    def __init__(self, target):
        self._target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self._target

    def __getattr__(self, name):  # anything else would need a real device
        raise RuntimeError(f"stub Triton driver: {name} needs a GPU")


class _FakeMailbox:
    """The attributes ``device_linear_add_rms_norm`` reads from a DeviceMailbox, with CPU
    tensors; ``_launch`` compiles (``JITFunction.warmup``) instead of launching."""

    def __init__(self, world, rank, capacity_bytes, backend, sink):
        import torch

        from ccl.device_mailbox import DeviceLayout

        self.device = torch.device("cpu")
        self.world_size, self.rank = world, rank
        self.layout = DeviceLayout.make(world, capacity_bytes)
        self.capacity_bytes = capacity_bytes
        self._table = torch.zeros(world, dtype=torch.int64)
        self._ctrl = torch.zeros(K.CTRL_WORDS, dtype=torch.int64)
        self._hop1 = self.layout.hop1_offset // 8
        self._hop2 = self.layout.hop2_offset // 8
        self.limit = 480_000_000  # 120 s at 250 ns per poll: a full int32-sized bound
        self.backend = backend
        self._sink = sink

    def _launch(self, kernel, grid, *args, **kwargs):
        self._sink.append((grid, kernel.warmup(*args, grid=grid, **kwargs)))


def fused_variants(quick: bool, backends=(0,)):
    """(name, thunk) pairs; each thunk calls a real launcher and returns [(grid, kernel)]."""
    import torch

    from ccl.fused_linear import Int4Weights, device_linear_add_rms_norm, device_linear_partial
    from ccl.fused_linear import device_linear_qk_rms_norm

    k, n, world = FUSED_SHAPES["K"], FUSED_SHAPES["N"], FUSED_SHAPES["world"]
    bf = torch.bfloat16
    weights = {
        "bf16_nk": lambda: (torch.zeros(n, k, dtype=bf).t(), None),  # nn.Linear weight .t()
        "bf16_kn": lambda: (torch.zeros(k, n, dtype=bf), None),
    }
    for g in (32, 128):
        weights[f"int4_g{g}"] = (lambda g=g: (None, Int4Weights(
            torch.zeros(k // 8, n, dtype=torch.int32), torch.zeros(k // g, n, dtype=bf), g)))
    import ccl.fused_linear as FL
    from gpu_fused_linear import variant_tiles

    # The stub compiles for a GPU target from CPU tensors: take the device's operand choice
    # (16-bit tensor-core dots), not the interpreter's.
    FL._native_dot = lambda x, wdt, int4: x.dtype != torch.float32 and (
        int4 or wdt == FL._DTYPE_CODES[x.dtype])
    blocks = FUSED_BLOCKS[:1] if quick else FUSED_BLOCKS
    out = []
    for (wname, make), m, variant, be in itertools.product(weights.items(), (1, 8), blocks,
                                                         backends):
        def fused(make=make, m=m, variant=variant, be=be):
            sink = []
            dm = _FakeMailbox(world, 0, 1 << 20, be, sink)
            w, q = make()
            x = torch.zeros(m, k, dtype=bf)
            res = torch.zeros(m, n, dtype=bf)
            device_linear_add_rms_norm(dm, x, w, q, res, torch.zeros(n, dtype=bf), 1e-6,
                                       out=torch.empty_like(res), residual_out=res,
                                       tiles=variant_tiles(variant, m, q is not None))
            return sink

        def gemv(make=make, m=m, variant=variant):
            sink = []
            w, q = make()
            device_linear_partial(torch.zeros(m, k, dtype=bf), w, quant=q,
                                  tiles=variant_tiles(variant, m, q is not None),
                                  launch=lambda kern, grid, *a, **kw: sink.append(
                                      (grid, kern.warmup(*a, grid=grid, **kw))))
            return sink

        def qkv(make=make, m=m, be=be):
            sink = []
            dm = _FakeMailbox(world, 0, 1 << 20, be, sink)
            w, q = make()
            qc, kc = n // 2, n // 8
            device_linear_qk_rms_norm(dm, torch.zeros(m, k, dtype=bf), w, q,
                                      torch.zeros(qc, dtype=bf), torch.zeros(kc, dtype=bf), 1e-6,
                                      q_cols=qc, k_cols=kc, out=torch.empty(m, n, dtype=bf))
            return sink

        out.append((f"fused_linear {wname} M{m} {variant} be{be}", fused))
        if variant == blocks[0]:
            out.append((f"linear_qk_rms_norm {wname} M{m} be{be}", qkv))
        # not in --quick (CI's): tests/test_triton_interpret.py expects every row it sees to
        # publish and poll, and the GEMV alone does neither
        if be == backends[0] and not quick:
            out.append((f"gemv {wname} M{m} {variant}", gemv))
    out += _moe_variants(quick, backends, world)
    return out


def _moe_variants(quick, backends, world):
    """The MoE stand-in's kernels (bench/decode_step.py shapes per rank: H 3072, I 768, top-8
    of 256 INT4 experts; here E = 4): the down projection fused with the all-reduce, and
    (not in --quick: it publishes nothing) the gate/up kernel."""
    import torch

    from ccl.fused_linear import Int4Weights, device_linear_add_rms_norm, device_moe_gate_up

    h, inter, e, topk, bf = 3072, 768, 4, 8, torch.bfloat16
    q13 = Int4Weights(torch.zeros(e, h // 8, 2 * inter, dtype=torch.int32),
                      torch.zeros(e, h // 128, 2 * inter, dtype=bf), 128)
    q2 = Int4Weights(torch.zeros(e, inter // 8, h, dtype=torch.int32),
                     torch.zeros(e, inter // 128, h, dtype=bf), 128)
    out = []
    for m in (1, 8):
        ids = torch.zeros(m, topk, dtype=torch.int64)
        tw = torch.zeros(m, topk, dtype=torch.float32)
        for be in backends:
            def down(m=m, ids=ids, tw=tw, be=be):
                sink = []
                dm = _FakeMailbox(world, 0, 1 << 20, be, sink)
                res = torch.zeros(m, h, dtype=bf)
                device_linear_add_rms_norm(dm, torch.zeros(m * topk, inter, dtype=bf), None, q2,
                                           res, torch.zeros(h, dtype=bf), 1e-6,
                                           out=torch.empty_like(res), residual_out=res,
                                           topk_ids=ids, topk_weights=tw)
                return sink
            out.append((f"moe_down_fused int4_g128 M{m} be{be}", down))
        if not quick:
            def gate_up(m=m, ids=ids):
                sink = []
                device_moe_gate_up(torch.zeros(m, h, dtype=bf), ids, None, quant=q13,
                                   launch=lambda kern, grid, *a, **kw: sink.append(
                                       (grid, kern.warmup(*a, grid=grid, **kw))))
                return sink
            out.append((f"moe_gate_up int4_g128 M{m}", gate_up))
    return out


def _kernel_stats(k) -> dict:
    """What a compiled kernel's binary says: the SPIR-V scan (Intel's Triton), or registers /
    stack and the counts of volatile loads, strong stores and warp-agreed spin exits in the
    PTX."""
    if "spv" in k.asm:
        return _spirv_scan(k.asm["spv"])
    row = _resource_usage(k.asm.get("cubin"))
    ptx = k.asm.get("ptx", "")
    row["ld_volatile"] = ptx.count("ld.volatile")
    row["st_relaxed_sys"] = ptx.count("st.relaxed.sys")
    # ll.all_warps_max: spin-loop exits agreed across warps (a warp max reduction)
    row["warp_max"] = ptx.count("redux.sync.max")
    row["bar_sync"] = ptx.count("bar.sync")
    row["st_global_b64"] = ptx.count("st.global.b64") + ptx.count("st.global.v2.b64")
    row["griddepcontrol"] = ptx.count("griddepcontrol")  # PDL variants: launch + wait
    return row


def _error_chain(e: BaseException) -> str:
    """The exception and its causes, innermost last, each shortened: a Triton compile error
    wraps the real one (a NameError, a type error) in a chain of call-site snippets."""
    parts = []
    while e is not None and len(parts) < 8:
        parts.append(f"{type(e).__name__}: {str(e)[-600:]}")
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)[-3000:]


def run_fused(target, quick, backends, rows):
    from triton.runtime import driver

    failed = 0
    driver.set_active(_StubDriver(target))
    try:
        for name, thunk in fused_variants(quick, backends):
            t0 = time.time()
            try:
                grid, k = thunk()[-1]
                md = k.metadata
                row = dict(name=name, ok=True, grid=list(grid), warps=md.num_warps,
                           shared=md.shared, seconds=round(time.time() - t0, 2))
                row.update(_kernel_stats(k))
            except Exception as e:  # noqa: BLE001 - reported
                failed += 1
                row = dict(name=name, ok=False, error=_error_chain(e))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        driver._active = None  # reset_active() would build the default driver (none here)
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="cuda:90", help="backend:arch, e.g. cuda:90, cuda:80")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backends", default="0", help="LL backend codes (ccl.kernels.ll), e.g. 0,1,2")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=("mailbox", "fused"), default=None)
    args = ap.parse_args(argv)
    if args.target == "xpu":
        target = _xpu_target()
        if args.backends == "0":
            args.backends = "3,5"
    else:
        backend, arch = args.target.split(":")
        target = GPUTarget(backend, int(arch), 32)
    rows, failed = [], 0
    print(f"# triton {triton.__version__}, target {args.target}")
    backends = tuple(int(b) for b in args.backends.split(","))
    todo = [] if args.only == "fused" else variants(args.quick, backends=backends)
    for name, fn, types, constexprs, warps in todo:
        t0 = time.time()
        try:
            k = triton.compile(
                _sig(fn, types, constexprs), target=target, options={"num_warps": warps}
            )
            md = k.metadata
            row = dict(name=name, ok=True, shared=md.shared, seconds=round(time.time() - t0, 2))
            row.update(_kernel_stats(k))
        except Exception as e:  # noqa: BLE001 - reported
            failed += 1
            row = dict(name=name, ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        rows.append(row)
        print(json.dumps(row))
    if args.only != "mailbox" and target.backend in ("cuda", "xpu"):
        failed += run_fused(target, args.quick, backends, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, target=args.target, rows=rows), f, indent=1)
    print(f"# {len(rows) - failed}/{len(rows)} compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
