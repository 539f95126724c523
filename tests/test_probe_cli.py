"""ccl-probe end to end: transport rows, every ordered pair mapped and verified, latencies."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("ranks", [2, 3])
def test_probe_verifies_every_pair(tmp_path, ranks):
    out = tmp_path / "probe.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ccl.probe",
            "--ranks",
            str(ranks),
            "--iters",
            "300",
            "--json",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    report = json.loads(out.read_text())
    assert report["schema"] == "ccl-probe/1" and report["ok"]
    assert report["world_size"] == ranks
    rows = {r["name"]: r for r in report["transports"]}
    assert set(rows) == {"host", "cuda", "level_zero"}
    assert rows["host"]["available"] is True
    for name in ("cuda", "level_zero"):
        assert isinstance(rows[name]["available"], bool) and rows[name]["reason"]
    host = report["host"]
    pairs = {(p["src"], p["dst"]): p for p in host["pairs"]}
    assert set(pairs) == {(a, b) for a in range(ranks) for b in range(ranks) if a != b}
    for p in pairs.values():
        assert p["mapped"] and p["verified"] and p["error"] is None, p
        assert p["round_trips"] == 300
        assert 0 < p["one_way_us_p50"] <= p["rtt_us_p50"] <= p["rtt_us_p99"]
    assert "host" in proc.stdout and "ordered pairs verified OK" in proc.stdout


def test_availability_rows_never_raise(monkeypatch):
    import ccl.probe as probe

    rows = probe.transport_rows()
    assert [r["name"] for r in rows] == ["host", "cuda", "level_zero"]
    # A transport module that exists but has no availability() is "not built", not a crash.
    import types

    fake = types.ModuleType("ccl.transport.cuda")
    monkeypatch.setitem(sys.modules, "ccl.transport.cuda", fake)
    available, reason = probe._availability("cuda")
    assert available is False and "not built" in reason
    fake.availability = lambda: (_ for _ in ()).throw(OSError("libcuda.so.1: cannot open"))
    available, reason = probe._availability("cuda")
    assert available is False and "libcuda" in reason


def test_device_probe_without_probe_pairs(monkeypatch):
    import types

    import ccl.probe as probe

    monkeypatch.setitem(sys.modules, "ccl.transport.level_zero", types.ModuleType("x"))
    assert probe.probe_device_transport("level_zero", worker=None)["status"] == "not implemented"


def test_device_section_rendering():
    import ccl.probe as probe

    rep = {
        "status": "ok",
        "devices": [
            {"rank": 0, "index": 0, "name": "GPU A", "bus_id": "0000:01:00.0"},
            {"rank": 1, "index": 1, "name": "GPU B", "bus_id": "0000:02:00.0"},
        ],
        "p2p": [[True, True], [True, True]],
        "latency": "ping-pong in one kernel",
        "pairs": [
            {
                "src": 0,
                "dst": 1,
                "mapped": True,
                "verified": True,
                "error": None,
                "push_us_p50": 1.5,
                "push_us_p99": 2.5,
            },
            {
                "src": 1,
                "dst": 0,
                "mapped": True,
                "verified": False,
                "error": "word 3 did not arrive",
                "push_us_p50": None,
                "push_us_p99": None,
            },
        ],
    }
    text = "\n".join(probe._device_lines("cuda", rep))
    assert "GPU B" in text and "0:yy" in text and "1.50" in text and "did not arrive" in text
    assert "1/2 ordered pairs verified FAILED" in text
    assert not probe._device_ok(rep)
    rep["pairs"][1]["verified"] = True
    assert probe._device_ok(rep)
    assert probe._device_ok({"status": "not implemented"})
    assert not probe._device_ok({"status": "error", "error": "boom"})
