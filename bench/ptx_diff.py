#!/usr/bin/env python3
"""Which kernels compile differently than at another commit: every variant of
``gpu_compile_check --quick`` (mailbox kernels, fused linear / QKV / MoE kernels through the
library's own host code) compiled for sm_90 in this tree and in ``--base`` (a git worktree),
their PTX compared with comments, ``.loc`` / ``.file`` lines and debug sections dropped. No GPU.

What it is for: a change meant to leave the GPU-validated default paths alone (a refactor, an
opt-in variant behind a constexpr) can show that it did, when no GPU is at hand to re-run the
validation. Variants only one side has are listed as such.

    python bench/ptx_diff.py --base 1fd61ed
    CCL_FUSED_HANDOFF=counter python bench/ptx_diff.py --base HEAD~3   # env applies to both
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def normalized(ptx: str) -> str:
    """PTX without what changes when only line numbers, paths or the inlining of helpers
    do (debug sections and their ``$L__tmp`` labels)."""
    keep = []
    for line in ptx.splitlines():
        s = line.strip()
        if s.startswith(("//", ".loc", ".file", ".section", "$L__debug", ".b8", ".b32", ".b64")):
            continue
        if s.startswith("$L__tmp") and s.endswith(":"):
            continue
        keep.append(s)
    return "\n".join(keep)


def _dump(tree: str, foreign: bool) -> dict:
    """{variant name: digest} of ``tree``'s kernels, in a child process. ``foreign``: not the
    tree the package is installed from, so the editable install's import hook is dropped and
    ``tree``'s own ``ccl`` is imported."""
    code = f"""
import sys, json, hashlib
if {foreign!r}:
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path[:0] = [{tree!r}, {os.path.join(tree, "bench")!r}, {HERE!r}]
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
import gpu_compile_check as G
from ptx_diff import normalized
t = GPUTarget("cuda", 90, 32)
out = {{}}
for name, fn, types, cx, warps in G.variants(True, backends=(0,)):
    try:
        k = triton.compile(G._sig(fn, dict(types), dict(cx)), target=t, options={{"num_warps": warps}})
        out[name] = hashlib.sha1(normalized(k.asm["ptx"]).encode()).hexdigest()[:12]
    except Exception as e:
        out[name] = "error: " + type(e).__name__
driver.set_active(G._StubDriver(t))
for name, thunk in G.fused_variants(True, (0,)):
    try:
        k = thunk()[-1][1]
        out[name] = hashlib.sha1(normalized(k.asm["ptx"]).encode()).hexdigest()[:12]
    except Exception as e:
        out[name] = "error: " + type(e).__name__
print(json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH=tree)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=tree, timeout=1200)
    if r.returncode != 0:
        raise SystemExit(f"ptx_diff: compiling {tree} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare against")
    args = ap.parse_args(argv)
    import ccl._C as built  # the base tree borrows this tree's compiled extension

    with tempfile.TemporaryDirectory() as tmp:
        wt = os.path.join(tmp, "base")
        subprocess.run(["git", "-C", REPO, "worktree", "add", "-q", "--detach", wt, args.base],
                       check=True)
        try:
            os.symlink(built.__file__, os.path.join(wt, "ccl", os.path.basename(built.__file__)))
            base, now = _dump(wt, True), _dump(REPO, False)
        finally:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", wt], check=False)
    same = [n for n in now if base.get(n) == now[n]]
    changed = [n for n in now if n in base and base[n] != now[n]]
    print(f"# {len(same)} identical, {len(changed)} changed, "
          f"{len(set(now) - set(base))} only here, {len(set(base) - set(now))} only in base")
    for n in changed:
        print(f"changed    {n}")
    for n in sorted(set(now) - set(base)):
        print(f"only here  {n}")
    for n in sorted(set(base) - set(now)):
        print(f"only base  {n}")
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
