"""Ahead-of-time compile of every Triton mailbox kernel variant, with no GPU.

    python bench/gpu_compile_check.py [--target cuda:90|xpu] [--quick] [--json out.json]

Compiles ``ccl/kernels/triton_mailbox.py`` for a target through ``triton.compile`` and prints
one JSON line per variant. Catches what the interpreter accepts but a GPU compiler does not
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


def _sig(fn, types: dict, constexprs: dict):
    sig = {}
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="cuda:90", help="backend:arch, e.g. cuda:90, cuda:80")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backends", default="0", help="LL backend codes (ccl.kernels.ll), e.g. 0,1,2")
    ap.add_argument("--json", default=None)
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
    for name, fn, types, constexprs, warps in variants(
        args.quick, backends=tuple(int(b) for b in args.backends.split(","))
    ):
        t0 = time.time()
        try:
            k = triton.compile(
                _sig(fn, types, constexprs), target=target, options={"num_warps": warps}
            )
            md = k.metadata
            row = dict(name=name, ok=True, shared=md.shared, seconds=round(time.time() - t0, 2))
            if "spv" in k.asm:
                row.update(_spirv_scan(k.asm["spv"]))
            else:
                row.update(_resource_usage(k.asm.get("cubin")))
                ptx = k.asm.get("ptx", "")
                row["ld_volatile"] = ptx.count("ld.volatile")
                row["st_relaxed_sys"] = ptx.count("st.relaxed.sys")
                row["st_global_b64"] = ptx.count("st.global.b64") + ptx.count("st.global.v2.b64")
        except Exception as e:  # noqa: BLE001 - reported
            failed += 1
            row = dict(name=name, ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, target=args.target, rows=rows), f, indent=1)
    print(f"# {len(rows) - failed}/{len(rows)} compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
