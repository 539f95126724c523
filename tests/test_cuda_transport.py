"""Tests of the CUDA transport (ccl/transport/cuda.py, csrc/cuda/).

Three tiers:
- everywhere: the extension imports without CUDA, availability() and CudaRegion report the
  missing driver cleanly, pure logic (rounding, layout, records, error names, the function
  table) and, where a CUDA toolkit is installed, the hand-written driver header against cuda.h;
- everywhere with a C compiler: the whole transport against csrc/cuda/fake/fake_libcuda.c, a
  host-memory stand-in for libcuda that enforces the driver's rules and exports real fds —
  allocation, export, SCM_RIGHTS exchange between processes, import, verify_peers, and the
  failures that must make every rank fall back (no P2P, P2P that silently drops writes);
- on GPUs (``-m gpu``): the same against the real driver, skipped loudly without one.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest

import ccl
from ccl import _C
from ccl.errors import TransportError
from ccl.transport import cuda

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
FAKE_SRC = REPO / "csrc" / "cuda" / "fake" / "fake_libcuda.c"
FAKE_KNOBS = [
    "FAKE_CUDA_DEVICES", "FAKE_CUDA_GRANULARITY", "FAKE_CUDA_INIT_ERROR", "FAKE_CUDA_NO_VMM",
    "FAKE_CUDA_NO_POSIX_FD", "FAKE_CUDA_NO_P2P", "FAKE_CUDA_LYING_P2P", "FAKE_CUDA_NO_GETPROC",
    "FAKE_CUDA_FAIL",
]


# ============================================================================ helpers
def _compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _real_driver_loadable() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@pytest.fixture
def default_driver():
    """The driver the transport loads by default (libcuda.so.1), freshly loaded."""
    _C.cuda.reload_driver("")
    yield
    _C.cuda.reload_driver("")


@pytest.fixture
def no_driver(default_driver, monkeypatch):
    monkeypatch.delenv("CCL_CUDA_DRIVER", raising=False)
    _C.cuda.reload_driver("")
    if _C.cuda.driver_status()["loaded"] or _real_driver_loadable():
        pytest.skip("a CUDA driver is installed here: the no-driver path is tested elsewhere")


@pytest.fixture(scope="module")
def fake_libs(tmp_path_factory):
    """Builds the fake driver: (path, path of the variant without the VMM API)."""
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler: cannot build the fake libcuda (csrc/cuda/fake)")
    out = tmp_path_factory.mktemp("fakecuda")
    libs = []
    for name, extra in (("libcuda.so.1", []), ("libcuda_old.so.1", ["-DFAKE_CUDA_OLD"])):
        path = out / name
        subprocess.run(
            [cc, "-shared", "-fPIC", "-O1", "-Wall", *extra, "-o", str(path), str(FAKE_SRC),
             "-lpthread"],
            check=True, timeout=120,
        )
        libs.append(str(path))
    return tuple(libs)


class Fake:
    """The loaded fake driver plus its introspection hooks."""

    def __init__(self, path: str):
        self.path = path
        self.lib = ctypes.CDLL(path)  # the same handle the transport dlopen'ed

    def stats(self) -> tuple[int, int, int, int]:
        """(live handles, live mappings, live reservations, primary-context references)."""
        v = [ctypes.c_int() for _ in range(4)]
        self.lib.fake_cuda_stats(*(ctypes.byref(x) for x in v))
        return tuple(x.value for x in v)

    def current_device(self) -> int:
        return self.lib.fake_cuda_current_device()

    def last_get_proc(self) -> tuple[int, int]:
        version, flags = ctypes.c_int(), ctypes.c_ulonglong()
        self.lib.fake_cuda_last_get_proc(ctypes.byref(version), ctypes.byref(flags))
        return version.value, flags.value

    def reload(self, path: str | None = None) -> None:
        _C.cuda.reload_driver(path or self.path)


@pytest.fixture
def fake(fake_libs, monkeypatch):
    for knob in FAKE_KNOBS:
        monkeypatch.delenv(knob, raising=False)
    _C.cuda.reload_driver(fake_libs[0])
    f = Fake(fake_libs[0])
    assert _C.cuda.driver_status()["loaded"], _C.cuda.driver_status()
    before = f.stats()
    yield f
    assert _C.cuda.live_allocations() == 0
    for knob in FAKE_KNOBS:  # no injected failure may hide a leak check
        monkeypatch.delenv(knob, raising=False)
    assert f.stats() == before, "the transport leaked driver objects (handles, maps, VA, ctx)"
    _C.cuda.reload_driver("")


class ThreadExchange:
    """All-gather among threads of this process (one StoreExchange-like view per rank)."""

    def __init__(self, world: int):
        self.world = world
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world, timeout=20)

    def view(self, rank: int):
        shared = self

        class View:
            def __init__(self):
                self.rank = rank
                self.world_size = shared.world

            def all_gather(self, obj):
                shared.slots[rank] = obj
                shared.barrier.wait()
                out = list(shared.slots)
                shared.barrier.wait()
                return out

            def barrier(self):
                shared.barrier.wait()

        return View()


def run_ranks(world: int, fn, timeout: float = 60.0) -> list:
    """Runs fn(rank, exchange) on `world` threads; returns results or raised exceptions."""
    ex = ThreadExchange(world)
    results: list = [None] * world

    def body(r):
        try:
            results[r] = fn(r, ex.view(r))
        except BaseException as e:  # noqa: BLE001 - returned to the test
            results[r] = e  # peers still waiting in an all-gather time out (barrier timeout)

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a rank hung"
    return results


# ============================================================================ no driver
def test_extension_imports_and_reports_driver_state(default_driver):
    status = _C.cuda.driver_status()
    assert set(status) >= {"loaded", "path", "stage", "reason", "driver_version"}
    assert isinstance(_C.cuda.available(), bool)
    assert ccl.Communicator is not None and _C.host.MAGIC  # the host side is unaffected
    if not status["loaded"]:
        assert status["reason"]


def test_availability_without_driver(no_driver):
    a = cuda.availability()
    assert not a
    assert a.reason.startswith("no driver: libcuda.so.1 not found"), a.reason
    assert not cuda.availability(0)


def test_region_without_driver_raises_transport_error(no_driver):
    with pytest.raises(TransportError, match="no driver: libcuda.so.1 not found"):
        cuda.CudaRegion(2, 0, 4096, 0)
    assert _C.cuda.live_allocations() == 0


def test_queries_without_driver_raise_transport_error(no_driver):
    with pytest.raises(TransportError, match="no driver"):
        cuda.p2p_matrix()
    with pytest.raises(TransportError, match="no driver"):
        cuda.devices()
    with pytest.raises(TransportError, match="no driver"):
        cuda.probe_local_pairs()
    with pytest.raises(_C.cuda.DriverUnavailable):
        _C.cuda.Allocation.create(0, 1)


def test_bad_arguments_are_value_errors(default_driver):
    for args in [(0, 0, 1, 0), (2, 2, 1, 0), (2, -1, 1, 0), (2, 0, 0, 0), (2, 0, 1, -1)]:
        with pytest.raises(ValueError):
            cuda.CudaRegion(*args)


# ============================================================================ pure logic
def test_round_up():
    assert _C.cuda.round_up(1, 2 << 20) == 2 << 20
    assert _C.cuda.round_up(2 << 20, 2 << 20) == 2 << 20
    assert _C.cuda.round_up((2 << 20) + 1, 2 << 20) == 4 << 20
    assert _C.cuda.round_up(0, 4096) == 0
    with pytest.raises(ValueError):
        _C.cuda.round_up(1, 0)
    with pytest.raises(ValueError):
        _C.cuda.round_up(2**64 - 1, 4096)
    for n in (1, 255, 256, 257, 10**6):
        assert cuda._round_up(n, 256) == _C.cuda.round_up(n, 256)


def test_layout_keeps_scratch_outside_the_callers_bytes():
    for nbytes in (1, 100, 256, 1 << 20, (1 << 20) + 3):
        for world in (1, 2, 8):
            off, need = cuda._layout(nbytes, world)
            assert off >= nbytes and off % 256 == 0
            assert need == off + world * cuda.SCRATCH_RECORD_BYTES
    with pytest.raises(ValueError):
        cuda._layout(0, 2)
    with pytest.raises(ValueError):
        cuda._layout(1, 0)


def test_records_identify_writer_target_and_token():
    r = cuda._record(1, 2, 0xABC)
    assert len(r) == cuda.SCRATCH_RECORD_BYTES
    assert r == cuda._record(1, 2, 0xABC)
    others = {cuda._record(2, 1, 0xABC), cuda._record(1, 2, 0xABD), cuda._record(1, 3, 0xABC)}
    assert r not in others and len(others) == 3
    tokens = [11, 22, 33]
    area = bytearray(3 * 64)
    for w in range(3):
        area[w * 64 : (w + 1) * 64] = cuda._record(w, 1, tokens[w])
    assert cuda._check_records(bytes(area), 1, tokens, [0, 1, 2]) == []
    area[0:64] = bytes(64)  # rank 0's write never arrived
    area[128 + 40] ^= 1  # rank 2's arrived torn
    problems = cuda._check_records(bytes(area), 1, tokens, [0, 1, 2])
    assert len(problems) == 2
    assert "rank 0 -> rank 1" in problems[0] and "nothing arrived" in problems[0]
    assert "rank 2 -> rank 1" in problems[1] and "corrupted tail" in problems[1]


def test_error_names_and_messages(default_driver):
    assert _C.cuda.error_name(0) == "CUDA_SUCCESS"
    assert _C.cuda.error_name(2) == "CUDA_ERROR_OUT_OF_MEMORY"
    assert _C.cuda.error_name(217) == "CUDA_ERROR_PEER_ACCESS_UNSUPPORTED"
    assert _C.cuda.error_name(999) == "CUDA_ERROR_UNKNOWN"
    assert _C.cuda.error_name(123456) == "CUDA_ERROR_123456"
    msg = _C.cuda.format_error(101, "cuMemSetAccess(read/write for device 1)")
    assert msg.startswith(
        "cuMemSetAccess(read/write for device 1) failed: CUDA_ERROR_INVALID_DEVICE (101)"
    )


# The driver functions the transport needs, by the names cuGetProcAddress knows them. Where
# the brief named the synchronous variants (cuMemsetD8, cuMemcpyHtoD/DtoH, cuCtxSynchronize),
# the transport uses the async ones on a private non-blocking stream plus
# cuStreamSynchronize: init-time copies then neither wait behind nor serialise with the
# framework's queued work on the legacy default stream.
REQUIRED_FUNCTIONS = {
    "cuInit", "cuDriverGetVersion", "cuGetErrorName", "cuGetErrorString",
    "cuDeviceGet", "cuDeviceGetCount", "cuDeviceGetName", "cuDeviceGetPCIBusId",
    "cuDeviceGetAttribute", "cuDeviceCanAccessPeer",
    "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRelease", "cuCtxGetCurrent", "cuCtxSetCurrent",
    "cuMemGetAllocationGranularity", "cuMemCreate", "cuMemRelease", "cuMemRetainAllocationHandle",
    "cuMemExportToShareableHandle", "cuMemImportFromShareableHandle",
    "cuMemAddressReserve", "cuMemAddressFree", "cuMemMap", "cuMemUnmap", "cuMemSetAccess",
    "cuStreamCreate", "cuStreamDestroy", "cuStreamSynchronize",
    "cuMemsetD8Async", "cuMemcpyHtoDAsync", "cuMemcpyDtoHAsync",
}  # fmt: skip


def test_function_table_is_complete_and_well_formed():
    table = _C.cuda.function_table()
    names = [t[0] for t in table]
    assert len(names) == len(set(names))
    assert set(names) == REQUIRED_FUNCTIONS
    for name, abi, signature in table:
        assert abi == name or re.fullmatch(re.escape(name) + r"_v\d+", abi), (name, abi)
        assert signature.startswith(f"CUresult {name}(") and signature.endswith(")"), signature
    # Every entry carries its C prototype as a comment in the header (the pynccl pattern).
    header = (REPO / "csrc" / "cuda" / "driver_api.h").read_text()
    for name in names:
        assert re.search(r"/\* CUresult " + name + r"\(", header), f"no prototype comment: {name}"
    assert _C.cuda.ABI_VERSION == 12000


def _cuda_header() -> Path | None:
    for root in [os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(
        str(p) for p in Path("/usr/local").glob("cuda-*")
    )]:
        if root and (Path(root) / "include" / "cuda.h").is_file():
            return Path(root) / "include"
    return None


def test_driver_header_matches_cuda_h(tmp_path):
    """Our hand-written types, enum values, layouts and function types == the real cuda.h."""
    inc = _cuda_header()
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if inc is None or cxx is None:
        pytest.skip(f"needs cuda.h and a C++ compiler (cuda.h: {inc}, c++: {cxx})")
    header = (REPO / "csrc" / "cuda" / "driver_api.h").read_text()
    enumerators = sorted(set(re.findall(r"^\s+(CU(?:DA)?_[A-Z0-9_]+) = ", header, re.M)))
    assert len(enumerators) > 30
    checks = [
        f"static_assert((long long)ccl::cu::{e} == (long long)::{e}, \"{e}\");"
        for e in enumerators
    ]
    checks += [
        f'static_assert(std::is_same<M<decltype(ccl::cu::DriverFunctions::{n})>::type, '
        f'decltype(&::{abi})>::value, "{n}: our prototype differs from cuda.h");'
        for n, abi, _ in _C.cuda.function_table()
    ]
    layout = []
    for struct, fields in {
        "CUmemLocation": ["type", "id"],
        "CUmemAllocationProp": ["type", "requestedHandleTypes", "location", "win32HandleMetaData",
                                "allocFlags"],
        "CUmemAccessDesc": ["location", "flags"],
    }.items():
        layout.append(
            f'static_assert(sizeof(ccl::cu::{struct}) == sizeof(::{struct}), "{struct}");'
        )
        for f in fields:
            layout.append(
                f"static_assert(offsetof(ccl::cu::{struct}, {f}) == offsetof(::{struct}, {f}), "
                f'"{struct}.{f}");'
            )
    src = tmp_path / "abi_check.cpp"
    src.write_text(textwrap.dedent("""\
        #include <cstddef>
        #include <type_traits>
        #include <cuda.h>
        #include "cuda/driver_api.h"
        // Maps our types to cuda.h's, through pointers, const and function pointers.
        template <class T> struct M { using type = T; };
        template <class T> struct M<T*> { using type = typename M<T>::type*; };
        template <class T> struct M<const T> { using type = const typename M<T>::type; };
        template <class R, class... A> struct M<R (*)(A...)> {
          using type = typename M<R>::type (*)(typename M<A>::type...);
        };
        #define MAP(ours, theirs) template <> struct M<ccl::cu::ours> { using type = ::theirs; };
        MAP(CUresult, CUresult)
        MAP(CUdevice_attribute, CUdevice_attribute)
        MAP(CUmemAllocationHandleType, CUmemAllocationHandleType)
        MAP(CUmemAllocationGranularity_flags, CUmemAllocationGranularity_flags)
        MAP(CUmemAllocationProp, CUmemAllocationProp)
        MAP(CUmemAccessDesc, CUmemAccessDesc)
        MAP(CUdriverProcAddressQueryResult, CUdriverProcAddressQueryResult)
        MAP(CUctx_st, CUctx_st)
        MAP(CUstream_st, CUstream_st)
        static_assert(std::is_same<M<ccl::cu::PFN_cuGetProcAddress_v2>::type,
                                   decltype(&::cuGetProcAddress_v2)>::value, "cuGetProcAddress_v2");
        static_assert(ccl::cu::CU_GET_PROC_ADDRESS_LEGACY_STREAM ==
                      (unsigned long long)::CU_GET_PROC_ADDRESS_LEGACY_STREAM, "flags");
        static_assert(ccl::cu::CU_STREAM_NON_BLOCKING == (unsigned)::CU_STREAM_NON_BLOCKING, "");
        static_assert(std::is_same<ccl::cu::CUdeviceptr, ::CUdeviceptr>::value, "CUdeviceptr");
        static_assert(std::is_same<ccl::cu::CUmemGenericAllocationHandle,
                                   ::CUmemGenericAllocationHandle>::value, "handle");
        static_assert(std::is_same<ccl::cu::CUdevice, ::CUdevice>::value, "CUdevice");
        """) + "\n".join(checks + layout) + "\nint main() { return 0; }\n")
    proc = subprocess.run(
        [cxx, "-std=c++17", "-fsyntax-only", f"-I{inc}", f"-I{REPO / 'csrc'}", str(src)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_error_name_table_matches_cuda_h():
    inc = _cuda_header()
    if inc is None:
        pytest.skip("needs cuda.h (CUDA toolkit headers) to compare the CUresult names")
    text = (inc / "cuda.h").read_text()
    body = text[text.index("typedef enum cudaError_enum") : text.index("} CUresult;")]
    pairs = re.findall(r"^\s+(CUDA_[A-Z0-9_]+)\s*=\s*(\d+)", body, re.M)
    assert len(pairs) > 50
    table = (REPO / "csrc" / "cuda" / "error_names.h").read_text()
    for name, value in pairs:
        assert f"X({value}, {name})" in table, name


# ============================================================================ fake driver
def test_fake_driver_availability_and_queries(fake):
    status = _C.cuda.driver_status()
    assert status["via_get_proc_address"] and status["driver_version"] == 12080
    assert fake.last_get_proc() == (12000, 1)  # the 12.0 ABI, legacy default stream
    a = cuda.availability()
    assert a and "VMM" in a.reason
    assert cuda.availability(1)
    assert not cuda.availability(2) and "2 device(s)" in cuda.availability(2).reason
    devs = cuda.devices()
    assert [d["name"] for d in devs] == ["Fake GPU 0", "Fake GPU 1"]
    assert cuda.p2p_matrix() == [[True, True], [True, True]]


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"FAKE_CUDA_NO_VMM": "1"}, "does not support virtual memory management"),
        ({"FAKE_CUDA_NO_POSIX_FD": "1"}, "cannot export memory as a POSIX fd"),
        ({"FAKE_CUDA_DEVICES": "0"}, "no CUDA device"),
        ({"FAKE_CUDA_INIT_ERROR": "999"}, "cuInit(0) failed: CUDA_ERROR_UNKNOWN (999)"),
        ({"FAKE_CUDA_INIT_ERROR": "34"}, "stub library"),
    ],
)
def test_fake_driver_unavailable_reasons(fake, monkeypatch, env, reason):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fake.reload()  # cuInit runs at load
    a = cuda.availability()
    assert not a and reason in a.reason, a.reason
    with pytest.raises(TransportError, match=re.escape(reason)):
        cuda.CudaRegion(1, 0, 64, 0)


def test_fake_driver_too_old(fake, fake_libs):
    fake.reload(fake_libs[1])
    a = cuda.availability()
    assert not a and a.reason.startswith("driver too old") and "cuMemCreate" in a.reason
    with pytest.raises(TransportError, match="driver too old"):
        cuda.CudaRegion(1, 0, 64, 0)


def test_fake_region_lifecycle(fake, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_GRANULARITY", str(2 << 20))
    assert fake.current_device() == -1
    region = cuda.CudaRegion(1, 0, 3 << 20, 1)
    assert fake.current_device() == -1  # the caller's (absent) context is restored
    assert region.bytes == 4 << 20 and region.bytes % (2 << 20) == 0
    assert region.scratch_offset >= 3 << 20
    assert region.ptr and region.bases == [region.ptr] and region.fd >= 0
    assert os.get_inheritable(region.fd) is False
    assert region.read(0, 0, 4096) == bytes(4096)  # zeroed before export
    assert region.read(0, region.bytes - 64, 64) == bytes(64)
    region.write(0, 1, b"hello")
    assert region.read(0, 0, 8) == b"\0hello\0\0"
    with pytest.raises(ValueError, match="outside"):
        region.write(0, region.bytes - 2, b"xyz")
    _, maps, _, refs = fake.stats()
    assert maps >= 1 and refs >= 1
    fd = region.fd
    region.close()
    region.close()  # idempotent
    assert region.fd == -1 and region.bases == [0] and region.ptr == 0
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(TransportError, match="closed"):
        region.read(0, 0, 1)


def test_fake_current_context_is_restored(fake):
    # A thread whose current context is device 0's: working on device 1 must not change it.
    own = _C.cuda.Allocation.create(0, 1)
    try:
        lib_ctx = ctypes.c_void_p()
        fake.lib.cuDevicePrimaryCtxRetain(ctypes.byref(lib_ctx), 0)
        fake.lib.cuCtxSetCurrent(lib_ctx)
        assert fake.current_device() == 0
        other = _C.cuda.Allocation.create(1, 1)
        other.write(0, b"x")
        assert fake.current_device() == 0
        other.close()
        fake.lib.cuCtxSetCurrent(None)
        fake.lib.cuDevicePrimaryCtxRelease_v2(0)
    finally:
        own.close()


def test_fake_driver_refuses_a_forked_child(fake):
    assert cuda.availability()
    r, w = os.pipe()
    with warnings.catch_warnings():  # 3.12+ warns about fork() with threads; the child execs
        warnings.simplefilter("ignore", DeprecationWarning)  # nothing and leaves at once
        pid = os.fork()
    if pid == 0:  # child: report and leave without running any cleanup
        try:
            os.write(w, cuda.availability().reason.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        reason = f.read()
    os.waitpid(pid, 0)
    assert "before fork()" in reason and "spawn" in reason, reason
    assert cuda.availability()  # the parent is unaffected


def test_fake_dlsym_fallback(fake, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_NO_GETPROC", "1")
    fake.reload()
    assert _C.cuda.driver_status()["loaded"]
    with cuda.CudaRegion(1, 0, 100, 0) as region:
        region.write(0, 0, b"abc")
        assert region.read(0, 0, 3) == b"abc"


@pytest.mark.parametrize(
    "call, code",
    [
        ("cuMemCreate", 2),
        ("cuMemAddressReserve", 2),
        ("cuMemMap", 1),
        ("cuMemSetAccess", 101),
        ("cuMemsetD8Async", 999),
        ("cuMemExportToShareableHandle", 801),
        ("cuDevicePrimaryCtxRetain", 101),
    ],
)
def test_fake_allocation_failures_clean_up(fake, monkeypatch, call, code):
    monkeypatch.setenv("FAKE_CUDA_FAIL", f"{call}={code}")
    with pytest.raises(TransportError) as info:
        cuda.CudaRegion(2, 0, 4096, 0)
    msg = str(info.value)
    assert msg.startswith("rank 0: allocating") and call in msg, msg
    assert _C.cuda.error_name(code) in msg and f"({code})" in msg
    assert isinstance(info.value.__cause__, _C.cuda.CudaError)
    assert info.value.__cause__.code == code
    assert _C.cuda.live_allocations() == 0  # the fixture also checks the fake's own counters


def test_fake_probe_local_pairs(fake, monkeypatch):
    probes = cuda.probe_local_pairs()
    assert [(p.src, p.dst) for p in probes] == [(0, 1), (1, 0)]
    assert all(p.driver_p2p and p.verified for p in probes)
    monkeypatch.setenv("FAKE_CUDA_LYING_P2P", "1")
    for p in cuda.probe_local_pairs():
        assert p.driver_p2p and not p.verified and "nothing arrived" in p.reason
    monkeypatch.delenv("FAKE_CUDA_LYING_P2P")
    monkeypatch.setenv("FAKE_CUDA_NO_P2P", "1")
    assert cuda.p2p_matrix() == [[True, False], [False, True]]
    for p in cuda.probe_local_pairs():
        assert not p.driver_p2p and not p.verified and "cuMemSetAccess" in p.reason


@pytest.mark.parametrize("world", [2, 3])
def test_fake_probe_pairs_collective(fake, monkeypatch, world):
    """The ccl-probe contract (ccl.probe.probe_device_transport) over a worker."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    reports = run_ranks(world, lambda rank, ex: cuda.probe_pairs(ex))
    for rep in reports:
        assert not isinstance(rep, BaseException), repr(rep)
        assert [d["index"] for d in rep["devices"]] == [r % 2 for r in range(world)]
        assert rep["p2p"] == [[True] * world for _ in range(world)]
        assert len(rep["pairs"]) == world * (world - 1)
        for p in rep["pairs"]:
            assert p["mapped"] and p["verified"] and p["error"] is None, p
            assert p["push_us_p50"] is None  # no torch CUDA here
        assert rep["all_verified"] and rep["latency"].startswith("no latency")
    assert reports[0]["pairs"] == reports[-1]["pairs"]


def test_fake_probe_pairs_reports_broken_pairs(fake, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("FAKE_CUDA_LYING_P2P", "1")
    for rep in run_ranks(2, lambda rank, ex: cuda.probe_pairs(ex)):
        assert not rep["all_verified"]
        for p in rep["pairs"]:
            assert p["mapped"] and not p["verified"] and "did not arrive" in p["error"]
    monkeypatch.delenv("FAKE_CUDA_LYING_P2P")
    monkeypatch.setenv("FAKE_CUDA_NO_P2P", "1")
    for rep in run_ranks(2, lambda rank, ex: cuda.probe_pairs(ex)):
        assert rep["p2p"] == [[True, False], [False, True]]
        for p in rep["pairs"]:
            assert not p["mapped"] and "cannot map" in p["error"], p


def _connect_rank(world, nbytes=10_000, devices=2):
    def fn(rank, ex):
        region = cuda.CudaRegion(world, rank, nbytes, rank % devices)
        try:
            region.connect(ex, timeout_s=20)
            # Push a payload into every peer's region through the mapping, read our own.
            for peer in range(world):
                if peer != rank:
                    region.write(peer, rank * 256, bytes([rank + 1]) * 200)
            ex.all_gather(None)
            got = [region.read(rank, w * 256, 200) for w in range(world)]
            ok = all(got[w] == bytes([w + 1]) * 200 for w in range(world) if w != rank)
            return ok, region.verified, list(region.bases)
        finally:
            region.close()

    return fn


@pytest.mark.parametrize("world", [2, 3])
def test_fake_connect_threads(fake, world):
    results = run_ranks(world, _connect_rank(world))
    for r in results:
        assert not isinstance(r, BaseException), repr(r)
        ok, verified, bases = r
        assert ok and verified and all(bases)


def test_fake_connect_lying_p2p_fails_on_every_rank(fake, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_LYING_P2P", "1")
    results = run_ranks(2, _connect_rank(2))
    for r in results:
        assert isinstance(r, TransportError), repr(r)
        msg = str(r)
        assert "verification failed" in msg and "did not arrive intact" in msg
        assert "falls back" in msg
    assert str(results[0]).split(":", 1)[1] == str(results[1]).split(":", 1)[1]


def test_fake_connect_without_p2p_fails_on_every_rank(fake, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_NO_P2P", "1")
    results = run_ranks(2, _connect_rank(2))
    for r in results:
        assert isinstance(r, TransportError), repr(r)
        assert "cannot map rank" in str(r) and "CUDA_ERROR_INVALID_DEVICE" in str(r)


def test_fake_import_failure_on_one_rank_is_reported_everywhere(fake):
    def fn(rank, ex):
        with cuda.CudaRegion(2, rank, 1000, rank) as region:
            fds = ex.all_gather(region.fd)
            if rank == 0:
                region.import_peer(1, os.dup(fds[1]))
            else:
                bogus = os.memfd_create("not-cuda")  # not an exported allocation
                os.ftruncate(bogus, region.bytes)
                with pytest.raises(TransportError, match="cannot map rank 0"):
                    region.import_peer(0, bogus)
            region.verify_peers(ex)

    for r in run_ranks(2, fn):
        assert isinstance(r, TransportError) and "rank 1 (cuda:1) cannot map rank 0" in str(r), r


def test_fake_size_mismatch_is_reported_everywhere(fake):
    def fn(rank, ex):
        region = cuda.CudaRegion(2, rank, 1000 if rank == 0 else 200_000, rank)
        try:
            region.connect(ex, timeout_s=20)
        finally:
            region.close()

    for r in run_ranks(2, fn):
        assert isinstance(r, TransportError), r
        assert "bytes=" in str(r) and "same nbytes" in str(r)


def test_fake_import_peer_argument_checks(fake):
    with cuda.CudaRegion(2, 0, 1000, 0) as region:
        for peer in (0, 2, -1):
            fd = os.dup(region.fd)
            with pytest.raises(ValueError):
                region.import_peer(peer, fd)
            with pytest.raises(OSError):
                os.fstat(fd)  # closed even on failure
        with pytest.raises(ValueError, match="exchange is rank"):
            region.verify_peers(ThreadExchange(3).view(0))


# ------------------------------------------------------------------ multi-process workers
WORKER = textwrap.dedent(
    """
    import json, os, sys, traceback
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    store_path, device, use_torch = sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
    out = {"rank": rank}
    try:
        from torch.distributed import FileStore
        from ccl.rendezvous import StoreExchange
        from ccl.transport import cuda
        from datetime import timedelta
        store = FileStore(store_path, world)
        store.set_timeout(timedelta(seconds=60))
        ex = StoreExchange(store, rank, world, "cuda-transport-test")
        region = cuda.CudaRegion(world, rank, 1 << 16, device)
        try:
            region.connect(ex, timeout_s=60)
            payload = lambda w: bytes((w * 37 + i) & 0xFF for i in range(1024))
            for peer in range(world):
                if peer != rank:
                    region.write(peer, rank * 1024, payload(rank))
            ex.all_gather("pushed")
            out["copy_ok"] = all(
                region.read(rank, w * 1024, 1024) == payload(w) for w in range(world) if w != rank
            )
            if use_torch:
                import torch
                torch.cuda.set_device(device)
                dev = torch.device("cuda", device)
                def view(addr, n):
                    st = torch._C._construct_storage_from_data_pointer(addr, dev, n * 4)
                    return torch.empty(0, dtype=torch.float32, device=dev).set_(st, 0, (n,), (1,))
                # A kernel on this GPU writes straight into the peer's memory.
                n = 4096
                base = 32768 // 4
                for peer in range(world):
                    if peer != rank:
                        dst = view(region.bases[peer] + 32768 + rank * n * 4, n)
                        torch.add(torch.arange(n, device=dev, dtype=torch.float32), rank + 1,
                                  out=dst)
                torch.cuda.synchronize()
                ex.all_gather("torch-pushed")
                mine = view(region.bases[rank] + 32768, world * n).view(world, n)
                ref = torch.arange(n, device=dev, dtype=torch.float32)
                out["torch_ok"] = all(
                    torch.equal(mine[w], ref + (w + 1)) for w in range(world) if w != rank
                )
                torch.cuda.synchronize()
            ex.all_gather("done")
            out["verified"] = region.verified
        finally:
            region.close()
    except BaseException as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def run_processes(world, tmp_path, env_extra, devices, use_torch=False, timeout=120):
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(r), str(world), str(store), str(devices[r]),
             "1" if use_torch else "0"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(world)
    ]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
            assert lines, f"worker produced no result (rc {p.returncode}): {stderr[-3000:]}"
            results.append(json.loads(lines[-1][len("RESULT "):]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return results


def test_fake_two_processes_exchange_fds_over_scm_rights(fake, tmp_path):
    env = {"CCL_CUDA_DRIVER": fake.path, "FAKE_CUDA_DEVICES": "2"}
    for r in run_processes(2, tmp_path, env, devices=[0, 1]):
        assert "error" not in r, r.get("traceback")
        assert r["copy_ok"] and r["verified"], r


def test_fake_two_processes_lying_p2p_fall_back_together(fake, tmp_path):
    env = {"CCL_CUDA_DRIVER": fake.path, "FAKE_CUDA_LYING_P2P": "1"}
    for r in run_processes(2, tmp_path, env, devices=[0, 1]):
        assert r.get("error", "").startswith("TransportError"), r
        assert "did not arrive intact" in r["error"]


# ============================================================================ GPU kernels on CPU
INTERPRETED = textwrap.dedent(
    """
    import importlib.util, os, sys, threading, time
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from ccl.transport import cuda

    # probe_pairs' ping / pong kernels, each against a Python peer sharing the memory.
    ping, pong = cuda._ping_kernels()
    mem = torch.zeros(64, dtype=torch.int64)
    st = torch.zeros(2, dtype=torch.int32)
    stop = []

    def echo():
        while not stop:
            mem[16] = mem[0].item()
            time.sleep(0)

    t = threading.Thread(target=echo)
    t.start()
    ping[(1,)](mem[0:], mem[16:], st[0:], 20, 1000, 1 << 20, num_warps=1)
    ping[(1,)](mem[32:], mem[48:], st[1:], 20, 5000, 500, num_warps=1)  # nobody answers
    stop.append(1)
    t.join()
    assert st.tolist() == [20, 0] and mem[0].item() == 1020, (st, mem[0])

    mem.zero_()
    def pinger():
        for i in range(20):
            mem[0] = 7000 + i + 1
            while mem[16].item() != 7000 + i + 1:
                time.sleep(0)
    t = threading.Thread(target=pinger)
    t.start()
    pong[(1,)](mem[0:], mem[16:], st[0:], 20, 7000, 1 << 20, num_warps=1)
    t.join()
    assert st[0].item() == 20 and mem[16].item() == 7020, (st, mem[16])

    # The smoke script's LL8 push / poll kernels: one push, then a poll that must see it all.
    spec = importlib.util.spec_from_file_location("smoke", sys.argv[1])
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    push, poll = smoke._triton_kernels()
    n = 100
    inbox = torch.zeros(n, dtype=torch.int64)
    data = torch.arange(n, dtype=torch.int32) * 3 - 50  # negative words too
    out = torch.zeros(n, dtype=torch.int32)
    status = torch.zeros(1, dtype=torch.int32)
    push[(1,)](inbox, data, n, 7, BLOCK=128)
    assert ((inbox >> 32) == 7).all()
    poll[(1,)](inbox, out, status, n, 7, 1000, BLOCK=128)
    assert status.item() == 0 and torch.equal(out, data), (status, out)
    poll[(1,)](inbox, out, status, n, 8, 50, BLOCK=128)  # flag 8 never arrives: bounded
    assert status.item() == n, status
    print("INTERPRETED OK")
    """
)


def test_gpu_kernels_under_the_triton_interpreter():
    """probe_pairs' ping-pong and the smoke script's LL8 kernels, run on CPU by Triton's
    interpreter against Python peers: protocol logic and the bounded spins."""
    pytest.importorskip("triton", reason="Triton is not installed")
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, "-c", INTERPRETED, str(REPO / "bench" / "cuda_transport_smoke.py")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert "INTERPRETED OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


# ============================================================================ real GPUs
def _gpu_or_skip(min_devices: int):
    _C.cuda.reload_driver("")
    a = cuda.availability()
    if not a:
        pytest.skip(f"no usable CUDA device: {a.reason}")
    n = len(cuda.devices())
    if n < min_devices:
        pytest.skip(f"needs {min_devices} CUDA devices, {n} visible")


@pytest.mark.gpu
def test_gpu_region_lifecycle(default_driver):
    _gpu_or_skip(1)
    with cuda.CudaRegion(1, 0, 1 << 20, 0) as region:
        assert region.bytes % _C.cuda.granularity(0) == 0
        assert region.read(0, 0, 4096) == bytes(4096)
        region.write(0, 100, b"mailbox")
        assert region.read(0, 100, 7) == b"mailbox"
    assert _C.cuda.live_allocations() == 0


@pytest.mark.gpu
def test_gpu_probe_pairs(default_driver):
    _gpu_or_skip(2)
    matrix = cuda.p2p_matrix()
    for p in cuda.probe_local_pairs():
        assert p.driver_p2p == matrix[p.src][p.dst]
        if p.driver_p2p:
            assert p.verified, p


@pytest.mark.gpu
def test_gpu_two_processes(default_driver, tmp_path, monkeypatch):
    monkeypatch.delenv("CCL_CUDA_DRIVER", raising=False)
    _gpu_or_skip(2)
    matrix = cuda.p2p_matrix()
    if not (matrix[0][1] and matrix[1][0]):
        pytest.skip(f"GPUs 0 and 1 report no peer access (p2p matrix {matrix})")
    try:
        import torch

        use_torch = torch.cuda.is_available()
    except ImportError:
        use_torch = False
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    for r in run_processes(2, tmp_path, env, devices=[0, 1], use_torch=use_torch):
        assert "error" not in r, r.get("traceback")
        assert r["copy_ok"] and r["verified"], r
        if use_torch:
            assert r["torch_ok"], r
