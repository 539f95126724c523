"""LL8 packets for the Triton kernels: the mirror of ``csrc/common/ll_packet.h``.

One packet is one int64 word::

    bits 63..32  flag : low 32 bits of the call's sequence number
    bits 31..0   data : 4 payload bytes (one fp32, or two bf16/fp16 values, low element first)

Atomicity assumption: an aligned 8-byte store and an aligned 8-byte load are single-copy
atomic (64-bit global stores/loads on NVIDIA and AMD GPUs, Intel Xe LSC 64-bit messages, and
x86-64/AArch64 for the interpreter). A reader that sees the current flag therefore also sees
the data written with it, so no fence is needed between data and flag: the flag is inside the
word. Words are never cleared; flags are compared for equality, never ``>=``.

Everything that differs between devices (how a packet is published and how a mailbox is
polled) is in this module, chosen at trace time by the ``BACKEND`` constexpr:

================  ============================================  ================================
BACKEND           publish (store to a peer's inbox)             poll (load from our own inbox)
================  ============================================  ================================
CUDA (default)    ``st.relaxed.sys.global.b64`` (inline PTX;    ``volatile`` load (``ld.volatile``
                  NCCL's LL protocol uses the equivalent        = ``ld.relaxed.sys``: bypasses
                  ``st.volatile``)                              L1, reads the L2 peer writes land
                                                                in)
CUDA_FENCED       one system-scope release fence per program    volatile load
                  (``atomic_add(0, release, sys)`` on a local
                  scratch word), then the CUDA store
CUDA_XCHG         per-word ``atomic_xchg(relaxed, sys)``:       volatile load
                  no inline assembly (ROCm's choice)
XPU               system-scope release fence, then stores with  volatile load with
                  ``.cg`` (L1 uncached, L3 write-back): a        ``cache_modifier=".cv"`` (L1 and
                  default store can stay in L1 where the peer   L3 uncached): a default load keeps
                  never sees it (field notes: plain store +     hitting a stale L1 copy
                  fence + spin hung > 120 s on 2x B70)
XPU_ATOMIC        as XPU                                        ``atomic_add(0, relaxed, sys)`` on
                                                                our own inbox: reads memory whatever
                                                                the compiler does with ``volatile``
                                                                and cache modifiers (see below)
INTERPRET         plain store (the interpreter ignores cache    plain load (every load reads
                  modifiers)                                    memory)
================  ============================================  ================================

On XPU both variants also issue a system-scope release fence after each round of publishes
(``publish_flush``), so stores that a compiler left in L1 are written out. Reason: the
``triton-xpu`` 3.3.0b1 wheel compiles these kernels to SPIR-V but drops ``volatile`` and the
``.cv``/``.cg`` cache modifiers (no volatile OpLoad, no CacheControl decoration in the binary;
docs/TRITON.md), so with that compiler the recipe above is not what reaches the GPU.

Why not a plain ``tl.store`` on CUDA: a weak store to peer memory is only guaranteed to become
visible to the peer at a system-scope fence, not eventually. Measured on 2x H200 (NVLink,
bench/gpu_validate.py, runs 1-2): with plain ``st.global.b64`` publishes, about one call in 40
of a two-shot all-reduce over 256-513 programs left a few packets unseen by the peer for the
whole 30 s bound, while the writer's kernel had finished (RCCL hit the same with plain LL
stores "trapped in L2", ROCm/rocm-systems#7183). Strong (relaxed, system-scope) stores are
guaranteed to become visible; they are what NCCL's LL protocol issues. Triton 3.6 has no
``sem``/``scope`` on ``tl.store``, hence the inline PTX, confined to this module.

The fence is not needed for the data of a packet (the flag is inside the word); it is kept
on XPU because the field recipe that works there has it, and is selectable on CUDA so that
the bench can measure its cost.

bf16 rounding is done with integer operations (``f32_to_bf16_bits``, the formula of
``f32_to_bf16`` in csrc/host/mailbox.cpp and of torch): the Triton interpreter truncates
fp32 -> bf16 (and its "rtne" mode rounds half up), so a native cast would make interpreter
results differ from torch's. One code path everywhere keeps CI bit-exact; it costs a handful
of integer operations per element on a device.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

__all__ = [
    "BACKEND_CUDA",
    "BACKEND_CUDA_FENCED",
    "BACKEND_CUDA_XCHG",
    "BACKEND_XPU",
    "BACKEND_XPU_ATOMIC",
    "BACKEND_INTERPRET",
    "all_warps_max",
    "backend_for",
]

BACKEND_CUDA = tl.constexpr(0)
BACKEND_CUDA_FENCED = tl.constexpr(1)
BACKEND_CUDA_XCHG = tl.constexpr(2)
BACKEND_XPU = tl.constexpr(3)
BACKEND_INTERPRET = tl.constexpr(4)
BACKEND_XPU_ATOMIC = tl.constexpr(5)

_BACKEND_NAMES = {
    "cuda": 0,
    "cuda_fenced": 1,
    "cuda_xchg": 2,
    "xpu": 3,
    "interpret": 4,
    "xpu_atomic": 5,
}

FLAG_SHIFT = tl.constexpr(32)
LOW32 = tl.constexpr(0xFFFFFFFF)
LOW16 = tl.constexpr(0xFFFF)


def backend_for(device_type: str, variant: str | None = None) -> int:
    """Host side: the ``BACKEND`` constexpr for a torch device type ("cuda", "xpu", "cpu").

    ``cpu`` means the Triton interpreter (TRITON_INTERPRET=1). ``variant`` picks a CUDA
    publish variant by name ("cuda", "cuda_fenced", "cuda_xchg"); ROCm reports "cuda".
    """
    if variant is not None:
        if variant not in _BACKEND_NAMES:
            raise ValueError(
                f"unknown LL backend variant {variant!r}; one of {sorted(_BACKEND_NAMES)}"
            )
        return _BACKEND_NAMES[variant]
    if device_type == "cuda":
        import torch

        # ROCm builds report "cuda": no inline PTX there, atomic exchanges instead.
        return _BACKEND_NAMES["cuda_xchg" if torch.version.hip else "cuda"]
    if device_type == "xpu":
        return _BACKEND_NAMES["xpu"]
    if device_type == "cpu":
        return _BACKEND_NAMES["interpret"]
    raise ValueError(f"no LL backend for device type {device_type!r} (cuda, xpu or cpu)")


def pdl_kwargs(kernel, device) -> dict:
    """Launch keywords for programmatic dependent launch of ``kernel`` on ``device``:
    ``PDL`` (the kernel's constexpr, see ``await_prior_kernel``) and Triton's ``launch_pdl``,
    when CCL_PDL=1, the device is a CUDA GPU of compute capability 9 or newer (not ROCm) and
    the kernel takes ``PDL``; else none. Opt-in until measured on two GPUs. (Called per
    launch: the device answer is cached.)"""
    if getattr(device, "type", None) != "cuda" or not _pdl_device(device.index):
        return {}
    if "PDL" not in getattr(kernel, "arg_names", ()):
        return {}
    return {"PDL": True, "launch_pdl": True}


@functools.lru_cache(maxsize=None)
def _pdl_device(index) -> bool:
    import os

    if os.environ.get("CCL_PDL", "0") != "1":
        return False
    import torch

    return not torch.version.hip and torch.cuda.get_device_capability(index)[0] >= 9


# ----------------------------------------------------------------------------- packet fields
@triton.jit
def pack(data, flag):
    """LL8Packet::pack: int64 word from 32 data bits (any int type) and a flag in [0, 2^32)."""
    return (flag.to(tl.int64) << FLAG_SHIFT) | (data.to(tl.int64) & LOW32)


@triton.jit
def flag_of(word):
    """LL8Packet::flag_of (as int64 in [0, 2^32))."""
    return (word >> FLAG_SHIFT) & LOW32


@triton.jit
def data_of(word):
    """LL8Packet::data_of (as int64 in [0, 2^32))."""
    return word & LOW32


@triton.jit
def both(block_mask, scalar_cond):
    """``block_mask & scalar_cond``. Written with ``where`` because the interpreter
    broadcasts a scalar int1 as int32, and its loads and stores then reject the mask."""
    return tl.where(scalar_cond, block_mask, False)


# ----------------------------------------------------------------------------- publish / poll
@triton.jit
def publish_fence(scratch_ptr, BACKEND: tl.constexpr):
    """Once per program before its first publish: a system-scope release fence where the
    backend wants one (XPU, CUDA_FENCED). ``scratch_ptr`` is a local int64 word."""
    if BACKEND == BACKEND_XPU:
        tl.atomic_add(scratch_ptr, 0, sem="release", scope="sys")
    elif BACKEND == BACKEND_XPU_ATOMIC:
        tl.atomic_add(scratch_ptr, 0, sem="release", scope="sys")
    elif BACKEND == BACKEND_CUDA_FENCED:
        tl.atomic_add(scratch_ptr, 0, sem="release", scope="sys")


@triton.jit
def publish_flush(scratch_ptr, BACKEND: tl.constexpr):
    """After a round of publishes: a system-scope release fence on XPU (stores a compiler left
    in L1 are written out); nothing elsewhere. ``scratch_ptr`` is a local int64 word."""
    if BACKEND == BACKEND_XPU:
        tl.atomic_add(scratch_ptr, 0, sem="release", scope="sys")
    elif BACKEND == BACKEND_XPU_ATOMIC:
        tl.atomic_add(scratch_ptr, 0, sem="release", scope="sys")


@triton.jit
def _st_relaxed_sys_b64(ptr, word, mask):
    """CUDA: ``st.relaxed.sys.global.b64 [ptr], word`` where ``mask``: a strong store that is
    guaranteed to become visible to peers (a weak one is not)."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred %p; setp.ne.b32 %p, $3, 0; @%p st.relaxed.sys.global.b64 [$1], $2; mov.u32 $0, 0; }",
        "=r,l,l,r",
        [ptr, word, mask.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def store(ptr, word, mask, BACKEND: tl.constexpr):
    """LL8Packet::store: publish packets ``word`` (int64) at ``ptr`` (a peer's inbox)."""
    if (BACKEND == BACKEND_XPU) or (BACKEND == BACKEND_XPU_ATOMIC):
        tl.store(ptr, word, mask=mask, cache_modifier=".cg")
    elif BACKEND == BACKEND_CUDA_XCHG:
        tl.atomic_xchg(ptr, word, mask=mask, sem="relaxed", scope="sys")
    elif BACKEND == BACKEND_INTERPRET:
        tl.store(ptr, word, mask=mask)
    else:
        _st_relaxed_sys_b64(ptr, word, mask)


@triton.jit
def load(ptr, mask, BACKEND: tl.constexpr):
    """LL8Packet::load: poll packets at ``ptr`` (our own inbox). Masked lanes read 0."""
    if BACKEND == BACKEND_XPU:
        w = tl.load(ptr, mask=mask, other=0, cache_modifier=".cv", volatile=True)
    elif BACKEND == BACKEND_XPU_ATOMIC:
        w = tl.where(mask, tl.atomic_add(ptr, 0, mask=mask, sem="relaxed", scope="sys"), 0)
    else:
        w = tl.load(ptr, mask=mask, other=0, volatile=True)
    return w


@triton.jit
def await_prior_kernel(PDL: tl.constexpr, BACKEND: tl.constexpr):
    """Programmatic dependent launch (``PDL``; CUDA sm_90+, launched with ``launch_pdl``):
    first let the stream's next PDL launch start its programs (they park in this same wait,
    so the launch latency overlaps our run), then wait until the stream's previous kernel has
    completed and its memory is visible. Every kernel calls it before its first read of
    anything an earlier kernel wrote (inputs, the sequence number). Nothing elsewhere."""
    if PDL:
        if (BACKEND == BACKEND_CUDA) or (BACKEND == BACKEND_CUDA_FENCED):
            tl.inline_asm_elementwise(
                "griddepcontrol.launch_dependents; griddepcontrol.wait; mov.u32 $0, 0;", "=r",
                [], dtype=tl.int32, is_pure=False, pack=1,
            )


@triton.jit
def pause(ns: tl.constexpr, BACKEND: tl.constexpr):
    """Sleep about ``ns`` nanoseconds (CUDA ``nanosleep``); nothing on other backends."""
    if (BACKEND == BACKEND_CUDA) or (BACKEND == BACKEND_CUDA_FENCED):
        tl.inline_asm_elementwise(
            "nanosleep.u32 $1; mov.u32 $0, 0;", "=r,r", [tl.full([], ns, tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1,
        )


# Spin-loop control must be the same in every warp of a program. A block smaller than the
# program's threads (a 4-word header, a 2-word qk exchange, a 16-column tile) is replicated
# across warps, and each warp polls its own copy at its own time: warps then disagree on
# "ready", leave a spin loop at different polls, and the barriers of the loop's block
# reductions go out of step (2x H200: one program kept spinning to its bound with the other
# warps gone, a ~limit-long stall with no status; and blocks summed from stale words).
# A reduction over a block spread over all threads (no replica: 512 lanes cover the 16 warps
# of the largest programs, one lane per thread) is Triton's cross-warp exchange.
UNIFORM_LANES = tl.constexpr(512)


@triton.jit
def all_warps_max(x):
    """The largest value of the int32 scalar ``x`` over every warp of the program: the same
    in all warps (see UNIFORM_LANES)."""
    lanes = tl.arange(0, UNIFORM_LANES)
    return tl.max(tl.where(lanes < UNIFORM_LANES, x, 0), 0)


@triton.jit
def _pending(ra, rb, SPANS: tl.constexpr):
    """Uniform across warps: > 0 while a lane of ``ra``/``rb`` (ready masks) is not ready.
    ``SPANS``: both blocks have one shape whose lanes cover every warp, so one max over them
    is already a cross-warp reduction (one shared-memory round instead of three)."""
    if SPANS:
        p = tl.max(((ra == 0) | (rb == 0)).to(tl.int32), 0)
    else:
        p = all_warps_max(tl.sum((ra == 0).to(tl.int32), 0) + tl.sum((rb == 0).to(tl.int32), 0))
    return p


@triton.jit
def wait(ptr_a, mask_a, ptr_b, mask_b, flag, limit, BACKEND: tl.constexpr,
         SPANS: tl.constexpr = False):
    """Bounded spin until every packet of the two blocks (a, b: any shapes; with ``SPANS``,
    one shape spread over every warp) carries ``flag``.

    Returns ``(words_a, words_b, ready)``; ``ready`` is false when ``limit`` polls passed
    first. Lanes that are ready are not read again.
    """
    wa = load(ptr_a, mask_a, BACKEND)
    wb = load(ptr_b, mask_b, BACKEND)
    ra = (flag_of(wa) == flag) | (mask_a == 0)
    rb = (flag_of(wb) == flag) | (mask_b == 0)
    pending = _pending(ra, rb, SPANS)
    spins = 0
    while (pending > 0) & (spins < limit):
        wa = tl.where(ra, wa, load(ptr_a, mask_a & (ra == 0), BACKEND))
        wb = tl.where(rb, wb, load(ptr_b, mask_b & (rb == 0), BACKEND))
        ra = (flag_of(wa) == flag) | (mask_a == 0)
        rb = (flag_of(wb) == flag) | (mask_b == 0)
        pending = _pending(ra, rb, SPANS)
        spins += 1
    return wa, wb, pending == 0


# ----------------------------------------------------------------------------- element codecs
@triton.jit
def bf16_bits_to_f32(bits):
    """Exact: 16 bf16 bits (in the low bits of any int) -> fp32."""
    return ((bits.to(tl.int32) & LOW16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def f16_bits_to_f32(bits):
    """Exact: 16 fp16 bits (in the low bits of any int) -> fp32."""
    return (bits & LOW16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def f32_to_bf16_bits(x):
    """fp32 -> bf16 bits (int32 in [0, 2^16)), round to nearest even, NaN kept quiet; the
    formula of torch and of csrc/host/mailbox.cpp ``f32_to_bf16``."""
    u = x.to(tl.int32, bitcast=True)
    lsb = (u >> 16) & 1
    r = ((u + 0x7FFF + lsb) >> 16) & LOW16
    nan = ((u >> 16) & LOW16) | 0x40
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, nan, r)


@triton.jit
def elem_bits(x, DTYPE: tl.constexpr):
    """Raw bits of elements of ``DTYPE`` (0 fp32, 1 bf16, 2 fp16) as int64."""
    if DTYPE == 0:
        b = x.to(tl.int32, bitcast=True).to(tl.int64) & LOW32
    else:
        b = x.to(tl.int16, bitcast=True).to(tl.int64) & LOW16
    return b


@triton.jit
def bits_to_f32(bits, DTYPE: tl.constexpr):
    """Exact: element bits of ``DTYPE`` (low bits of any int) -> fp32."""
    if DTYPE == 0:
        v = (bits & LOW32).to(tl.int32).to(tl.float32, bitcast=True)
    elif DTYPE == 1:
        v = bf16_bits_to_f32(bits)
    else:
        v = f16_bits_to_f32(bits)
    return v


@triton.jit
def from_f32(x, DTYPE: tl.constexpr):
    """fp32 -> ``DTYPE`` (0 fp32, 1 bf16, 2 fp16), round to nearest even, as torch does."""
    if DTYPE == 0:
        y = x
    elif DTYPE == 1:
        y = f32_to_bf16_bits(x).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(tl.float16)
    return y


# ----------------------------------------------------------------------------- interpreter
def interpreter_fast_calls(namespace: dict, keep: tuple[str, ...] = ()) -> None:
    """Under TRITON_INTERPRET=1, makes the ``@triton.jit`` helpers of a module callable
    without re-patching ``triton.language`` on every call.

    The interpreter's device-function call re-applies its patches to ``triton.language``
    (``inspect.getmembers`` of the module, ~0.3 ms) each time a helper is called; in a spin
    loop that dominates (several ms per poll). The kernel launch (``keep``: the kernels) has
    already applied the same global patches, so helpers can run their rewritten Python body
    directly. A no-op when not interpreting or when this Triton's interpreter lacks
    ``InterpretedFunction.rewrite``.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old Triton
        return
    for name, obj in list(namespace.items()):
        if name in keep or not isinstance(obj, InterpretedFunction) or not hasattr(obj, "rewrite"):
            continue
        namespace[name] = _DirectCall(obj)


class _DirectCall:
    __slots__ = ("_jit", "_fn")

    def __init__(self, jit_fn):
        self._jit = jit_fn
        self._fn = None

    def __call__(self, *args, **kwargs):
        if self._fn is None:
            self._fn = self._jit.rewrite()
        return self._fn(*args, **kwargs)


interpreter_fast_calls(globals())
