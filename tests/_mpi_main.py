"""Run under ``mpiexec -n N python tests/_mpi_main.py SEED OUTDIR``: the mpi4py bootstrap of
ccl.Communicator (test helper for test_rendezvous.py). Each rank writes OUTDIR/rank<r>.json."""

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mpi4py import MPI  # noqa: E402


def main(seed: int) -> dict:
    import torch

    import ccl
    from _harness import first_diff, gen, ref_add_rms_norm, ref_sum

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    report = {"rank": rank}
    with ccl.Communicator(world, max_bytes=4096, timeout=30) as comm:
        assert (comm.rank, comm.world_size) == (rank, size)
        for dtype in (torch.float32, torch.bfloat16):
            for numel, algo in ((7, "one_shot"), (1000, "two_shot"), (700, None)):
                parts = [gen(seed, (numel, str(dtype), r), (numel,), dtype) for r in range(size)]
                x = parts[rank].clone()
                comm.all_reduce(x, algorithm=algo)
                d = first_diff(x, ref_sum(parts))
                assert d is None, f"mailbox all_reduce {numel} {dtype}: {d}"
            # above capacity: through MPI (fp32 accumulation in MPI's order)
            parts = [gen(seed, ("big", str(dtype), r), (5000,), dtype) for r in range(size)]
            x = parts[rank].clone()
            comm.all_reduce(x)
            d = first_diff(x.float(), ref_sum([p.float() for p in parts]), rtol=1e-2, atol=1e-2)
            assert d is None, f"MPI fallback {dtype}: {d}"
            parts = [gen(seed, ("avg", str(dtype), r), (5000,), dtype) for r in range(size)]
            x = parts[rank].clone()
            comm.all_reduce(x, "avg")
            want = ref_sum([p.float() for p in parts]) / size
            assert first_diff(x.float(), want, rtol=1e-2, atol=1e-2) is None, "MPI AVG"
        parts = [gen(seed, ("norm", r), (4, 96), torch.float32) for r in range(size)]
        res = gen(seed, "res", (4, 96), torch.float32)
        w = gen(seed, "w", (96,), torch.float32)
        o, r = comm.all_reduce_add_rms_norm(parts[rank], res, w, 1e-6)
        eo, er = ref_add_rms_norm(parts, res, w, 1e-6)
        assert first_diff(r, er) is None and first_diff(o, eo, rtol=5e-5, atol=1e-5) is None
        report["seq"] = comm.seq
    # a communicator over a split of COMM_WORLD (one group per rank parity)
    sub = world.Split(rank % 2, rank)
    with ccl.Communicator(sub, timeout=30) as comm:
        x = torch.full((9,), float(rank + 1))
        comm.all_reduce(x)
        want = sum(r + 1 for r in range(size) if r % 2 == rank % 2)
        assert x.tolist() == [want] * 9, (x.tolist(), want)
    sub.Free()
    report["ok"] = True
    return report


if __name__ == "__main__":
    try:
        out = main(int(sys.argv[1]))
    except BaseException as e:  # noqa: BLE001
        out = {"rank": MPI.COMM_WORLD.Get_rank(), "ok": False, "error": repr(e),
               "traceback": traceback.format_exc()}
    with open(os.path.join(sys.argv[2], f"rank{MPI.COMM_WORLD.Get_rank()}.json"), "w") as f:
        json.dump(out, f)
    sys.exit(0 if out.get("ok") else 1)
