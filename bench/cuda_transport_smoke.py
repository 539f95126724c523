#!/usr/bin/env python3
"""Smoke test of the CUDA transport on a multi-GPU machine: prints PASS or FAIL.

    python bench/cuda_transport_smoke.py                 # 2 processes, GPU 0 and GPU 1
    python bench/cuda_transport_smoke.py --isolate       # also: each process sees one GPU
    python bench/cuda_transport_smoke.py --world 4       # 4 processes on GPUs 0..3

What it checks, in order (one line per check and rank; any FAIL fails the run):
  parent   availability, device list, driver P2P matrix, and probe_local_pairs (in-process
           verified write/read-back for every ordered GPU pair)
  workers  (one process per GPU, fds exchanged over SCM_RIGHTS through a FileStore rendezvous)
    1 region      CudaRegion: VMM allocation, zeroed, exported as a POSIX fd
    2 connect     exchange_fds + import_peer + verify_peers (real write/read-back, agreed)
    3 ce_push     copy-engine writes into every peer's region, read back by the owner
    4 torch_add   a torch kernel on this GPU writes (torch.add(..., out=peer_view)) into the
                  peer's memory through a tensor built on the peer address; owner checks
    5 torch_copy  peer_view.copy_(src): device-to-device copy into peer memory; owner checks
    6 triton_ll   flag-in-word push/poll (DESIGN.md §3) with Triton: every rank pushes LL8
                  packets {data u32 | flag u32} into its slot of each peer's inbox, then polls
                  its own inbox with volatile loads (bounded spin), 2 phases, 200 rounds;
                  checks every value and reports the eager round-trip time
    7 probe       ccl.transport.cuda.probe_pairs (what ccl-probe runs): fresh regions, verified
                  pairs, and the in-kernel ping-pong latency (push = rtt / 2) per pair
The script sets NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
(NVLink multicast stays off on the lent machines). Exit code 0 = PASS, 1 = FAIL, 2 = not
runnable here (no driver or too few GPUs; the reason is printed).
"""

from __future__ import annotations

import os

# Before torch (or anything that may load NCCL/NVSHMEM) is imported, in this process and in
# the workers (they inherit the environment).
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NBYTES = 1 << 20
ROUNDS = 200
LL_WORDS = 1024  # payload words per push (4 KiB of data, 8 KiB of packets)


# =========================================================================== worker side
class Checks:
    def __init__(self, rank: int):
        self.rank = rank
        self.rows: list[dict] = []

    def run(self, name: str, fn):
        t0 = time.perf_counter()
        try:
            detail = fn() or ""
            ok = True
        except Exception as e:  # noqa: BLE001 - reported, not raised
            ok = False
            detail = f"{type(e).__name__}: {e}"
            tb = traceback.format_exc()
            print(f"[rank {self.rank}] {name} failed:\n{tb}", file=sys.stderr, flush=True)
        ms = (time.perf_counter() - t0) * 1e3
        self.rows.append({"rank": self.rank, "check": name, "ok": ok, "ms": ms, "detail": detail})
        return ok


def _triton_kernels():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["flag"])
    def ll_push(dst_ptr, src_ptr, n, flag, BLOCK: tl.constexpr):
        # One 8-byte store per word: {data u32 | flag u32 << 32} (atomic at 8 bytes). Signed
        # containers (int32 data, int64 packets) keep torch's unsigned-dtype gaps out of it.
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(src_ptr + offs, mask=mask, other=0)
        packet = (x.to(tl.int64) & 0xFFFFFFFF) | (flag.to(tl.int64) << 32)
        tl.store(dst_ptr + offs, packet, mask=mask)

    @triton.jit(do_not_specialize=["flag", "max_iters"])
    def ll_poll(inbox_ptr, out_ptr, status_ptr, n, flag, max_iters, BLOCK: tl.constexpr):
        # Spin (bounded) on our own inbox until every word carries `flag`.
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        want = flag.to(tl.int64)
        pk = tl.load(inbox_ptr + offs, mask=mask, other=0, volatile=True)
        missing = tl.sum((((pk >> 32) != want) & mask).to(tl.int32), axis=0)
        it = 0
        while (missing > 0) & (it < max_iters):
            pk = tl.load(inbox_ptr + offs, mask=mask, other=0, volatile=True)
            missing = tl.sum((((pk >> 32) != want) & mask).to(tl.int32), axis=0)
            it += 1
        tl.store(out_ptr + offs, (pk & 0xFFFFFFFF).to(tl.int32), mask=mask)
        tl.store(status_ptr, tl.load(status_ptr) + missing)  # accumulates across rounds

    return ll_push, ll_poll


def worker(rank: int, world: int, device: int, store_path: str) -> list[dict]:
    from datetime import timedelta

    import torch
    from torch.distributed import FileStore

    from ccl.errors import TransportError
    from ccl.rendezvous import StoreExchange
    from ccl.transport import cuda

    checks = Checks(rank)
    store = FileStore(store_path, world)
    store.set_timeout(timedelta(seconds=120))
    ex = StoreExchange(store, rank, world, "cuda-smoke")
    dev = torch.device("cuda", device)
    if torch.cuda.is_available():
        torch.cuda.set_device(device)

    def need_torch_cuda():
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} has no usable CUDA "
                               f"(torch.version.cuda={torch.version.cuda})")
    state: dict = {}
    peers = [p for p in range(world) if p != rank]

    def view(addr: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A tensor on THIS GPU over raw device address `addr` (n elements, not owned)."""
        nbytes = n * torch.empty(0, dtype=dtype).element_size()
        st = torch._C._construct_storage_from_data_pointer(addr, dev, nbytes)
        return torch.empty(0, dtype=dtype, device=dev).set_(st, 0, (n,), (1,))

    def barrier(tag):
        ex.all_gather(tag)

    def region():
        a = cuda.availability(device)
        if not a:
            raise TransportError(a.reason)
        r = cuda.CudaRegion(world, rank, NBYTES, device)
        state["region"] = r
        if r.read(rank, 0, 4096) != bytes(4096):
            raise AssertionError("a fresh region is not zeroed")
        return f"{r.bytes} B at {r.ptr:#x} on cuda:{device}, fd {r.fd}"

    def connect():
        r = state["region"]
        r.connect(ex, timeout_s=60)
        return "bases " + " ".join(f"{b:#x}" for b in r.bases)

    def ce_push():
        r = state["region"]
        payload = lambda w: bytes((w * 31 + i) & 0xFF for i in range(4096))  # noqa: E731
        for p in peers:
            r.write(p, rank * 4096, payload(rank))
        barrier("ce")
        for w in peers:
            got = r.read(rank, w * 4096, 4096)
            if got != payload(w):
                raise AssertionError(f"rank {w}'s copy-engine write is wrong: {got[:16].hex()}")
        barrier("ce-read")
        return f"{len(peers)} x 4 KiB"

    base_add = 64 * 1024
    n = 4096

    def torch_add():
        need_torch_cuda()
        r = state["region"]
        ref = torch.arange(n, device=dev, dtype=torch.float32)
        for p in peers:
            dst = view(r.bases[p] + base_add + rank * n * 4, n, torch.float32)
            torch.add(ref, rank + 1, out=dst)  # a kernel on this GPU stores into peer memory
        torch.cuda.synchronize()
        barrier("add")
        mine = view(r.bases[rank] + base_add, world * n, torch.float32).view(world, n)
        for w in peers:
            if not torch.equal(mine[w], ref + (w + 1)):
                bad = (mine[w] != ref + (w + 1)).nonzero()[:4].flatten().tolist()
                raise AssertionError(f"rank {w}'s kernel write is wrong at {bad}")
        torch.cuda.synchronize()
        barrier("add-read")
        return f"{len(peers)} x {n} fp32"

    base_copy = base_add + world * n * 4

    def torch_copy():
        need_torch_cuda()
        r = state["region"]
        src = torch.full((n,), float(rank) + 0.5, device=dev, dtype=torch.float32)
        for p in peers:
            view(r.bases[p] + base_copy + rank * n * 4, n, torch.float32).copy_(src)
        torch.cuda.synchronize()
        barrier("copy")
        mine = view(r.bases[rank] + base_copy, world * n, torch.float32).view(world, n)
        for w in peers:
            if not bool((mine[w] == float(w) + 0.5).all()):
                raise AssertionError(f"rank {w}'s copy_ into this region is wrong")
        torch.cuda.synchronize()
        barrier("copy-read")
        return f"{len(peers)} x {n} fp32"

    base_ll = 256 * 1024  # inbox: [2 phases][world slots][LL_WORDS] u64 packets

    def triton_ll():
        try:
            import triton

            ll_push, ll_poll = _triton_kernels()
        except ImportError as e:
            return f"SKIPPED (no triton: {e})"
        need_torch_cuda()
        r = state["region"]
        slot = LL_WORDS * 8
        if base_ll + 2 * world * slot > NBYTES:
            raise AssertionError("inbox does not fit")
        inboxes = {
            p: view(r.bases[p] + base_ll, 2 * world * LL_WORDS, torch.int64) for p in range(world)
        }
        out = torch.empty((world, LL_WORDS), device=dev, dtype=torch.int32)
        status = torch.zeros(world, device=dev, dtype=torch.int32)
        words = torch.arange(LL_WORDS, device=dev, dtype=torch.int64)
        block = triton.next_power_of_2(LL_WORDS)
        stream = torch.cuda.current_stream()
        barrier("ll-start")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for rnd in range(ROUNDS):
            flag = rnd + 1
            phase = rnd % 2
            src = ((rank + 1) * 100000 + rnd * 7 + words).to(torch.int32)
            for p in peers:
                dst = inboxes[p][(phase * world + rank) * LL_WORDS :][:LL_WORDS]
                ll_push[(1,)](dst, src, LL_WORDS, flag, BLOCK=block)
            for w in peers:
                inbox = inboxes[rank][(phase * world + w) * LL_WORDS :][:LL_WORDS]
                ll_poll[(1,)](inbox, out[w], status[w:], LL_WORDS, flag, 20_000_000,
                              BLOCK=block)
            if rnd % 50 == 49 or rnd == ROUNDS - 1:
                stream.synchronize()
                if int(status.max()) != 0:
                    missing = {w: int(status[w]) for w in peers}
                    raise AssertionError(f"round {rnd}: bounded spin expired, words missing "
                                         f"per source rank {missing}")
                for w in peers:
                    want = ((w + 1) * 100000 + rnd * 7 + words).to(torch.int32)
                    if not torch.equal(out[w], want):
                        raise AssertionError(f"round {rnd}: payload from rank {w} is wrong")
        torch.cuda.synchronize()
        us = (time.perf_counter() - t0) / ROUNDS * 1e6
        barrier("ll-end")
        return (f"{ROUNDS} rounds x {LL_WORDS} words, {us:.1f} us/round eager (push + poll "
                f"launches, not a graph-replay latency)")

    class ProbeWorker:  # the ccl-probe worker interface over our exchange
        def __init__(self):
            self.rank, self.world_size = rank, world

        def all_gather(self, obj):
            return ex.all_gather(obj)

        def barrier(self):
            ex.all_gather(None)

    def probe():
        os.environ["LOCAL_RANK"] = str(device)  # probe_pairs picks LOCAL_RANK's GPU
        rep = cuda.probe_pairs(ProbeWorker())
        lines = []
        for p in rep["pairs"]:
            if p["src"] != rank:
                continue
            if not p["verified"] or p["push_us_p50"] is None:
                raise AssertionError(f"pair {p['src']}->{p['dst']}: {p} ({rep['latency']})")
            lines.append(f"{p['src']}->{p['dst']} push p50 {p['push_us_p50']:.2f} us "
                         f"p99 {p['push_us_p99']:.2f} us")
        return "; ".join(lines)

    steps = [("region", region), ("connect", connect), ("ce_push", ce_push),
             ("torch_add", torch_add), ("torch_copy", torch_copy), ("triton_ll", triton_ll),
             ("probe", probe)]
    try:
        for name, fn in steps:
            if not checks.run(name, fn):
                # Later steps need this one. Peers blocked in a barrier this rank will not
                # reach fail through the store's timeout.
                break
    finally:
        r = state.get("region")
        if r is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # no kernel may still use the mappings
            r.close()
    return checks.rows


def worker_main(args) -> int:
    rows: list[dict] = []
    try:
        rows = worker(args.rank, args.world, args.device, args.store)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rows.append({"rank": args.rank, "check": "worker", "ok": False, "ms": 0.0,
                     "detail": f"{type(e).__name__}: {e}"})
    print("RESULT " + json.dumps(rows), flush=True)
    return 0


# =========================================================================== parent side
def print_row(row: dict) -> None:
    status = "PASS" if row["ok"] else "FAIL"
    print(f"  rank {row['rank']:>2} | {row['check']:<11} | {status} | {row['ms']:9.1f} ms | "
          f"{row['detail']}", flush=True)


def run_workers(world: int, isolate: bool, timeout: float) -> list[dict]:
    tmp = tempfile.mkdtemp(prefix="ccl-cuda-smoke-")
    store = os.path.join(tmp, "store")
    procs = []
    for rank in range(world):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        device = rank
        if isolate:
            visible = env.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(world)]
            env["CUDA_VISIBLE_DEVICES"] = ids[rank]
            device = 0
        cmd = [sys.executable, __file__, "--worker", "--rank", str(rank), "--world", str(world),
               "--device", str(device), "--store", store]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    rows: list[dict] = []
    deadline = time.monotonic() + timeout
    for rank, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            out = ""
            rows.append({"rank": rank, "check": "worker", "ok": False, "ms": timeout * 1e3,
                         "detail": f"timed out after {timeout:.0f} s (killed)"})
        results = [ln for ln in (out or "").splitlines() if ln.startswith("RESULT ")]
        if results:
            rows += json.loads(results[-1][len("RESULT "):])
        elif not any(r["rank"] == rank and r["check"] == "worker" for r in rows):
            rows.append({"rank": rank, "check": "worker", "ok": False, "ms": 0.0,
                         "detail": f"exited with {p.returncode} and no result (see stderr)"})
    return rows


def parent_main(args) -> int:
    sys.path.insert(0, str(REPO))
    from ccl import _C
    from ccl.transport import cuda

    print("# mailbox-ccl CUDA transport smoke test")
    print(f"# python {sys.version.split()[0]}  pid {os.getpid()}  world {args.world}")
    env_keys = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
                "CUDA_VISIBLE_DEVICES")
    print("# env " + " ".join(f"{k}={os.environ.get(k, '<unset>')}" for k in env_keys))
    status = _C.cuda.driver_status()
    print(f"# driver {status['path']}: loaded={status['loaded']} version="
          f"{status['driver_version']} via_cuGetProcAddress={status['via_get_proc_address']}")
    avail = cuda.availability()
    print(f"# availability: {avail.ok} ({avail.reason})")
    if not avail:
        print(f"NOT RUNNABLE: {avail.reason}")
        return 2
    devs = cuda.devices()
    for d in devs:
        print(f"#   GPU {d['index']}: {d['name']} pci {d['pci_bus_id']} sm "
              f"{d['compute_capability'][0]}{d['compute_capability'][1]} vmm {d['vmm']} "
              f"posix_fd {d['posix_fd']}")
    if len(devs) < args.world:
        print(f"NOT RUNNABLE: needs {args.world} GPUs, {len(devs)} visible")
        return 2
    try:
        import torch

        print(f"# torch {torch.__version__} cuda {torch.version.cuda} "
              f"available {torch.cuda.is_available()}")
    except ImportError:
        print("# torch not importable: the torch checks will fail")

    ok = True
    matrix = cuda.p2p_matrix()
    print("# driver P2P matrix (cuDeviceCanAccessPeer, row = accessing GPU):")
    for i, row in enumerate(matrix):
        print(f"#   {i}: " + " ".join("Y" if v else "." for v in row))
    print("# verified pairs (probe_local_pairs: write through src's mapping, read back on dst):")
    for p in cuda.probe_local_pairs(list(range(args.world))):
        good = p.verified or not p.driver_p2p
        ok &= good
        verdict = "PASS" if good else "FAIL"
        print(f"  pair {p.src}->{p.dst} | driver_p2p {p.driver_p2p!s:<5} | verified "
              f"{p.verified!s:<5} | {verdict} | {p.reason}")

    modes = [("all GPUs visible, device = rank", False)]
    if args.isolate:
        modes.append(("CUDA_VISIBLE_DEVICES = one GPU per process", True))
    for title, isolate in modes:
        print(f"# workers: {title}")
        rows = run_workers(args.world, isolate, args.timeout)
        for row in sorted(rows, key=lambda r: (r["rank"], 0)):
            print_row(row)
        if not isolate:
            ok &= bool(rows) and all(r["ok"] for r in rows)
            ok &= len({r["check"] for r in rows}) >= 7
        else:
            print("#   (isolated mode is informational: whether a VMM fd of a GPU that the "
                  "importing process cannot see maps at all is driver-dependent)")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2, help="processes (one GPU each)")
    ap.add_argument("--isolate", action="store_true",
                    help="also run with CUDA_VISIBLE_DEVICES restricted to one GPU per process")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for the workers")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--device", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--store", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    return worker_main(args) if args.worker else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
