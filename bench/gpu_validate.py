"""GPU validation and timing of the Triton mailbox kernels (CUDA, one process per GPU).

    python bench/gpu_validate.py [--world N] [--out DIR] [--quick]      (spawns N ranks)
    torchrun --nproc-per-node 2 bench/gpu_validate.py [--out DIR]

Peer memory: ``ccl.transport.cuda.CudaRegion`` when it builds and imports, else torch
SymmetricMemory buffers (their buffer pointers are the pointer table). NVLink multicast stays
off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are forced
for this process and the ranks it starts).

Runs, in order:
  1. correctness, eager: every op x dtype x algorithm x several sizes (odd ones included)
     against ccl/kernels/reference.py, fresh random inputs, poisoned outputs, bitwise equality
     across ranks and between one-shot and two-shot;
  2. correctness under CUDA-graph replay: one graph of K calls over their own buffers,
     replayed R times (K*R >= 100k ops) with inputs re-randomised between replays (in
     graphs too: RNG, NCCL all-gathers of every rank's inputs, references and comparisons
     accumulate mismatch counters on the device);
  3. header mismatch (CollectiveMismatch on every rank, mailbox still usable);
  4. timing under graph replay (CUDA events, median of many replays of a graph of n calls):
     ccl one-shot / two-shot (block sweep) vs NCCL vs SymmetricMemory one-shot, fused
     add+RMSNorm vs NCCL + torch add/RMSNorm and vs our plain all_reduce, LL publish variants;
  5. the timeout path last (one rank skips a call; the others raise CollectiveTimeout naming
     it; calibrates the wall time of one poll).
Writes $OUT/gpu_validate.json (or --out) and prints a compact table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

for _k, _v in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_k] = _v
os.environ.pop("TRITON_INTERPRET", None)

_REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def _import_ccl():
    """Our modules; if the C++ extension did not build, import them without ccl/__init__."""
    try:
        import ccl

        return f"package ({ccl.__file__})"
    except ImportError as e:
        import types

        pkg = types.ModuleType("ccl")
        pkg.__path__ = [os.path.join(_REPO, "ccl")]
        sys.modules["ccl"] = pkg
        return f"stub package (ccl import failed: {e})"


_CCL_IMPORT = _import_ccl()
from ccl.device_mailbox import DeviceMailbox  # noqa: E402
from ccl.errors import CollectiveMismatch, CollectiveTimeout  # noqa: E402
from ccl.kernels import reference as R  # noqa: E402

CAP = 1 << 20
DEFAULT_BLOCK = 64  # DeviceMailbox.max_block's default (words per all-reduce program)
ALGOS = ("one_shot", "two_shot")  # --algos
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def log(rank, *a):
    if rank == 0:
        print(*a, flush=True)


# ============================================================================ set-up
def peer_regions(rank, world, nbytes, dev, store):
    """(bases, transport name, keep-alive object)."""
    errors = []
    try:
        from ccl.rendezvous import StoreExchange
        from ccl.transport.cuda import CudaRegion, availability

        av = availability(dev.index)
        if not av:
            raise RuntimeError(f"cuda transport unavailable: {av.reason}")
        ex = StoreExchange(store, rank, world, "gpu-validate/region")
        region = CudaRegion(world, rank, nbytes, dev.index)
        region.connect(ex)
        return list(region.bases), "ccl.transport.cuda.CudaRegion", region, errors
    except Exception as e:  # noqa: BLE001 - fall back, and say why
        errors.append(f"CudaRegion: {type(e).__name__}: {e}")
    import torch.distributed._symmetric_memory as symm_mem

    group = dist.group.WORLD.group_name
    try:
        symm_mem.enable_symm_mem_for_group(group)
    except Exception:  # noqa: BLE001 - newer torch does not need it
        pass
    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=dev)
    buf.zero_()
    torch.cuda.synchronize()
    hdl = symm_mem.rendezvous(buf, group)
    dist.barrier()
    return [int(p) for p in hdl.buffer_ptrs], "torch SymmetricMemory", (buf, hdl), errors


class Gen:
    def __init__(self, dev, seed):
        self.g = torch.Generator(device=dev)
        self.g.manual_seed(seed)
        self.dev = dev

    def __call__(self, shape, dtype):
        return (torch.randn(shape, generator=self.g, device=self.dev) * 2).to(dtype)


def gather(t, world):
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return parts


def bits(t):
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


def same_across_ranks(t, world):
    parts = [bits(p) for p in gather(t.contiguous(), world)]  # NCCL has no int16: gather, then view
    return all(torch.equal(parts[0], p) for p in parts[1:])


class StepAbort(RuntimeError):
    """A collective failed on some rank: raised on every rank together (no rank is left
    waiting in a collective its peer skipped)."""

    def __init__(self, msg, timeout):
        super().__init__(msg)
        self.timeout = timeout


def sync_check(mb, dev, fails=None, tag=""):
    """mb.check() agreed across ranks: if any rank failed, every rank raises StepAbort, or,
    with ``fails``, records it there and goes on (every rank made the call, so the ranks stay
    in step: the next call uses the other phase)."""
    st = mb.check()
    code = torch.tensor([st.code], device=dev)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    worst = int(code.item())
    if worst:
        msg = f"{tag}: rank {mb.rank}: {st} (worst status over ranks: {worst})"
        if fails is None:
            raise StepAbort(msg, timeout=worst == 1)
        fails.append(msg)
        print(f"  [rank {mb.rank}] FAIL {msg}", flush=True)
        return False
    return True


def _peek_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def peek(table, index, offs_ptr, out_ptr, n, BLOCK: tl.constexpr):
        base = tl.load(table + index).to(tl.pointer_type(tl.int64))
        i = tl.arange(0, BLOCK)
        m = i < n
        o = tl.load(offs_ptr + i, mask=m, other=0)
        tl.store(out_ptr + i, tl.load(base + o, mask=m, other=0, volatile=True), mask=m)

    return peek


_PEEK = None


def diagnose_all_reduce(mb, out, ref, numel, two_shot, dev, limit=8):
    """For the first wrong elements of the call just made: where the value came from (own
    shard: hop-1 words of every peer; other owner's shard: its hop-2 sum) and what that inbox
    word holds now (flag, data), next to the expected flag, the output and the reference."""
    global _PEEK
    if _PEEK is None:
        _PEEK = _peek_kernel()
    world, rank = mb.world_size, mb.rank
    seq = mb.seq
    phase, flag = seq & 1, seq & 0xFFFFFFFF
    epw = 1 if out.dtype == torch.float32 else 2
    n_words = (numel + epw - 1) // epw
    shard = ((n_words + world - 1) // world + 7) // 8 * 8 if two_shot else n_words
    lay = mb.layout
    bad = (bits(out) != bits(ref)).nonzero().flatten()[:limit].tolist()
    rows, offs = [], []
    for e in bad:
        w = e // epw
        owner = min(w // shard, world - 1) if two_shot else rank
        if two_shot and owner != rank:
            offs.append(
                mb._hop2
                + (phase * world + owner) * lay.hop2_words
                + (w - owner * shard) * epw
                + e % epw
            )
            rows.append(dict(e=e, w=w, owner=owner, src=owner, hop=2))
        else:
            for src in range(world):
                if src != rank:
                    offs.append(
                        mb._hop1 + (phase * world + src) * lay.slot_words + 16 + (w - rank * shard)
                    )
                    rows.append(dict(e=e, w=w, owner=owner, src=src, hop=1))
    if not offs:
        return []
    o = torch.tensor(offs, dtype=torch.int64, device=dev)
    got = torch.zeros(len(offs), dtype=torch.int64, device=dev)
    _PEEK[(1,)](
        mb._table, rank, o, got, len(offs), BLOCK=max(16, 1 << (len(offs) - 1).bit_length())
    )
    if dev.type == "cuda":
        torch.cuda.synchronize()
    for r, word in zip(rows, got.tolist()):
        data = word & 0xFFFFFFFF
        r.update(
            flag=(word >> 32) & 0xFFFFFFFF,
            expected_flag=flag,
            data_hex=f"{data:08x}",
            data_f32=torch.tensor([data], dtype=torch.int64)
            .to(torch.int32)
            .view(torch.float32)
            .item(),
            out=float(out[r["e"]]),
            ref=float(ref[r["e"]]),
        )
    return rows


# ============================================================================ 1. eager
AR_SIZES = [1, 2, 3, 255, 1000, 4097, 8192, 65536, 131075, 262144]
NORM_SHAPES = [(1, 4096), (8, 7168), (3, 1000), (2, 4097), (5, 5), (64, 512), (1, 16384)]
QK_SHAPES = [(1, 768, 128), (7, 96, 32), (64, 768, 128), (3, 5, 3)]


def eager_checks(mb, rank, world, dev, seed, res):
    gen = Gen(dev, seed * 7919 + rank)
    fails = []
    n = 0
    seq0 = mb.seq

    def mb_calls():
        return mb.seq - seq0

    def fail(msg):
        fails.append(msg)
        print(f"  [rank {rank}] FAIL {msg}", flush=True)

    for dname, dt in DTYPES.items():
        for numel in AR_SIZES:
            if numel * dt.itemsize > CAP:
                continue
            for mblk in [DEFAULT_BLOCK] if numel < 4096 else [DEFAULT_BLOCK, 256, 1024]:
                mb.max_block = mblk
                x = gen((numel,), dt)
                parts = gather(x, world)
                ref = R.all_reduce_reference(parts)
                outs = {}
                for algo in ALGOS:
                    out = torch.full_like(x, float("nan"))
                    mb.all_reduce(x, out, algorithm=algo)
                    sync_check(mb, dev, fails, f"call {mb_calls()}")
                    n += 1
                    outs[algo] = out
                    if not torch.equal(bits(out), bits(ref)):
                        bad = (bits(out) != bits(ref)).sum().item()
                        fail(
                            f"all_reduce {dname} n={numel} {algo} blk={mblk}: {bad} elements differ"
                        )
                        try:
                            res.setdefault("diagnostics", []).append(
                                dict(
                                    call=f"all_reduce {dname} n={numel} {algo} blk={mblk}",
                                    seq=mb.seq,
                                    words=diagnose_all_reduce(
                                        mb, out, ref, numel, algo == "two_shot", dev
                                    ),
                                )
                            )
                        except Exception as e:  # noqa: BLE001 - diagnostics only
                            res.setdefault("diagnostics", []).append(dict(error=repr(e)))
                    if not same_across_ranks(out, world):
                        fail(f"all_reduce {dname} n={numel} {algo}: ranks differ")
                if len(outs) == 2 and not torch.equal(
                    bits(outs["one_shot"]), bits(outs["two_shot"])
                ):
                    fail(f"all_reduce {dname} n={numel}: one-shot != two-shot")
                # in place
                y = x.clone()
                mb.all_reduce(y, algorithm="one_shot")
                sync_check(mb, dev, fails, f"call {mb_calls()}")
                n += 1
                if not torch.equal(bits(y), bits(ref)):
                    fail(f"all_reduce in place {dname} n={numel}")
    mb.max_block = DEFAULT_BLOCK

    for dname, dt in DTYPES.items():
        for rows, cols in NORM_SHAPES:
            if rows * cols * dt.itemsize > CAP:
                continue
            for has_res, gemma, alias in (
                (True, False, False),
                (True, True, True),
                (False, False, False),
                (True, False, True),
            ):
                x = gen((rows, cols), dt)
                parts = gather(x, world)
                residual = gather(gen((rows, cols), dt), world)[0] if has_res else None
                weight = gather(gen((cols,), dt), world)[0]
                eps = 1e-6 if dt != torch.float16 else 1e-5
                ref_o, ref_r = R.add_rms_norm_reference_parts(
                    parts, residual, weight, eps, gemma=gemma
                )
                got = {}
                for algo in ALGOS:
                    xx = x.clone()
                    rr = residual.clone() if has_res else None
                    if alias:
                        out, rout = xx, (rr if has_res else torch.full_like(x, float("nan")))
                    else:
                        out, rout = (
                            torch.full_like(x, float("nan")),
                            torch.full_like(x, float("nan")),
                        )
                    mb.add_rms_norm(
                        xx, rr, weight, eps, gemma=gemma, out=out, residual_out=rout, algorithm=algo
                    )
                    sync_check(mb, dev, fails, f"call {mb_calls()}")
                    n += 1
                    tag = f"add_rms_norm {dname} {rows}x{cols} res={has_res} gemma={gemma} alias={alias} {algo}"
                    if not torch.equal(bits(rout), bits(ref_r)):
                        fail(f"{tag}: residual_out differs from the reference")
                    err = (
                        ((out.float() - ref_o.float()).abs() - TOL[dt] * (1 + ref_o.float().abs()))
                        .max()
                        .item()
                    )
                    if not (err <= 0) or out.isnan().any():
                        fail(f"{tag}: out off by {err}")
                    if not same_across_ranks(out, world) or not same_across_ranks(rout, world):
                        fail(f"{tag}: ranks differ")
                    got[algo] = out.clone()
                if len(got) == 2 and not torch.equal(bits(got["one_shot"]), bits(got["two_shot"])):
                    fail(f"add_rms_norm {dname} {rows}x{cols}: one-shot != two-shot")

    for dname, dt in DTYPES.items():
        for tokens, qc, kc in QK_SHAPES:
            fused = gen((tokens, qc + kc + 64), dt)
            fparts = gather(fused, world)
            q_parts = [f[:, :qc] for f in fparts]
            k_parts = [f[:, qc : qc + kc] for f in fparts]
            qws = gather(gen((qc,), dt), world)
            kws = gather(gen((kc,), dt), world)
            ref_q, ref_k = R.qk_rms_norm_reference(q_parts, k_parts, qws, kws, 1e-6)[rank]
            for inplace in (False, True):
                f = fused.clone()
                q, k = f[:, :qc], f[:, qc : qc + kc]
                if inplace:
                    qo, ko = q, k
                else:
                    qo = torch.full((tokens, qc), float("nan"), dtype=dt, device=dev)
                    ko = torch.full((tokens, kc), float("nan"), dtype=dt, device=dev)
                mb.qk_rms_norm(q, k, qws[rank], kws[rank], 1e-6, q_out=qo, k_out=ko)
                sync_check(mb, dev, fails, f"call {mb_calls()}")
                n += 1
                for name, o, r in (("q", qo, ref_q), ("k", ko, ref_k)):
                    err = (
                        ((o.float() - r.float()).abs() - TOL[dt] * (1 + r.float().abs()))
                        .max()
                        .item()
                    )
                    if not (err <= 0) or o.isnan().any():
                        fail(
                            f"qk_rms_norm {dname} {tokens}x{qc}/{kc} inplace={inplace} {name}: off by {err}"
                        )
    res["eager"] = dict(calls=n, failures=fails)
    log(rank, f"[1] eager: {n} calls, {len(fails)} failures")


# ============================================================================ 2. graphs
class GraphCheck:
    """K calls over their own buffers; per replay: randomise, gather everyone's inputs,
    replay the ccl graph, compute references and count mismatches on the device."""

    def __init__(self, mb, rank, world, dev):
        self.mb, self.rank, self.world, self.dev = mb, rank, world, dev
        self.specs = []
        # per dtype: [per-rank inputs, shared (rank 0 broadcast), outputs checked across ranks,
        # local outputs]; views are carved at 256-element offsets.
        self.sizes = {d: [0, 0, 0, 0] for d in DTYPES.values()}
        self.outputs = {}  # kind-2 views (outputs that must match across ranks), per dtype

    def _alloc(self, dt, kind, numel):
        off = self.sizes[dt][kind]
        self.sizes[dt][kind] = off + (numel + 255) // 256 * 256
        if kind == 2:
            self.outputs.setdefault(dt, []).append((off, numel))
        return (kind, off, numel)

    def add_all_reduce(self, dt, numel, algo, inplace):
        x = self._alloc(dt, 2 if inplace else 0, numel)
        out = x if inplace else self._alloc(dt, 2, numel)
        self.specs.append(
            dict(op="ar", dt=dt, numel=numel, algo=algo, inplace=inplace, x=x, out=out)
        )

    def add_norm(self, dt, rows, cols, algo, has_res, gemma, inplace):
        n = rows * cols
        s = dict(
            op="norm",
            dt=dt,
            rows=rows,
            cols=cols,
            algo=algo,
            has_res=has_res,
            gemma=gemma,
            inplace=inplace,
            eps=1e-6 if dt != torch.float16 else 1e-5,
        )
        s["w"] = self._alloc(dt, 1, cols)
        if inplace:
            s["x"] = self._alloc(dt, 2, n)  # x is per rank, then overwritten by out
            s["out"] = s["x"]
            s["res_src"] = self._alloc(dt, 1, n) if has_res else None
            s["res"] = self._alloc(dt, 2, n) if has_res else None  # copied from res_src
            s["rout"] = s["res"] if has_res else self._alloc(dt, 2, n)
        else:
            s["x"] = self._alloc(dt, 0, n)
            s["res"] = self._alloc(dt, 1, n) if has_res else None
            s["out"] = self._alloc(dt, 2, n)
            s["rout"] = self._alloc(dt, 2, n)
        self.specs.append(s)

    def add_qk(self, dt, tokens, qc, kc, inplace):
        s = dict(op="qk", dt=dt, tokens=tokens, qc=qc, kc=kc, inplace=inplace)
        width = qc + kc + 32
        s["f"] = self._alloc(dt, 3 if inplace else 0, tokens * width)
        s["width"] = width
        s["qw"] = self._alloc(dt, 0, qc)
        s["kw"] = self._alloc(dt, 0, kc)
        if not inplace:
            s["qo"] = self._alloc(dt, 3, tokens * qc)
            s["ko"] = self._alloc(dt, 3, tokens * kc)
        self.specs.append(s)

    def build(self):
        dev, world = self.dev, self.world
        self.buf = {
            d: [torch.zeros(max(n, 256), dtype=d, device=dev) for n in sz]
            for d, sz in self.sizes.items()
        }
        # gathered copies of the per-rank inputs (kind 0), the in-place buffers (kind 2, before
        # the ops) and the local in-place buffers (kind 3, before the ops), and of kind 2 after
        # (flat [world * n] storage: gloo wants it; NCCL takes either)
        self.gin = {
            d: [
                torch.zeros(world * b.numel(), dtype=d, device=dev).view(world, -1)
                for b in self.buf[d]
            ]
            for d in self.buf
        }
        self.gpost = {
            d: torch.zeros(world * self.buf[d][2].numel(), dtype=d, device=dev).view(world, -1)
            for d in self.buf
        }
        self.bad = torch.zeros(len(self.specs), 3, dtype=torch.int64, device=dev)
        self.outmask = {}
        for d in self.buf:
            m = torch.zeros(self.buf[d][2].numel(), dtype=torch.bool, device=dev)
            for off, n in self.outputs.get(d, []):
                m[off : off + n] = True
            self.outmask[d] = m

    def view(self, d, ref, src=None, shape=None):
        kind, off, n = ref
        t = (self.buf[d][kind] if src is None else src)[off : off + n]
        return t if shape is None else t.view(shape)

    def pre(self):
        """Randomise; broadcast the shared part; poison outputs; gather pre-op inputs."""
        for d, bufs in self.buf.items():
            bufs[0].normal_()
            bufs[1].normal_()
            dist.broadcast(bufs[1], 0)
            bufs[2].normal_()
            bufs[3].normal_()
        for s in self.specs:
            d = s["dt"]
            if s["op"] == "ar" and not s["inplace"]:
                self.view(d, s["out"]).fill_(float("nan"))
            elif s["op"] == "norm":
                if s["inplace"]:
                    if s["has_res"]:
                        self.view(d, s["res"]).copy_(self.view(d, s["res_src"]))
                    else:
                        self.view(d, s["rout"]).fill_(float("nan"))
                else:
                    self.view(d, s["out"]).fill_(float("nan"))
                    self.view(d, s["rout"]).fill_(float("nan"))
            elif s["op"] == "qk" and not s["inplace"]:
                self.view(d, s["qo"]).fill_(float("nan"))
                self.view(d, s["ko"]).fill_(float("nan"))
        for d, bufs in self.buf.items():
            for kind in (0, 2, 3):
                dist.all_gather_into_tensor(self.gin[d][kind].view(-1), bufs[kind])

    def ops(self):
        mb = self.mb
        for s in self.specs:
            d = s["dt"]
            if s["op"] == "ar":
                x = self.view(d, s["x"])
                mb.all_reduce(x, self.view(d, s["out"]), algorithm=s["algo"])
            elif s["op"] == "norm":
                shp = (s["rows"], s["cols"])
                mb.add_rms_norm(
                    self.view(d, s["x"], shape=shp),
                    self.view(d, s["res"], shape=shp) if s["has_res"] else None,
                    self.view(d, s["w"]),
                    s["eps"],
                    gemma=s["gemma"],
                    out=self.view(d, s["out"], shape=shp),
                    residual_out=self.view(d, s["rout"], shape=shp),
                    algorithm=s["algo"],
                )
            else:
                f = self.view(d, s["f"], shape=(s["tokens"], s["width"]))
                q, k = f[:, : s["qc"]], f[:, s["qc"] : s["qc"] + s["kc"]]
                if s["inplace"]:
                    qo, ko = q, k
                else:
                    qo = self.view(d, s["qo"], shape=(s["tokens"], s["qc"]))
                    ko = self.view(d, s["ko"], shape=(s["tokens"], s["kc"]))
                mb.qk_rms_norm(
                    q, k, self.view(d, s["qw"]), self.view(d, s["kw"]), 1e-6, q_out=qo, k_out=ko
                )

    def post(self):
        world, rank = self.world, self.rank
        for d, bufs in self.buf.items():
            dist.all_gather_into_tensor(self.gpost[d].view(-1), bufs[2])
        for i, s in enumerate(self.specs):
            d = s["dt"]
            kind_x = s["x"][0] if "x" in s else None

            def pre_inputs(ref, shape=None, kind=None):
                kind = ref[0] if kind is None else kind
                return [
                    self.view(d, ref, src=self.gin[d][kind][r], shape=shape) for r in range(world)
                ]

            if s["op"] == "ar":
                ref = R.all_reduce_reference(pre_inputs(s["x"], kind=kind_x))
                out = self.view(d, s["out"])
                self.bad[i, 0] += (bits(out) != bits(ref)).sum()
            elif s["op"] == "norm":
                shp = (s["rows"], s["cols"])
                parts = pre_inputs(s["x"], shape=shp, kind=kind_x)
                if s["has_res"]:
                    res = self.view(d, s["res_src"] if s["inplace"] else s["res"], shape=shp)
                else:
                    res = None
                ro, rr = R.add_rms_norm_reference_parts(
                    parts, res, self.view(d, s["w"]), s["eps"], gemma=s["gemma"]
                )
                out = self.view(d, s["out"], shape=shp)
                rout = self.view(d, s["rout"], shape=shp)
                self.bad[i, 0] += (bits(rout) != bits(rr)).sum()
                tol = TOL[d]
                far = (out.float() - ro.float()).abs() > tol * (1 + ro.float().abs())
                self.bad[i, 0] += (far | out.isnan()).sum()
            else:
                shp = (s["tokens"], s["width"])
                fs = pre_inputs(s["f"], shape=shp)
                qc, kc = s["qc"], s["kc"]
                qws = [self.view(d, s["qw"], src=self.gin[d][0][r]) for r in range(world)]
                kws = [self.view(d, s["kw"], src=self.gin[d][0][r]) for r in range(world)]
                rq, rk = R.qk_rms_norm_reference(
                    [f[:, :qc] for f in fs], [f[:, qc : qc + kc] for f in fs], qws, kws, 1e-6
                )[rank]
                if s["inplace"]:
                    f = self.view(d, s["f"], shape=shp)
                    qo, ko = f[:, :qc], f[:, qc : qc + kc]
                else:
                    qo = self.view(d, s["qo"], shape=(s["tokens"], qc))
                    ko = self.view(d, s["ko"], shape=(s["tokens"], kc))
                tol = TOL[d]
                for o, r in ((qo, rq), (ko, rk)):
                    far = (o.float() - r.float()).abs() > tol * (1 + r.float().abs())
                    self.bad[i, 0] += (far | o.isnan()).sum()
        # every rank's kind-2 buffer (all_reduce and norm outputs) must be bitwise identical
        for j, (d, g) in enumerate(self.gpost.items()):
            b = bits(g)
            self.bad[j, 1] += ((b != b[0:1]) & self.outmask[d]).sum()


def graph_checks(mb, rank, world, dev, seed, res, min_ops, budget_s, args_checked_replays=20):
    t_start = time.time()
    gc = GraphCheck(mb, rank, world, dev)
    for dname, dt in DTYPES.items():
        for numel in (2, 1000, 4097, 8192, 65536):
            for algo in ALGOS:
                gc.add_all_reduce(dt, numel, algo, inplace=(numel == 4097))
        for rows, cols in ((1, 4096), (8, 7168), (3, 1001)):
            for algo in ALGOS:
                gc.add_norm(
                    dt, rows, cols, algo, has_res=True, gemma=(cols == 1001), inplace=(rows == 1)
                )
        gc.add_norm(dt, 2, 512, "one_shot", has_res=False, gemma=False, inplace=True)
        gc.add_qk(dt, 1, 768, 128, inplace=False)
        gc.add_qk(dt, 8, 96, 32, inplace=True)
    gc.build()
    K = len(gc.specs)
    reps = max(1, math.ceil(min_ops / K))
    torch.manual_seed(seed + rank)
    # warm-up: compiles every variant and creates NCCL communicators, outside capture
    gc.pre()
    gc.ops()
    gc.post()
    sync_check(mb, dev)
    torch.cuda.synchronize()
    gc.bad.zero_()
    g_ops = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_ops):
        gc.ops()
    aux_mode = "graph"
    try:
        g_pre, g_post = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_pre):
            gc.pre()
        with torch.cuda.graph(g_post):
            gc.post()
        pre, post = g_pre.replay, g_post.replay
    except Exception as e:  # noqa: BLE001 - fall back to eager checking
        aux_mode = f"eager ({type(e).__name__}: {e})"[:300]
        torch.cuda.synchronize()
        pre, post = gc.pre, gc.post
    dist.barrier()
    torch.cuda.synchronize()
    done = 0
    t0 = time.time()
    for it in range(reps):
        seq0 = mb.seq if it < args_checked_replays else None
        pre()
        g_ops.replay()
        post()
        done += 1
        if seq0 is not None:  # the first replays one by one: a failure names its call
            st = mb.check()
            code = torch.tensor([st.code], device=dev)
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
            if int(code.item()):
                idx = (st.failed_seq - seq0 - 1) % K if st.failed_seq else None
                spec = gc.specs[idx] if idx is not None else {}
                raise StepAbort(
                    f"graph replay {it}: {st}; failing call #{idx}: "
                    f"{ {k: str(v) for k, v in spec.items() if k in ('op', 'dt', 'numel', 'rows', 'cols', 'algo', 'inplace', 'tokens')} }",
                    timeout=int(code.item()) == 1,
                )
        if it % 200 == 199:
            torch.cuda.synchronize()
            # both ranks must agree to stop (a rank that stops early leaves its peer waiting)
            flag = torch.tensor([1 if time.time() - t_start > budget_s else 0], device=dev)
            dist.all_reduce(flag)
            if flag.item():
                break
    torch.cuda.synchronize()
    elapsed = time.time() - t0
    sync_check(mb, dev)
    bad = gc.bad.cpu()
    total = dist.all_reduce(gc.bad, op=dist.ReduceOp.SUM) or gc.bad
    per_spec = []
    for i, s in enumerate(gc.specs):
        if int(bad[i, 0]):
            per_spec.append(
                dict(
                    spec={
                        k: str(v)
                        for k, v in s.items()
                        if k in ("op", "dt", "numel", "rows", "cols", "algo", "inplace", "tokens")
                    },
                    mismatches=int(bad[i, 0]),
                )
            )
    res["graph"] = dict(
        calls_per_graph=K,
        replays=done,
        ops=K * done,
        aux=aux_mode,
        seconds=round(elapsed, 2),
        reference_mismatches=int(bad[:, 0].sum()),
        cross_rank_mismatches=int(bad[:, 1].sum()),
        failing_specs=per_spec[:20],
        total_mismatches_all_ranks=int(total.sum().item()),
    )
    log(
        rank,
        f"[2] graph replay: {K} calls x {done} replays = {K * done} ops in {elapsed:.1f}s, "
        f"mismatches ref={int(bad[:, 0].sum())} cross-rank={int(bad[:, 1].sum())} (aux {aux_mode})",
    )


# ============================================================================ 3. mismatch
def mismatch_check(mb, rank, world, dev, res):
    x = torch.ones(16 + rank, device=dev)
    out = torch.full_like(x, float("nan"))
    mb.all_reduce(x, out)
    ok = False
    msg = ""
    try:
        mb.raise_if_failed()
        msg = "no error raised"
    except CollectiveMismatch as e:
        ok = bool(out.isnan().all())
        msg = str(e)
    y = torch.full((100,), float(rank + 1), device=dev)
    mb.all_reduce(y)
    mb.raise_if_failed()
    usable = bool((y == world * (world + 1) / 2).all())
    res["mismatch"] = dict(raised=ok, usable_after=usable, message=msg)
    log(rank, f"[3] mismatch: raised={ok} usable_after={usable}: {msg[:160]}")


# ============================================================================ 4. timing
FUSED_SHAPES = ((1, 4096), (8, 7168))  # the fused norm's timed shapes (the bars)


def _fused_inputs(rows, cols, dt, dev):
    """Fresh random (x, residual, norm weight) of one fused-norm timing shape."""
    return (torch.randn(rows, cols, device=dev).to(dt), torch.randn(rows, cols, device=dev).to(dt),
            torch.randn(cols, device=dev).to(dt))


def time_graph(fn, n_inner=32, reps=120, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n_inner):
            fn()
    dist.barrier()
    torch.cuda.synchronize()
    for _ in range(10):
        g.replay()
    evs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for a, b in evs:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    us = sorted(a.elapsed_time(b) * 1000.0 / n_inner for a, b in evs)
    return dict(
        p50=round(statistics.median(us), 3),
        p10=round(us[len(us) // 10], 3),
        p90=round(us[(len(us) * 9) // 10], 3),
    )


def timing(mb, rank, world, dev, res, quick):
    import torch.distributed._symmetric_memory as symm_mem

    group = dist.group.WORLD.group_name
    T = {}
    sizes = [("8B fp32", torch.float32, 2)] + [
        (f"{kb}KB bf16", torch.bfloat16, kb * 512) for kb in (1, 8, 16, 64, 256)
    ]
    blocks = [DEFAULT_BLOCK] if quick else [DEFAULT_BLOCK, 256, 1024]
    for label, dt, numel in sizes:
        row = {}
        x = torch.randn(numel, device=dev).to(dt)
        out = torch.empty_like(x)
        for algo in ALGOS:
            for blk in blocks if numel >= 2048 else [DEFAULT_BLOCK]:  # small: one program
                mb.max_block = blk
                r = time_graph(lambda: mb.all_reduce(x, out, algorithm=algo))
                sync_check(mb, dev)
                row[f"ccl_{algo}_b{blk}"] = r
        mb.max_block = DEFAULT_BLOCK
        for variant in ("cuda_fenced", "cuda_xchg"):
            if label in ("8B fp32", "16KB bf16"):
                from ccl.kernels import ll

                saved = mb.backend
                mb.backend = ll.backend_for("cuda", variant)
                row[f"ccl_one_shot_{variant}"] = time_graph(
                    lambda: mb.all_reduce(x, out, algorithm="one_shot")
                )
                sync_check(mb, dev)
                mb.backend = saved
        y = x.clone()
        row["nccl"] = time_graph(lambda: dist.all_reduce(y))
        try:
            sb = symm_mem.empty(numel, dtype=dt, device=dev)
            sb.copy_(x)
            symm_mem.rendezvous(sb, group)
            row["symm_mem_one_shot"] = time_graph(
                lambda: torch.ops.symm_mem.one_shot_all_reduce(sb, "sum", group)
            )
        except Exception as e:  # noqa: BLE001 - recorded
            row["symm_mem_one_shot"] = dict(error=f"{type(e).__name__}: {e}"[:300])
        best = min(
            (v["p50"], k)
            for k, v in row.items()
            if k.startswith("ccl_one_shot_b") or k.startswith("ccl_two_shot_b")
        )
        row["ccl_best"] = dict(p50=best[0], variant=best[1])
        T[label] = row
        log(
            rank,
            f"  {label:>10}: ccl best {best[0]:.2f} us ({best[1]}), nccl {row['nccl']['p50']:.2f}, "
            f"symm {row['symm_mem_one_shot'].get('p50', float('nan')):.2f}",
        )

    F = {}
    for rows, cols in FUSED_SHAPES:
        dt = torch.bfloat16
        x, resid, w = _fused_inputs(rows, cols, dt, dev)
        row = {}
        for algo in ALGOS:
            row[f"ccl_fused_{algo}"] = time_graph(
                lambda: mb.add_rms_norm(
                    x, resid, w, 1e-6, out=x, residual_out=resid, algorithm=algo
                )
            )
            sync_check(mb, dev)
        # rows split over programs (norm_chunk payload words each; 0: one program per row)
        default_chunk = mb.norm_chunk
        for chunk in [] if quick else [0, 128, 256, 512]:
            mb.norm_chunk = chunk
            row[f"ccl_fused_one_shot_chunk{chunk}"] = time_graph(
                lambda: mb.add_rms_norm(x, resid, w, 1e-6, out=x, residual_out=resid)
            )
            sync_check(mb, dev)
        mb.norm_chunk = default_chunk
        flat = x.view(-1)
        plain = {}
        for blk in [DEFAULT_BLOCK] if quick else [DEFAULT_BLOCK, 256, 1024]:
            mb.max_block = blk
            plain[blk] = time_graph(lambda: mb.all_reduce(flat, algorithm="one_shot"))["p50"]
        mb.max_block = DEFAULT_BLOCK
        row["ccl_all_reduce_one_shot"] = dict(p50=plain[DEFAULT_BLOCK])
        blk = min(plain, key=plain.get)
        row["ccl_all_reduce_best"] = dict(p50=plain[blk], max_block=blk)

        def nccl_torch():
            dist.all_reduce(x)
            h = x.float() + resid.float()
            resid.copy_(h.to(dt))
            var = h.pow(2).mean(dim=-1, keepdim=True)
            x.copy_((h * torch.rsqrt(var + 1e-6)).to(dt) * w)

        row["nccl_plus_torch"] = time_graph(nccl_torch)
        row["nccl_all_reduce"] = time_graph(lambda: dist.all_reduce(x))
        F[f"{rows}x{cols} bf16"] = row
        log(
            rank,
            f"  fused {rows}x{cols}: ccl {row['ccl_fused_one_shot']['p50']:.2f} us, plain ccl ar "
            f"{row['ccl_all_reduce_best']['p50']:.2f}, nccl+torch {row['nccl_plus_torch']['p50']:.2f}",
        )
    q = torch.randn(1, 768 + 128, device=dev).to(torch.bfloat16)
    qw = torch.randn(768, device=dev).to(torch.bfloat16)
    kw = torch.randn(128, device=dev).to(torch.bfloat16)
    F["qk_rms_norm 1x768/128 bf16"] = dict(
        ccl=time_graph(
            lambda: mb.qk_rms_norm(
                q[:, :768], q[:, 768:], qw, kw, 1e-6, q_out=q[:, :768], k_out=q[:, 768:]
            )
        )
    )
    sync_check(mb, dev)
    res["timing_all_reduce_us"] = T
    res["timing_fused_us"] = F


# (name, max_block, ar_warps, fast_poll, poll_delay_ns, max_programs, algorithm). Every configuration is timed SWEEP_ROUNDS times, interleaved, and its
# median p50 kept: one graph's p50 can sit 0.3 us off another's for the same configuration.
POLL_SWEEP = [
    ("default", 64, 0, True, 0, 1024, "one_shot"),
    ("d150", 64, 0, True, 150, 1024, "one_shot"),
    ("d300", 64, 0, True, 300, 1024, "one_shot"),
    ("b32 w1", 32, 1, True, 0, 1024, "one_shot"),
    ("s4 shape", 1024, 0, True, 0, 128, "one_shot"),
    ("s4 shape two-poll", 1024, 0, False, 0, 128, "one_shot"),
    ("two default", 64, 0, True, 0, 1024, "two_shot"),
]
# fused norm: (name, poll_delay_ns, norm_chunk, norm_warps)
NORM_SWEEP = [
    ("default", 300, 256, 0),
    ("d0", 0, 256, 0),
    ("c64 w1", 300, 64, 1),
    ("c128 w2", 300, 128, 2),
    ("c512 w8", 300, 512, 8),
]
SWEEP_ROUNDS = 3


def _sweep_set(mb, cfg):
    _, mb.max_block, mb.ar_warps, mb.fast_poll, mb.poll_delay_ns, mb.max_programs, _ = cfg


def _norm_set(mb, cfg):
    _, mb.norm_poll_delay_ns, mb.norm_chunk, mb.norm_warps = cfg


def _interleaved(mb, dev, cfgs, apply, checked, timed):
    """{name: p50 (median of SWEEP_ROUNDS graph p50s), runs, ok} for configurations ``cfgs``
    (name first), timed in interleaved rounds; ``apply(mb, cfg)`` sets one, ``checked(cfg)``
    checks its result against the reference (first round), ``timed(cfg)`` is the call."""
    runs = {c[0]: [] for c in cfgs}
    ok = {}
    for rnd in range(SWEEP_ROUNDS):
        for cfg in cfgs:
            apply(mb, cfg)
            if rnd == 0:
                ok[cfg[0]] = checked(cfg)
            runs[cfg[0]].append(time_graph(timed(cfg))["p50"])
            sync_check(mb, dev)
    return {k: dict(p50=statistics.median(v), runs=v, ok=ok[k]) for k, v in runs.items()}


def poll_sweep(mb, rank, world, dev, res):
    """All-reduce and fused-norm latency (graph replay p50, median of SWEEP_ROUNDS
    interleaved rounds) over the poll variants and program shapes of POLL_SWEEP, each
    configuration's result checked against the reference first."""
    saved = (None, mb.max_block, mb.ar_warps, mb.fast_poll, mb.poll_delay_ns, mb.max_programs,
             None)
    saved_norm = (None, mb.norm_poll_delay_ns, mb.norm_chunk, mb.norm_warps)
    sizes = [("8B fp32", torch.float32, 2)] + [
        (f"{kb}KB bf16", torch.bfloat16, kb * 512) for kb in (1, 8, 16, 64, 256)
    ]
    # Compile every variant first (a rank compiling while its peer spins would look slow).
    tc = time.time()
    mb._compile_only = True
    try:
        for label, dt, numel in sizes:
            x = torch.empty(numel, dtype=dt, device=dev)
            for cfg in POLL_SWEEP:
                _sweep_set(mb, cfg)
                mb.all_reduce(x, torch.empty_like(x), algorithm=cfg[-1])
        _sweep_set(mb, saved)
        for rows, cols in FUSED_SHAPES:
            x = torch.empty(rows, cols, dtype=torch.bfloat16, device=dev)
            for cfg in NORM_SWEEP:
                _norm_set(mb, cfg)
                mb.add_rms_norm(x, x, x[0], 1e-6, out=x, residual_out=x)
    finally:
        mb._compile_only = False
        _sweep_set(mb, saved)
        _norm_set(mb, saved_norm)
    log(rank, f"# sweep compile: {time.time() - tc:.0f}s")
    dist.barrier()
    S = {}
    g = torch.Generator(device=dev).manual_seed(1234 + rank)
    for label, dt, numel in sizes:
        x = torch.randn(numel, device=dev, generator=g).to(dt)
        ref = torch.stack(gather(x.float(), world)).sum(0)
        out = torch.empty_like(x)
        cfgs = [c for c in POLL_SWEEP if c[-1] == "one_shot" or numel >= 8192]
        tol = (1e-5 if dt == torch.float32 else 2e-2) * max(1.0, ref.abs().max().item())

        def checked(cfg):
            out.fill_(float("nan"))
            mb.all_reduce(x, out, algorithm=cfg[-1])
            sync_check(mb, dev)
            return bool((out.float() - ref).abs().max().item() <= tol)

        row = _interleaved(mb, dev, cfgs, _sweep_set, checked,
                           lambda cfg: lambda: mb.all_reduce(x, out, algorithm=cfg[-1]))
        y = x.clone()
        row["nccl"] = time_graph(lambda: dist.all_reduce(y))
        S[label] = row
        best = min((v["p50"], k) for k, v in row.items() if k != "nccl")
        log(rank, f"  sweep {label:>10}: default {row['default']['p50']:.2f} {row['default']['runs']}, "
            f"best {best[0]:.2f} ({best[1]}) {row[best[1]].get('runs')}, nccl "
            f"{row['nccl']['p50']:.2f}")
    _sweep_set(mb, saved)
    N = {}
    for rows, cols in FUSED_SHAPES:
        dt = torch.bfloat16
        x, resid, w = _fused_inputs(rows, cols, dt, dev)
        x0, r0 = x.clone(), resid.clone()  # the timed calls below work in place
        h = torch.stack(gather(x.float(), world)).sum(0) + resid.float()
        ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()

        def checked(cfg):
            o, r = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
            mb.add_rms_norm(x0, r0, w, 1e-6, out=o, residual_out=r)
            sync_check(mb, dev)
            return bool(
                torch.equal(r, h.to(dt))
                and (o.float() - ref).abs().max().item() <= 3e-2 * ref.abs().max().item()
            )

        row = _interleaved(
            mb, dev, NORM_SWEEP, _norm_set, checked,
            lambda cfg: lambda: mb.add_rms_norm(x, resid, w, 1e-6, out=x, residual_out=resid),
        )
        N[f"{rows}x{cols} bf16"] = row
        log(rank, f"  sweep norm {rows}x{cols}: " + ", ".join(
            f"{k} {v['p50']:.2f}" for k, v in row.items()))
    _sweep_set(mb, saved)
    _norm_set(mb, saved_norm)
    res["poll_sweep_all_reduce_us"] = S
    res["poll_sweep_norm_us"] = N


def targets(res):
    T, F = res.get("timing_all_reduce_us", {}), res.get("timing_fused_us", {})
    out = []

    def chk(name, val, ref, factor):
        if val is None or ref is None:
            out.append(dict(target=name, ok=None))
            return
        out.append(
            dict(
                target=name,
                value=round(val, 3),
                limit=round(ref * factor, 3),
                ok=val <= ref * factor,
            )
        )

    for label in ("1KB bf16", "8KB bf16", "16KB bf16"):
        r = T.get(label, {})
        v = r.get("ccl_best", {}).get("p50")
        chk(f"{label} <= 0.5x symm_mem", v, r.get("symm_mem_one_shot", {}).get("p50"), 0.5)
        chk(f"{label} <= 0.15x nccl", v, r.get("nccl", {}).get("p50"), 0.15)
    for label in ("64KB bf16", "256KB bf16"):
        r = T.get(label, {})
        chk(
            f"{label} <= 0.6x symm_mem",
            r.get("ccl_best", {}).get("p50"),
            r.get("symm_mem_one_shot", {}).get("p50"),
            0.6,
        )
    r = T.get("8B fp32", {})
    chk(
        "8B fp32 <= 0.15x nccl",
        r.get("ccl_best", {}).get("p50"),
        r.get("nccl", {}).get("p50"),
        0.15,
    )
    for label, r in F.items():
        if "ccl_fused_one_shot" not in r:
            continue
        v = r["ccl_fused_one_shot"]["p50"]
        chk(f"fused {label} <= 0.2x nccl+torch", v, r["nccl_plus_torch"]["p50"], 0.2)
        chk(f"fused {label} <= 1.3x ccl all_reduce", v, r["ccl_all_reduce_best"]["p50"], 1.3)
    return out


# ============================================================================ 5. timeout
def timeout_check(mb, rank, world, dev, res, store):
    skipper = world - 1
    x = torch.ones(1000, device=dev)
    mb.all_reduce(x)
    mb.raise_if_failed()
    dist.barrier()
    torch.cuda.synchronize()
    if rank == skipper:
        store.set(f"timeout/skipped/{rank}", "1")
        for r in range(world - 1):
            store.wait([f"timeout/done/{r}"])
        res["timeout"] = dict(skipped=True)
        return
    mb.set_timeout(2.0)
    t0 = time.perf_counter()
    mb.all_reduce(torch.ones(1000, device=dev))
    torch.cuda.synchronize()
    took = time.perf_counter() - t0
    got = None
    try:
        mb.raise_if_failed()
        got = "no error"
    except CollectiveTimeout as e:
        got = dict(missing=e.missing_ranks, message=str(e))
    spin_ns = took * 1e9 / mb.limit
    store.set(f"timeout/done/{rank}", "1")
    ok = isinstance(got, dict) and got["missing"] == [skipper]
    res["timeout"] = dict(
        ok=ok, seconds=round(took, 3), polls=mb.limit, ns_per_poll=round(spin_ns, 1), result=got
    )
    log(
        rank,
        f"[5] timeout: ok={ok} after {took:.2f}s ({mb.limit} polls, {spin_ns:.0f} ns/poll): {got}",
    )


# ============================================================================ driver
def variant_jobs():
    """One job per kernel variant this script launches (DeviceMailbox's block policy)."""
    jobs = []
    for dt in DTYPES.values():
        for numel in AR_SIZES + [512, 1024 * 512, 4096 * 4, 8192 * 4, 32768, 131072]:
            if numel * dt.itemsize > CAP:
                continue
            for blk in (DEFAULT_BLOCK, 256, 1024):
                for algo in ("one_shot", "two_shot"):
                    jobs.append(("ar", dt, numel, blk, algo, None))
        for rows, cols in NORM_SHAPES + [(3, 1001), (2, 512)]:
            if rows * cols * dt.itemsize <= CAP:
                for algo in ("one_shot", "two_shot"):
                    for has_res in (True, False):
                        jobs.append(("norm", dt, (rows, cols), has_res, algo, None))
        for tokens, qc, kc in QK_SHAPES + [(8, 96, 32), (1, 768, 128)]:
            jobs.append(("qk", dt, (tokens, qc, kc), None, None, None))
    for variant in ("cuda_fenced", "cuda_xchg"):
        for numel, dt in ((2, torch.float32), (8192, torch.bfloat16)):
            jobs.append(("ar", dt, numel, DEFAULT_BLOCK, "one_shot", variant))

    def key(job):
        op, dt, shape, extra, algo, variant = job
        epw = 1 if dt == torch.float32 else 2
        if op == "ar":  # (program shapes: DeviceMailbox._ar_shape; no dedup beyond sizes)
            return (op, str(dt), shape, extra, algo, variant)
        if op == "norm":
            wpr = (shape[1] + epw - 1) // epw
            return (op, str(dt), 1 << max(0, (wpr - 1).bit_length()), algo, extra, shape[0] == 1)
        tokens, qc, kc = shape
        return (op, str(dt), 1 << (qc - 1).bit_length(), 1 << (kc - 1).bit_length(), tokens == 1)

    unique = {}
    for job in jobs:
        unique.setdefault(key(job), job)
    return [unique[k] for k in sorted(unique, key=str)]


def compile_jobs(mb, jobs, dev):
    """Compile-only launches (``DeviceMailbox._compile_only``): fills the Triton cache and this
    process's kernel cache, launches nothing. Returns errors."""
    from ccl.kernels import ll

    saved = (mb.backend, mb.max_block, mb._compile_only)
    mb._compile_only = True
    errors = []
    try:
        for op, dt, shape, extra, algo, variant in jobs:
            mb.backend = ll.backend_for("cuda", variant)
            try:
                if op == "ar":
                    mb.max_block = extra
                    x = torch.empty(shape, dtype=dt, device=dev)
                    mb.all_reduce(x, torch.empty_like(x), algorithm=algo)
                elif op == "norm":
                    x = torch.empty(shape, dtype=dt, device=dev)
                    for gemma in (False, True):
                        mb.add_rms_norm(
                            x,
                            x if extra else None,
                            torch.empty(shape[1], dtype=dt, device=dev),
                            gemma=gemma,
                            out=x,
                            residual_out=x,
                            algorithm=algo,
                        )
                else:
                    tokens, qc, kc = shape
                    f = torch.empty(tokens, qc + kc + 64, dtype=dt, device=dev)
                    mb.qk_rms_norm(
                        f[:, :qc],
                        f[:, qc : qc + kc],
                        torch.empty(qc, dtype=dt, device=dev),
                        torch.empty(kc, dtype=dt, device=dev),
                        q_out=f[:, :qc],
                        k_out=f[:, qc : qc + kc],
                    )
            except Exception as e:  # noqa: BLE001 - the launch will compile (or fail) itself
                errors.append(f"{op} {dt} {shape}: {type(e).__name__}: {e}"[:300])
    finally:
        mb.backend, mb.max_block, mb._compile_only = saved
    return errors


def precompile(worker, nworkers, quick):
    """Pool worker: compiles its share of the variants into the Triton cache before the ranks
    start (the ranks then only load them)."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    world = int(os.environ.get("CCL_VALIDATE_WORLD", "2"))
    mb = DeviceMailbox(0, world, [1 << 20] * world, CAP, dev)
    mb.two_shot_enabled = True
    jobs = variant_jobs()
    return compile_jobs(mb, [j for i, j in enumerate(jobs) if i % nworkers == worker], dev)


def _precompile_worker(worker, nworkers, quick, q):
    try:
        q.put((worker, precompile(worker, nworkers, quick)))
    except Exception:  # noqa: BLE001
        q.put((worker, [traceback.format_exc()[-2000:]]))


def _watchdog(rank, step, seconds, res, save):
    """If a step overruns (a peer stuck in another collective, say): dump every thread's
    stack, save what we have, and leave, so the run ends with a diagnosis, not a hang."""
    import faulthandler
    import threading

    def fire():
        print(f"[rank {rank}] WATCHDOG: step {step} exceeded {seconds}s; stacks:", flush=True)
        faulthandler.dump_traceback(all_threads=True)
        res["errors"].append(dict(step=step, watchdog=f"exceeded {seconds}s"))
        try:
            save()
        finally:
            os._exit(3)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


def rank_main(rank, world, args, port):
    global ALGOS
    ALGOS = tuple(a for a in os.environ.get("CCL_VALIDATE_ALGOS", ",".join(ALGOS)).split(",") if a)
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}" if port else "env://",
        rank=rank,
        world_size=world,
        device_id=dev,
    )
    store = dist.distributed_c10d._get_default_store()
    res = dict(
        rank=rank,
        world=world,
        device=torch.cuda.get_device_name(dev),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        ccl_import=_CCL_IMPORT,
        errors=[],
    )
    seed_t = torch.tensor([int.from_bytes(os.urandom(4), "little") if rank == 0 else 0], device=dev)
    dist.broadcast(seed_t, 0)
    seed = int(seed_t.item())
    res["seed"] = seed
    nbytes = DeviceMailbox.region_bytes(world, CAP)
    bases, transport, keep, terr = peer_regions(rank, world, nbytes, dev, store)
    res["transport"] = transport
    res["transport_errors"] = terr
    log(
        rank,
        f"# {res['device']} x{world}, torch {res['torch']}, triton {res['triton']}, transport: {transport}"
        f"{' (' + '; '.join(terr) + ')' if terr else ''}, ccl import: {_CCL_IMPORT}",
    )
    mb = DeviceMailbox(rank, world, bases, CAP, dev, timeout=args.timeout)
    mb.two_shot_enabled = True  # validated here even while the library keeps it off on CUDA
    # Every variant compiled (or loaded) on every rank before any collective: a rank that
    # compiles for seconds while its peer spins would trip the peer's timeout.
    tw = time.time()
    res["warm_errors"] = compile_jobs(mb, variant_jobs(), dev)
    res["warm_seconds"] = round(time.time() - tw, 1)
    log(
        rank,
        f"# warm pass: {res['warm_seconds']}s, {len(res['warm_errors'])} errors {res['warm_errors'][:2]}",
    )
    dist.barrier()
    out_dir = args.out or os.environ.get("OUT") or "."
    os.makedirs(out_dir, exist_ok=True)
    out_file = os.path.join(
        out_dir, f"gpu_validate_rank{rank}.json" if rank else "gpu_validate.json"
    )

    def save():
        with open(out_file, "w") as f:
            json.dump(res, f, indent=1, default=str)

    t0 = time.time()
    steps = [
        ("eager", lambda: eager_checks(mb, rank, world, dev, seed, res)),
        (
            "graph",
            lambda: graph_checks(
                mb, rank, world, dev, seed, res, args.graph_ops, args.graph_budget,
                args.checked_replays,
            ),
        ),
        ("mismatch", lambda: mismatch_check(mb, rank, world, dev, res)),
        ("timing", lambda: timing(mb, rank, world, dev, res, args.quick)),
        ("sweep", lambda: poll_sweep(mb, rank, world, dev, res)),
    ]
    broken = False
    budgets = dict(eager=100, graph=130, mismatch=40, timing=170, sweep=200)
    for name, fn in steps:
        if name in args.skip or broken:
            continue
        ts = time.time()
        dog = _watchdog(rank, name, budgets[name], res, save)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - record and go on with the next step
            # A timed-out collective leaves the ranks' sequence numbers apart: stop using it.
            broken = isinstance(exc, CollectiveTimeout) or getattr(exc, "timeout", False)
            tb = traceback.format_exc()
            res["errors"].append(dict(step=name, traceback=tb[-4000:]))
            print(f"[rank {rank}] step {name} failed:\n{tb}", flush=True)
            try:
                mb.raise_if_failed()
            except Exception as e:  # noqa: BLE001
                res["errors"].append(dict(step=name, status=str(e)))
            if name in ("eager", "graph"):
                # the mailbox may be out of step after a failure inside a collective step
                try:
                    torch.cuda.synchronize()
                    dist.barrier()
                except Exception:  # noqa: BLE001
                    pass
        dog.cancel()
        res.setdefault("step_seconds", {})[name] = round(time.time() - ts, 1)
        log(rank, f"# step {name}: {time.time() - ts:.1f}s")
        save()
        dist.barrier()
    if "timeout" not in args.skip and not broken:
        dog = _watchdog(rank, "timeout", 60, res, save)
        try:
            timeout_check(mb, rank, world, dev, res, store)
        except Exception:  # noqa: BLE001
            res["errors"].append(dict(step="timeout", traceback=traceback.format_exc()[-4000:]))
        dog.cancel()
    res["targets"] = targets(res)
    res["seconds"] = round(time.time() - t0, 1)
    save()
    if rank == 0:
        summary(res)
    try:
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    if hasattr(keep, "close"):
        keep.close()


def summary(res):
    print("\n# ---------------------------------------------------------------- summary")
    e = res.get("eager", {})
    g = res.get("graph", {})
    print(
        f"# eager: {e.get('calls')} calls, {len(e.get('failures', []))} failures; graph: {g.get('ops')} ops, "
        f"{g.get('reference_mismatches')} ref / {g.get('cross_rank_mismatches')} cross-rank mismatches; "
        f"mismatch ok={res.get('mismatch', {}).get('raised')}; timeout {res.get('timeout', {}).get('ok')} "
        f"({res.get('timeout', {}).get('ns_per_poll')} ns/poll); errors {len(res['errors'])}"
    )
    print(
        f"# {'size':>11} | {'ccl best':>8} {'1-shot':>7} {'2-shot':>7} | {'nccl':>7} {'symm':>7} |  best variant"
    )
    for label, r in res.get("timing_all_reduce_us", {}).items():
        one = r.get(f"ccl_one_shot_b{DEFAULT_BLOCK}", {}).get("p50", float("nan"))
        two = r.get(f"ccl_two_shot_b{DEFAULT_BLOCK}", {}).get("p50", float("nan"))
        print(
            f"  {label:>11} | {r['ccl_best']['p50']:8.2f} {one:7.2f} {two:7.2f} | {r['nccl']['p50']:7.2f} "
            f"{r['symm_mem_one_shot'].get('p50', float('nan')):7.2f} |  {r['ccl_best']['variant']}"
        )
    for label, r in res.get("timing_fused_us", {}).items():
        print(
            f"  {label:>24}: "
            + ", ".join(f"{k} {v['p50']:.2f}" for k, v in r.items() if "p50" in v)
        )
    for t in res.get("targets", []):
        print(f"  target {t['target']:<40} {t.get('value')} <= {t.get('limit')}: {t['ok']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--graph-ops", type=int, default=100_000)
    ap.add_argument(
        "--graph-budget", type=float, default=90.0, help="seconds for the graph replay loop"
    )
    ap.add_argument(
        "--precompile",
        type=int,
        default=12,
        help="compile workers before the ranks start (0: none)",
    )
    ap.add_argument("--timeout", type=float, default=5.0, help="DeviceMailbox timeout (s)")
    ap.add_argument(
        "--checked-replays",
        type=int,
        default=20,
        help="graph replays checked one by one (a failure then names its call)",
    )
    ap.add_argument("--precompile-only", action="store_true", help="fill the Triton cache and exit")
    ap.add_argument("--algos", default="one_shot,two_shot", help="algorithms to check and time")
    ap.add_argument(
        "--skip", default="", help="comma list of steps: eager,graph,mismatch,timing,sweep,timeout"
    )
    ap.add_argument("--sweep", action="store_true", help="also run the poll-variant sweep")
    args = ap.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    if not args.sweep:
        args.skip.add("sweep")
    global ALGOS
    ALGOS = tuple(a for a in args.algos.split(",") if a)
    os.environ["CCL_VALIDATE_ALGOS"] = ",".join(ALGOS)
    if "LOCAL_RANK" in os.environ:  # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        rank_main(rank, world, args, None)
        return
    import multiprocessing as mp
    import socket

    world = args.world or torch.cuda.device_count()
    ctx = mp.get_context("spawn")
    if args.precompile:
        t0 = time.time()
        os.environ["CCL_VALIDATE_WORLD"] = str(world)
        q = ctx.Queue()
        ps = [
            ctx.Process(target=_precompile_worker, args=(i, args.precompile, args.quick, q))
            for i in range(args.precompile)
        ]
        for p in ps:
            p.start()
        errs = []
        for _ in ps:
            try:
                errs += q.get(timeout=300)[1]
            except Exception:  # noqa: BLE001
                errs.append("precompile worker timed out")
                break
        for p in ps:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        print(f"# precompile: {time.time() - t0:.0f}s, {len(errs)} errors {errs[:3]}", flush=True)
    if args.precompile_only:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=rank_main, args=(r, world, args, port)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    sys.exit(max(abs(p.exitcode or 0) for p in procs))


if __name__ == "__main__":
    main()
