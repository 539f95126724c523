"""ccl-bench end to end: spawned ranks, JSON structure, correctness column, baseline present."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ccl._bench_cases import OPS

pytestmark = pytest.mark.timeout(60)


def _bench(tmp_path, *args, timeout=55):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "ccl.bench", "--quick", "--no-plot", "--json", str(out), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(out.read_text()), proc


def test_quick_run_two_ranks(tmp_path):
    report, proc = _bench(tmp_path)
    assert report["schema"] == "ccl-bench/1"
    assert report["config"]["world_size"] == 2
    assert report["config"]["launcher"] == "spawn"
    assert report["machine"]["nproc"] >= 1 and report["machine"]["cpu_model"]
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert report["summary"]["ok"] and report["summary"]["wrong"] == 0
    assert {r["op"] for r in report["results"]} == set(OPS)
    for r in report["results"]:
        assert r["wrong"] == 0, r
        assert r["checked"] > 0, r
        assert r["baseline_verified"], r
        for side in ("ccl", "baseline"):
            s = r[side]
            assert s is not None, (side, r)
            assert 0 < s["p10_us"] <= s["p50_us"] <= s["p90_us"] <= s["p99_us"], (side, s)
            assert s["reps"] >= 10 and s["mean_us"] > 0
        assert r["ratio_p50"] == pytest.approx(r["ccl"]["p50_us"] / r["baseline"]["p50_us"])
        if r["op"] != "qk_rms_norm":
            assert r["ranks_agree"] is True
    fused = [r for r in report["results"] if r["op"] == "all_reduce_add_rms_norm"]
    assert any(r["shape"] == "1x4096" for r in fused)  # the performance bar's shape
    # stdout: nccl-tests style header, one row per point, footer
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# ccl-bench")
    assert any("size(B)" in ln and "#wrong" in ln for ln in lines)
    rows = [ln for ln in lines if ln and not ln.startswith("#")]
    assert len(rows) == len(report["results"])
    assert lines[-1].startswith("# OK")
    assert report["stdout"] == lines


def test_tune_reports_a_threshold(tmp_path):
    report, proc = _bench(tmp_path, "--ops", "all_reduce", "--tune")
    tune = report["tune"]
    assert tune["world_size"] == 2 and tune["sizes"]
    for t in tune["sizes"]:
        assert t["one_shot_p50_us"] > 0 and t["two_shot_p50_us"] > 0
    for r in report["results"]:
        assert r["wrong"] == 0 and set(r["variants"]) == {"one_shot", "two_shot"}
    assert "suggested ccl/tuning.py entry" in proc.stdout


def test_plot_from_report(tmp_path):
    pytest.importorskip("matplotlib")
    from ccl._bench_plot import plot_report

    stats = {"p10_us": 1.0, "p50_us": 2.0, "p90_us": 3.0, "p99_us": 4.0}
    report = {
        "machine": {"ccl": "0", "cpu_model": "cpu", "nproc": 2},
        "config": {
            "transport": "host",
            "device": "cpu",
            "world_size": 2,
            "dtype": "float32",
            "launcher": "spawn",
            "baselines": {"all_reduce": "gloo"},
        },
        "results": [
            {"op": "all_reduce", "size_bytes": s, "ccl": stats, "baseline": stats, "wrong": 0}
            for s in (8, 64)
        ],
    }
    plot_report(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_fail_fast():
    proc = subprocess.run(
        [sys.executable, "-m", "ccl.bench", "--ops", "broadcast"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "broadcast" in proc.stderr


def test_cuda_device_without_gpus_fails_fast(tmp_path):
    """--device cuda needs one GPU per rank: on a machine with fewer it says so and exits 2
    without spawning anything (the CUDA run itself is bench/results/h200x2-ccl-bench-*.json)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs: the CUDA bench would run for real")
    proc = subprocess.run(
        [sys.executable, "-m", "ccl.bench", "--device", "cuda", "--quick", "--no-plot"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--device cuda needs 2 GPUs" in proc.stderr
    assert not list(tmp_path.iterdir()), "nothing may be written"


def test_cuda_plan_covers_every_op_and_the_decode_shapes():
    """The CUDA bench's point list (no GPU needed to build it)."""
    import argparse

    import torch

    from ccl import _bench_cuda

    args = argparse.Namespace(
        ops=list(OPS), torch_dtype=torch.bfloat16, qk_max_tokens=32, hidden=4096, quick=True,
        min_bytes=8, max_bytes=64 * 1024, seed=1, verbose=False,
    )
    bench = _bench_cuda._Bench(0, 2, torch.device("cpu"), None, args)
    plan = bench.plan()
    assert {op for op, _, _ in plan} == set(OPS)
    norms = {shape for op, _, shape in plan if op == "all_reduce_add_rms_norm"}
    assert {(1, 4096), (8, 7168), (8, 4096), (32, 4096)} <= norms
    assert [shape[0] for op, _, shape in plan if op == "qk_rms_norm"] == [1, 8, 32]
    for op, size, shape in plan:
        if op == "all_reduce":
            assert size == 2 * shape[0] and size <= 64 * 1024
        elif op == "all_reduce_add_rms_norm":
            assert size == 2 * shape[0] * shape[1]


def test_launcher_detection():
    from ccl._cli_launch import detect_launcher

    assert detect_launcher({}) == "none"
    assert detect_launcher({"RANK": "0", "WORLD_SIZE": "2"}) == "torchrun"
    assert detect_launcher({"PMI_RANK": "0", "PMI_SIZE": "2"}) == "mpi"
    assert detect_launcher({"PMI_RANK": "0", "PMI_SIZE": "1"}) == "none"
    assert (
        detect_launcher({"CCL_CLI_LAUNCHER": "spawn", "RANK": "0", "WORLD_SIZE": "2"})
        == "spawn-worker"
    )


def test_size_parsing_and_sweep():
    from ccl.bench import _parse, _size, _sizes

    assert _size("8") == 8 and _size("64K") == 65536 and _size("4MiB") == 4 << 20
    sizes = _sizes(_parse([]))
    assert sizes[0] == 8 and sizes[-1] == 4 << 20 and len(sizes) == 20


class _OneRank:
    rank, world_size = 0, 1

    def barrier(self):
        pass

    def all_gather(self, obj):
        return [obj]


class _LazyComm:
    """A communicator that never writes its output: the bench must count it wrong."""

    rank, world_size, max_bytes = 0, 1, 1 << 20

    def all_reduce(self, tensor, op=None, *, out=None, algorithm=None):
        return out


def test_wrong_results_are_counted_and_not_timed():
    import torch
    import torch.distributed as dist

    from ccl._bench_cases import CaseConfig, CpuTimer
    from ccl.bench import _measure_point, _parse

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        args = _parse(["--quick"])
        cfg = CaseConfig(
            device="cpu",
            dtype=torch.float32,
            seed=1,
            hidden=4096,
            qk_dims=(64, 16),
            qk_max_tokens=8,
            fallback="gloo",
        )
        res = _measure_point(_OneRank(), _LazyComm(), CpuTimer(), cfg, args, "all_reduce", 64, True)
    finally:
        dist.destroy_process_group()
    assert res["wrong"] > 0 and res["ccl"] is None and res["ratio_p50"] is None
    assert res["baseline"] is not None and res["baseline_verified"]


def test_gpu_moe_bench_smoke_in_the_interpreter(tmp_path):
    """bench/gpu_moe.py end to end on the Triton interpreter (--small): every tile variant is
    checked against its fp32 reference and recorded; a variant the kernels cannot run fails
    the script."""
    pytest.importorskip("triton")
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_moe.py"
    out = tmp_path / "moe.json"
    env = dict(__import__("os").environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(script), "--small", "--inner", "1", "--rounds", "1",
         "--down", "default,4x64x2", "--json", str(out)],
        capture_output=True, text=True, timeout=55, env=env,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["tiles"]) for r in rows] == [
        ("gate_up", "default"), ("down", "default"), ("down", "4x64x2")]
    assert all(r["ok"] for r in rows)


def test_gpu_gemv_bench_smoke_in_the_interpreter(tmp_path):
    """bench/gpu_gemv.py end to end on the Triton interpreter (--small): each case's variants
    (a CCL_GEMV_TILES entry applies to its own path only) are checked against the fp32
    reference and recorded next to torch's F.linear."""
    pytest.importorskip("triton")
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_gemv.py"
    out = tmp_path / "gemv.json"
    env = dict(__import__("os").environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(script), "--small", "--inner", "1", "--rounds", "1",
         "--cases", "int4_M1,int4_M8", "--variants", "default,dot_int4=16x64x4x2",
         "--json", str(out)],
        capture_output=True, text=True, timeout=100, env=env,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rows = json.loads(out.read_text())["rows"]
    assert [(r["case"], r["variant"]) for r in rows] == [
        ("int4_M1", "default"), ("int4_M1", "torch F.linear (bf16 weight)"),
        ("int4_M8", "default"), ("int4_M8", "dot_int4=16x64x4x2"),
        ("int4_M8", "torch F.linear (bf16 weight)")]
    assert all(r["ok"] for r in rows)
    assert rows[3]["tiles"] == "16x64x4x2"
