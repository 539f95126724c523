"""Level Zero handles behind PyTorch's XPU queues, through SYCL's Level Zero interop.

Why a shim (the decision, also in docs/ARC.md): the mailbox must live in the Level Zero context
of PyTorch's queue. torch 2.13 exposes a stream's ``sycl::queue*`` (``torch.xpu.Stream.sycl_queue``,
``torch._C._xpu_getCurrentRawStream``) but no Level Zero handle, and the only supported way from
a SYCL queue to ``ze_context_handle_t`` / ``ze_device_handle_t`` is
``sycl::get_native<sycl::backend::ext_oneapi_level_zero>(...)``: C++ templates over libsycl's
ABI, not callable from ctypes. So ``sycl_interop.cpp`` (next to this file; ~40 lines of host
C++) is compiled on first use with the system C++ compiler against the SYCL headers and the
``libsycl.so`` of the running PyTorch — the ``intel-sycl-rt`` wheel that PyTorch's XPU wheels
depend on ships both (``<prefix>/include/sycl``, ``<prefix>/lib/libsycl.so.N``), and so does
oneAPI — then cached (``$CCL_CACHE_DIR`` or ``~/.cache/ccl``) and loaded with ctypes. It is never
part of ``ccl._C``: a wheel built on a machine without SYCL still gets interop on an XPU machine,
and ``ccl._C`` never depends on libsycl.

Where the toolchain comes from, first match wins: the libsycl already loaded in this process
(after ``import torch`` on XPU; the headers must sit in its ``../include``), ``$CCL_SYCL_ROOT``,
``sys.prefix``, ``$CMPLR_ROOT``, ``$ONEAPI_ROOT/compiler/latest``. The compiler is ``$CXX``, else
``c++``/``g++``/``clang++``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ccl.errors import TransportError
from ccl.transport.base import Availability

logger = logging.getLogger(__name__)

__all__ = [
    "NativeHandles",
    "SyclToolchain",
    "availability",
    "build",
    "find_toolchain",
    "torch_xpu_handles",
    "ze_handles_from_queue",
]

SHIM_ABI = 1
_SOURCE = Path(__file__).with_name("sycl_interop.cpp")
_lib: ctypes.CDLL | None = None


@dataclasses.dataclass(frozen=True)
class NativeHandles:
    """The Level Zero objects behind one SYCL queue (integers, as the transport takes them)."""

    context: int  # ze_context_handle_t
    device: int  # ze_device_handle_t
    queue: int  # ze_command_list_handle_t (immediate) or ze_command_queue_handle_t
    immediate_list: bool


@dataclasses.dataclass(frozen=True)
class SyclToolchain:
    include_dir: Path  # holds sycl/sycl.hpp
    library: Path  # libsycl.so.N
    compiler: str
    origin: str  # where it was found


def _loaded_libsycl() -> Path | None:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if "/" in line else ""
                name = os.path.basename(path)
                if name.startswith("libsycl.so.") and "preview" not in name:
                    return Path(path)
    except OSError:
        pass
    return None


def _libsycl_in(libdir: Path) -> Path | None:
    # The versioned soname (libsycl.so.9), not the dev symlink nor libsycl-preview.
    cands = sorted(p for p in libdir.glob("libsycl.so.*") if p.name.count(".") == 2)
    return cands[-1] if cands else None


def _roots() -> list[tuple[str, Path]]:
    roots = []
    if os.environ.get("CCL_SYCL_ROOT"):
        roots.append(("CCL_SYCL_ROOT", Path(os.environ["CCL_SYCL_ROOT"])))
    roots.append(("sys.prefix", Path(sys.prefix)))
    if os.environ.get("CMPLR_ROOT"):
        roots.append(("CMPLR_ROOT", Path(os.environ["CMPLR_ROOT"])))
    if os.environ.get("ONEAPI_ROOT"):
        roots.append(("ONEAPI_ROOT", Path(os.environ["ONEAPI_ROOT"]) / "compiler" / "latest"))
    return roots


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c.split()[0]):
            return c
    return None


def find_toolchain() -> SyclToolchain | None:
    """find_toolchain() -> SyclToolchain | None: SYCL headers + libsycl + a C++ compiler."""
    cxx = _compiler()
    if cxx is None:
        return None
    loaded = _loaded_libsycl()
    if loaded is not None:
        inc = loaded.parent.parent / "include"
        if (inc / "sycl" / "sycl.hpp").exists():
            return SyclToolchain(inc, loaded, cxx, "libsycl loaded in this process")
    for origin, root in _roots():
        lib = _libsycl_in(root / "lib")
        inc = root / "include"
        if lib is not None and (inc / "sycl" / "sycl.hpp").exists():
            return SyclToolchain(inc, lib, cxx, f"{origin}={root}")
    return None


def availability() -> Availability:
    """availability() -> Availability: whether the shim can be built/loaded here. Local."""
    if _lib is not None:
        return Availability(True, "shim loaded")
    tc = find_toolchain()
    if tc is None:
        return Availability(
            False,
            "no SYCL toolchain: need the SYCL headers and libsycl.so of the intel-sycl-rt wheel "
            "(pip install intel-sycl-rt; PyTorch's XPU wheels depend on it) or oneAPI "
            "(set CCL_SYCL_ROOT), and a C++ compiler ($CXX, c++, g++ or clang++)",
        )
    return Availability(True, f"SYCL headers {tc.include_dir}, {tc.library.name} ({tc.origin}), {tc.compiler}")


def _cache_dir() -> Path:
    d = os.environ.get("CCL_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "ccl"


def build(toolchain: SyclToolchain | None = None, cache_dir: Path | None = None) -> Path:
    """build(toolchain=None, cache_dir=None) -> Path of the shim (compiled once, then cached).

    Raises TransportError with the compiler's output when it cannot be built. Local.
    """
    tc = toolchain or find_toolchain()
    if tc is None:
        raise TransportError(availability().reason)
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([src, str(tc.library.resolve()).encode(), str(tc.include_dir).encode(),
                    tc.compiler.encode(), str(SHIM_ABI).encode()])
    ).hexdigest()[:16]
    out_dir = cache_dir or _cache_dir()
    out = out_dir / f"sycl_interop-{key}.so"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    libdir = tc.library.parent
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    cmd = [
        *tc.compiler.split(), "-std=c++17", "-O1", "-shared", "-fPIC",
        "-DSYCL_DISABLE_FSYCL_SYCLHPP_WARNING", f"-I{tc.include_dir}", str(_SOURCE), "-o", tmp,
        f"-L{libdir}", f"-l:{tc.library.name}", f"-Wl,-rpath,{libdir}",
    ]
    logger.info("building the SYCL interop shim: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        os.unlink(tmp)
        raise TransportError(f"building the SYCL interop shim failed: {e}") from e
    if proc.returncode != 0:
        os.unlink(tmp)
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise TransportError(
            f"building the SYCL interop shim failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}"
        )
    os.replace(tmp, out)  # atomic: ranks building at once all end with one complete file
    return out


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        path = build()
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise TransportError(f"loading the SYCL interop shim {path} failed: {e}") from e
        if lib.ccl_sycl_shim_abi() != SHIM_ABI:
            raise TransportError(f"the SYCL interop shim {path} has the wrong ABI version")
        f = lib.ccl_sycl_queue_ze_handles
        # int ccl_sycl_queue_ze_handles(void* queue, uintptr_t* context, uintptr_t* device,
        #                               uintptr_t* native_queue, int* is_immediate_list,
        #                               char* err, size_t err_len)
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t),
                      ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_int), ctypes.c_char_p,
                      ctypes.c_size_t]
        _lib = lib
    return _lib


def ze_handles_from_queue(queue_ptr: int) -> NativeHandles:
    """ze_handles_from_queue(queue_ptr) -> NativeHandles

    The Level Zero context, device and native queue behind a ``sycl::queue*`` (an integer,
    e.g. ``torch.xpu.current_stream().sycl_queue``). Builds the shim on first use. Raises
    TransportError (no toolchain, not a Level Zero queue). Local.
    """
    lib = _load()
    ctx, dev, q = ctypes.c_size_t(), ctypes.c_size_t(), ctypes.c_size_t()
    imm = ctypes.c_int()
    err = ctypes.create_string_buffer(512)
    rc = lib.ccl_sycl_queue_ze_handles(ctypes.c_void_p(queue_ptr), ctypes.byref(ctx), ctypes.byref(dev),
                                       ctypes.byref(q), ctypes.byref(imm), err, len(err))
    if rc != 0:
        raise TransportError(f"SYCL -> Level Zero interop failed: {err.value.decode(errors='replace')}")
    return NativeHandles(ctx.value, dev.value, q.value, bool(imm.value))


def torch_xpu_handles(device=None) -> NativeHandles:
    """torch_xpu_handles(device=None) -> NativeHandles of PyTorch's current XPU stream. Local."""
    import torch

    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise TransportError("PyTorch has no XPU device here (torch.xpu.is_available() is False)")
    stream = torch.xpu.current_stream(device)
    return ze_handles_from_queue(int(stream.sycl_queue))
