"""ccl-probe: which transports work on this host, verified by actual writes, with latencies.

    ccl-probe                 # spawns --ranks (2) local ranks itself
    ccl-probe --json FILE     # also writes the report
    mpiexec -n 4 ccl-probe    # or torchrun: the launcher's ranks

One row per mechanism, ``name | available | reason`` (host, cuda, level_zero). For the host
transport every rank creates a fresh mailbox region (``HostRegion``), the fds are exchanged
(``ccl.rendezvous.exchange_fds``) and mapped, and for every ordered pair (src, dst):

- src writes a pattern into dst's region, then src (through its mapping) and dst (its own
  memory) read it back;
- src and dst bounce one 8-byte word back and forth with incrementing values (push-only:
  each side writes the other's region and polls its own), giving the round trip and the
  one-way latency (half of it). The loop runs in Python over ``ccl._C.host.store_u64 /
  load_u64``, so each access includes ~0.1 us of binding overhead.

The probe owns its regions (no Communicator runs on them); it uses the tail of each region.

GPU transports plug in through :func:`probe_device_transport`, which calls
``ccl.transport.<name>.probe_pairs(worker)`` when the transport module defines it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "transport_rows", "probe_device_transport"]

logger = logging.getLogger("ccl.probe")

DEVICE_TRANSPORTS = ("cuda", "level_zero")
_PATTERN_WORDS = 64  # 512 B per (src, dst) pair
_LINE = 64  # ping / pong words sit on their own cache lines
_SPIN_CHECK = 1024  # spins between deadline checks
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------- availability
def transport_rows() -> list[dict[str, Any]]:
    """``[{name, available, reason}]`` for host, cuda and level_zero. Local, never raises."""
    rows = []
    for name in ("host", *DEVICE_TRANSPORTS):
        available, reason = _availability(name)
        rows.append({"name": name, "available": available, "reason": reason})
    return rows


def _availability(name: str) -> tuple[bool, str]:
    import importlib

    try:
        module = importlib.import_module(f"ccl.transport.{name}")
    except ImportError as e:
        if getattr(e, "name", None) == f"ccl.transport.{name}":
            return False, f"not built (no ccl.transport.{name} module)"
        return False, f"not built (importing ccl.transport.{name}: {e})"
    fn = getattr(module, "availability", None)
    if fn is None:
        return False, f"not built (ccl.transport.{name} has no availability())"
    try:
        a = fn()
    except Exception as e:  # noqa: BLE001 - a probe reports, it does not crash
        return False, f"error in availability(): {type(e).__name__}: {e}"
    return bool(a), str(getattr(a, "reason", "")) or ("ok" if a else "unavailable")


def probe_device_transport(name: str, worker) -> dict[str, Any]:
    """Per-pair report of a GPU transport; collective over ``worker``'s ranks.

    Calls ``ccl.transport.<name>.probe_pairs(worker)``, which the transport owner provides.
    Expected return (a JSON-able dict; the probe prints it, rank 0's copy goes into --json):

        {"devices": [{"rank", "index", "name", "bus_id"}],   # one per rank
         "p2p": [[bool]],                  # driver-reported access, [src][dst]
         "pairs": [{"src", "dst", "mapped", "verified", "error",  # map + fill + read-back
                    "push_us_p50", "push_us_p99"}]}                 # one-way push latency

    ``worker`` (ccl._cli_launch.Worker) gives rank, world_size, all_gather(obj), barrier().
    Returns ``{"status": "not implemented"}`` while the transport has no probe_pairs.
    """
    import importlib

    try:
        module = importlib.import_module(f"ccl.transport.{name}")
    except ImportError as e:
        return {"status": "not built", "error": str(e)}
    fn = getattr(module, "probe_pairs", None)
    if fn is None:
        return {"status": "not implemented", "error": f"ccl.transport.{name} has no probe_pairs()"}
    try:
        report = dict(fn(worker))
    except Exception as e:  # noqa: BLE001
        logger.warning("rank %d: %s probe failed: %s", worker.rank, name, e)
        return {"status": "error", "error": f"{type(e).__name__}: {e}"}
    report.setdefault("status", "ok")
    return report


# ---------------------------------------------------------------------- host transport
def _area(region) -> int:
    """Offset of the probe's area: the region's tail (control block sits at the head)."""
    world = region.world_size
    need = world * (_PATTERN_WORDS * 8 + 2 * _LINE)
    need = (need + 4095) // 4096 * 4096
    if need + 4096 > region.region_bytes:
        raise ValueError(
            f"region of {region.region_bytes} B too small for the probe area ({need} B)"
        )
    return region.region_bytes - need


def _pattern(nonce: int, src: int, dst: int, i: int) -> int:
    return (nonce ^ (src << 48) ^ (dst << 40) ^ ((i + 1) * 0x9E3779B97F4A7C15)) & _MASK64


def probe_host(
    worker, *, capacity: int, iters: int, fd_exchange: str, timeout_s: float
) -> dict[str, Any]:
    """Map / fill / read-back and ping-pong latency for every ordered pair; collective."""
    from ccl import _C
    from ccl.rendezvous import StoreExchange, exchange_fds
    from ccl.transport.host import HostRegion

    h = _C.host
    rank, world = worker.rank, worker.world_size
    region = HostRegion(world, rank, capacity)
    errors: dict[int, str] = {}
    try:
        exchange = StoreExchange(worker.store, rank, world, "ccl-probe/host")
        try:
            fds = exchange_fds(exchange, region.fd, method=fd_exchange, timeout_s=timeout_s)
        except Exception as e:  # noqa: BLE001 - reported per pair below
            fds = {}
            errors.update({p: f"fd exchange: {e}" for p in range(world) if p != rank})
        for peer, fd in sorted(fds.items()):
            try:
                region.import_peer(peer, fd)
            except Exception as e:  # noqa: BLE001
                errors[peer] = f"map: {e}"
        area = _area(region)
        nonce = worker.all_gather(int.from_bytes(os.urandom(8), "little"))[0]
        mapped = worker.all_gather(sorted(p for p in range(world) if region.bases[p]))

        def slot(owner: int, src: int) -> int:
            return region.bases[owner] + area + src * _PATTERN_WORDS * 8

        # 1. every src writes its pattern into every mapped dst's region
        for dst in range(world):
            if dst != rank and region.bases[dst]:
                for i in range(_PATTERN_WORDS):
                    h.store_u64(slot(dst, rank) + 8 * i, _pattern(nonce, rank, dst, i))
        worker.barrier()
        # 2. read back: the writer through its mapping, the owner in its own memory
        wrote_ok = {}
        for dst in range(world):
            if dst != rank and region.bases[dst]:
                wrote_ok[dst] = _first_bad(h, slot(dst, rank), nonce, rank, dst)
        owner_ok = {}
        for src in range(world):
            if src != rank and rank in mapped[src]:
                owner_ok[src] = _first_bad(h, slot(rank, src), nonce, src, rank)
        # 3. ping-pong, one ordered pair at a time (the others wait in the barrier)
        ping_base = area + world * _PATTERN_WORDS * 8
        pong_base = ping_base + world * _LINE
        latency: dict[tuple[int, int], dict[str, Any]] = {}
        for a in range(world):
            for b in range(world):
                if a == b:
                    continue
                worker.barrier()
                both = a in mapped[b] and b in mapped[a]
                if rank == a and both:
                    latency[(a, b)] = _ping(
                        h,
                        region.bases[b] + ping_base + a * _LINE,
                        region.bases[a] + pong_base + b * _LINE,
                        iters,
                        (a * world + b) << 40,
                        timeout_s,
                    )
                elif rank == b and both:
                    _pong(
                        h,
                        region.bases[b] + ping_base + a * _LINE,
                        region.bases[a] + pong_base + b * _LINE,
                        iters,
                        (a * world + b) << 40,
                        timeout_s,
                    )
        mine = {
            "rank": rank,
            "errors": errors,
            "wrote": wrote_ok,
            "owned": owner_ok,
            "latency": {f"{a}->{b}": v for (a, b), v in latency.items()},
        }
        everyone = worker.all_gather(mine)
    finally:
        region.close()
    return _host_report(everyone, world, region.region_bytes, capacity, fd_exchange, iters)


def _first_bad(h, addr: int, nonce: int, src: int, dst: int) -> str | None:
    for i in range(_PATTERN_WORDS):
        got = h.load_u64(addr + 8 * i)
        want = _pattern(nonce, src, dst, i)
        if got != want:
            return f"word {i}: read {got:#018x}, wrote {want:#018x}"
    return None


def _wait_for(h, addr: int, value: int, deadline: float) -> bool:
    load = h.load_u64
    while True:
        for _ in range(_SPIN_CHECK):
            if load(addr) == value:
                return True
        if time.monotonic() > deadline:
            return False
        os.sched_yield()


def _ping(
    h, remote_ping: int, my_pong: int, iters: int, tag: int, timeout_s: float
) -> dict[str, Any]:
    """Initiator: writes v into the peer's ping word, waits for v in its own pong word."""
    store, load, pc = h.store_u64, h.load_u64, time.perf_counter_ns
    warm = max(10, iters // 10)
    rtt: list[int] = []
    deadline = time.monotonic() + timeout_s
    for i in range(warm + iters):
        v = tag | (i + 1)
        t0 = pc()
        store(remote_ping, v)
        if load(my_pong) != v and not _wait_for(h, my_pong, v, deadline):
            return {"error": f"no answer to round trip {i} within {timeout_s:.0f}s"}
        t1 = pc()
        if i >= warm:
            rtt.append(t1 - t0)
    rtt.sort()
    p50 = rtt[len(rtt) // 2] / 1e3
    return {
        "rtt_us_p50": p50,
        "rtt_us_p99": rtt[min(len(rtt) - 1, int(len(rtt) * 0.99))] / 1e3,
        "one_way_us_p50": p50 / 2,
        "round_trips": len(rtt),
    }


def _pong(h, my_ping: int, remote_pong: int, iters: int, tag: int, timeout_s: float) -> None:
    """Responder: waits for v in its own ping word, writes v into the initiator's pong word."""
    store = h.store_u64
    warm = max(10, iters // 10)
    deadline = time.monotonic() + timeout_s
    for i in range(warm + iters):
        v = tag | (i + 1)
        if not _wait_for(h, my_ping, v, deadline):
            return
        store(remote_pong, v)


def _host_report(everyone, world, region_bytes, capacity, fd_exchange, iters) -> dict[str, Any]:
    pairs = []
    for src in range(world):
        for dst in range(world):
            if src == dst:
                continue
            s, d = everyone[src], everyone[dst]
            error = s["errors"].get(dst) or d["errors"].get(src)
            mapped = error is None
            bad = [m for m in (s["wrote"].get(dst), d["owned"].get(src)) if m]
            verified = mapped and not bad and dst in s["wrote"] and src in d["owned"]
            lat = s["latency"].get(f"{src}->{dst}", {})
            pairs.append(
                {
                    "src": src,
                    "dst": dst,
                    "mapped": mapped,
                    "verified": verified,
                    "words": _PATTERN_WORDS,
                    "error": error or (bad[0] if bad else None) or lat.get("error"),
                    "one_way_us_p50": lat.get("one_way_us_p50"),
                    "rtt_us_p50": lat.get("rtt_us_p50"),
                    "rtt_us_p99": lat.get("rtt_us_p99"),
                    "round_trips": lat.get("round_trips", 0),
                }
            )
    return {
        "world_size": world,
        "capacity_bytes": capacity,
        "region_bytes": region_bytes,
        "fd_exchange": fd_exchange,
        "iters": iters,
        "pairs": pairs,
        "all_verified": all(p["verified"] for p in pairs),
    }


# ---------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ccl-probe",
        description="List the transports on this host and verify the host transport between "
        "every ordered pair of ranks (write/read-back and ping-pong latency).",
        epilog="Under mpiexec or torchrun the launcher's ranks are used and --ranks is ignored.",
    )
    p.add_argument("--ranks", type=int, default=2, help="local ranks to spawn without a launcher")
    p.add_argument("--iters", type=int, default=2000, help="ping-pong round trips per pair")
    p.add_argument(
        "--capacity",
        type=int,
        default=None,
        help="mailbox capacity of the probe's regions (default: the Communicator's)",
    )
    p.add_argument(
        "--fd-exchange",
        choices=("socket", "pidfd"),
        default=None,
        help="fd passing method (default: CCL_FD_EXCHANGE or socket)",
    )
    p.add_argument("--json", default=None, help="write the report to this file")
    p.add_argument("--timeout", type=float, default=120.0, help="whole-run limit, seconds")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``ccl-probe`` / ``python -m ccl.probe``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.ranks < 1 or args.iters < 1:
        _parser().error("--ranks and --iters must be >= 1")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from ccl._cli_launch import detect_launcher, join, spawn

    launcher = detect_launcher()
    if launcher == "none":
        sys.exit(spawn("ccl.probe", argv, args.ranks, timeout_s=args.timeout))
    worker = join(launcher, timeout_s=args.timeout, gloo=False)
    try:
        sys.exit(_run(worker, args))
    finally:
        worker.close()


def _run(worker, args) -> int:
    from ccl import comm as _comm
    from ccl._cli_launch import machine_info, rank_info

    capacity = args.capacity or int(os.environ.get("CCL_MAX_BYTES", _comm.DEFAULT_MAX_BYTES))
    fd_exchange = args.fd_exchange or os.environ.get("CCL_FD_EXCHANGE", "socket")
    rows = transport_rows()
    ranks = worker.all_gather(dict(rank_info(worker.rank), transports=rows))
    host = None
    if rows[0]["available"]:
        host = probe_host(
            worker,
            capacity=capacity,
            iters=args.iters,
            fd_exchange=fd_exchange,
            timeout_s=min(args.timeout, 60.0),
        )
    devices = {}
    for row in rows[1:]:
        if row["available"]:
            devices[row["name"]] = probe_device_transport(row["name"], worker)
    if worker.rank != 0:
        return 0 if host is None or host["all_verified"] else 1
    machine = machine_info()
    lines = _table(machine, worker, rows, ranks, host, devices)
    for line in lines:
        print(line)  # noqa: T201 - the CLI's table
    ok = host is not None and host["all_verified"] and all(map(_device_ok, devices.values()))
    if args.json:
        report = {
            "schema": "ccl-probe/1",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine,
            "world_size": worker.world_size,
            "launcher": worker.launcher,
            "ranks": ranks,
            "transports": rows,
            "host": host,
            "devices": devices,
            "ok": ok,
            "stdout": lines,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        sys.stderr.write(f"ccl-probe: wrote {path}\n")
    return 0 if ok else 1


def _table(machine, worker, rows, ranks, host, devices) -> list[str]:
    from ccl._cli_launch import cpu_list

    out = [
        f"# ccl-probe: mailbox-ccl {machine['ccl']}, torch {machine['torch']}, "
        f"python {machine['python']}",
        f"# machine {machine['hostname']}: {machine['cpu_model']}, {machine['nproc']} cpus, "
        f"kernel {machine['kernel']}",
        f"# world {worker.world_size}, launcher {worker.launcher}",
    ]
    for r in ranks:
        out.append(
            f"#  Rank {r['rank']:2d} Pid {r['pid']:7d} on {r['host']} "
            f"cpus {cpu_list(r['affinity'])}"
        )
    disagree = [r["rank"] for r in ranks if r["transports"] != rows]
    if disagree:
        out.append(f"# ranks {disagree} see different transports (see --json)")
    out += ["#", "# transports", f"  {'name':<12} {'available':<10} reason"]
    for row in rows:
        out.append(f"  {row['name']:<12} {'yes' if row['available'] else 'no':<10} {row['reason']}")
    if host is not None:
        out += [
            "#",
            f"# host transport: {host['world_size']} ranks, region {host['region_bytes']} B each "
            f"(capacity {host['capacity_bytes']} B), fd exchange {host['fd_exchange']}, "
            f"{host['iters']} round trips per pair",
            "#"
            + f"{'src':>5} -> {'dst':<4} {'mapped':>6} {'verified':>8} {'words':>5} "
            f"{'one-way p50(us)':>15} {'rtt p50(us)':>11} {'rtt p99(us)':>11}  error"[1:],
        ]
        for p in host["pairs"]:
            out.append(
                f"{p['src']:>5} -> {p['dst']:<4} {'yes' if p['mapped'] else 'no':>6} "
                f"{'yes' if p['verified'] else 'NO':>8} {p['words']:>5} "
                f"{_us(p['one_way_us_p50']):>15} {_us(p['rtt_us_p50']):>11} "
                f"{_us(p['rtt_us_p99']):>11}  "
                f"{p['error'] or ''}".rstrip()
            )
        n_ok = sum(p["verified"] for p in host["pairs"])
        out.append(
            f"# host: {n_ok}/{len(host['pairs'])} ordered pairs verified "
            f"{'OK' if host['all_verified'] else 'FAILED'}"
        )
    for name, rep in devices.items():
        out += _device_lines(name, rep)
    return out


def _device_ok(rep: dict[str, Any]) -> bool:
    """A GPU transport fails the probe when its probe errs or a pair it reports does not
    verify; one without probe_pairs() yet only says so."""
    return rep.get("status") != "error" and all(p.get("verified") for p in rep.get("pairs", []))


def _device_lines(name: str, rep: dict[str, Any]) -> list[str]:
    """The GPU section: devices, the driver's P2P matrix, then one row per ordered pair."""
    out = [
        "#",
        f"# {name} transport: {rep.get('status')}"
        + (f" ({rep['error']})" if rep.get("error") else ""),
    ]
    for d in rep.get("devices", []):
        out.append(
            f"#  Rank {d.get('rank', '?'):>2} device {d.get('index', '?')} "
            f"{d.get('name', '')} (bus {d.get('bus_id', '?')})"
        )
    p2p = rep.get("p2p") or []
    if p2p:
        out.append(
            "#  driver P2P [src][dst]: "
            + "  ".join(
                f"{s}:" + "".join("y" if v else "n" for v in row) for s, row in enumerate(p2p)
            )
        )
    if rep.get("latency"):
        out.append(f"#  latency: {rep['latency']}")
    pairs = rep.get("pairs", [])
    if pairs:
        out.append(
            "#"
            + f"{'src':>5} -> {'dst':<4} {'mapped':>6} {'verified':>8} "
            f"{'push p50(us)':>12} {'push p99(us)':>12}  error"[1:]
        )
        for p in pairs:
            out.append(
                f"{p.get('src', '?'):>5} -> {p.get('dst', '?'):<4} "
                f"{'yes' if p.get('mapped') else 'no':>6} "
                f"{'yes' if p.get('verified') else 'NO':>8} "
                f"{_us(p.get('push_us_p50')):>12} {_us(p.get('push_us_p99')):>12}  "
                f"{p.get('error') or ''}".rstrip()
            )
        n_ok = sum(bool(p.get("verified")) for p in pairs)
        out.append(
            f"# {name}: {n_ok}/{len(pairs)} ordered pairs verified "
            f"{'OK' if _device_ok(rep) else 'FAILED'}"
        )
    return out


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    main()
