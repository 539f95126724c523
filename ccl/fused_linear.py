"""Row-parallel projections (o_proj / down_proj) fused with the mailbox all-reduce and
residual-add + RMSNorm (DESIGN.md §4): the rank's partial GEMV, the all-reduce and the norm in
one call, for decode batches (M = 1..64 tokens).

Host tensors run the C++ kernels of ``csrc/host/gemv.cpp`` against the communicator's host
mailbox; CUDA / XPU tensors run one Triton launch (``ccl.kernels.triton_fused_linear``) against
its device mailbox. The partial is fp32 end to end: nothing is rounded between the GEMV and
the norm. Every rank receives the same partials and adds them in rank order, so every rank
gets bitwise-identical outputs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import struct
import weakref

import torch

from ccl import _C
from ccl.comm import Communicator, NormStyle
from ccl.errors import CclError, ConfigError

logger = logging.getLogger(__name__)

__all__ = ["Int4Weights", "linear_all_reduce_add_rms_norm", "linear_partial",
           "linear_qk_rms_norm"]

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_KIND_DENSE_KN, _KIND_DENSE_NK, _KIND_INT4 = 0, 1, 2
_GROUP_SIZES = (32, 64, 128)
_MAX_ROW = 16384  # device kernel: longest row (columns); longer rows take the unfused path
_MAX_ROWS = 64  # device kernel: rows per launch (triton_fused_linear.MAX_ROWS)


# ============================================================================== INT4 weights
@dataclasses.dataclass(frozen=True)
class Int4Weights:
    """Int4Weights(qweight, scales, group_size)

    INT4 weight-only, symmetric, GPTQ / AutoRound, in the layout vLLM loads
    (``vllm/model_executor/layers/quantization/gptq.py`` / ``auto_gptq.py``
    ``create_weights``: ``qweight`` with ``input_dim=0, output_dim=1, packed_dim=0,
    packed_factor=8``; packing of ``quant_utils.pack_rows`` / ``gptq_pack``; the exllama and
    Marlin paths load the same checkpoint tensors before repacking)::

        qweight  int32 [K // 8, N]     8 nibbles per int32 along K, lowest nibble first:
                 q[k, n] = (qweight[k // 8, n] >> (4 * (k % 8))) & 0xF      (0..15)
        scales   fp16 / bf16 / fp32 [K // G, N]
        W[k, n]  = (q[k, n] - 8) * scales[k // G, n]      (zero point 8: vLLM's uint4b8)

    ``K`` is this rank's input features (row-parallel: the local shard), ``N`` the output
    features, ``G = group_size`` in (32, 64, 128) dividing K. Both tensors may carry a leading
    expert dimension ``[E, ...]`` (MoE stacks). No act-order: a ``desc_act`` checkpoint's
    ``g_idx`` permutation must be applied to the input features beforehand (``from_gptq``
    refuses a non-trivial ``g_idx``). Symmetric checkpoints carry constant ``qzeros`` (GPTQ v1
    stores zero - 1 = 7 per nibble, 0x77777777; v2 stores 8, 0x88888888); they are checked by
    ``from_gptq`` and not kept.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    group_size: int

    def __post_init__(self):
        q, s, g = self.qweight, self.scales, self.group_size
        if not isinstance(q, torch.Tensor) or q.dtype != torch.int32:
            raise TypeError(f"qweight must be an int32 tensor, got {getattr(q, 'dtype', type(q))}")
        if not isinstance(s, torch.Tensor) or s.dtype not in _DTYPE_CODES:
            raise TypeError(f"scales must be fp16 / bf16 / fp32, got {getattr(s, 'dtype', type(s))}")
        if g not in _GROUP_SIZES:
            raise ValueError(f"group_size must be one of {_GROUP_SIZES}, got {g}")
        if q.dim() not in (2, 3) or s.dim() != q.dim():
            raise ValueError(f"qweight [.., K/8, N] and scales [.., K/G, N] need the same rank, "
                             f"got {tuple(q.shape)} and {tuple(s.shape)}")
        k = q.shape[-2] * 8
        if k % g or s.shape[-2] != k // g or s.shape[-1] != q.shape[-1] or s.shape[:-2] != q.shape[:-2]:
            raise ValueError(
                f"qweight {tuple(q.shape)} (K={k}) and scales {tuple(s.shape)} do not match "
                f"group_size {g}: scales must be [.., K/{g}, N]")
        if q.device != s.device:
            raise ValueError(f"qweight is on {q.device} but scales on {s.device}")
        if q.stride(-1) != 1 or s.stride(-1) != 1 or not q.is_contiguous() or not s.is_contiguous():
            raise ValueError("qweight and scales must be contiguous")

    @property
    def K(self) -> int:  # noqa: N802 - the math name
        return self.qweight.shape[-2] * 8

    @property
    def N(self) -> int:  # noqa: N802
        return self.qweight.shape[-1]

    @property
    def num_experts(self) -> int | None:
        return self.qweight.shape[0] if self.qweight.dim() == 3 else None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W ``[.., K, N]`` = (q - 8) * scale, computed in fp32 (exact), returned in ``dtype``."""
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=self.qweight.device)
        q = (self.qweight.unsqueeze(-2) >> shifts.view(-1, 1)) & 0xF  # [.., K/8, 8, N]
        q = q.reshape(*self.qweight.shape[:-2], self.K, self.N)
        s = self.scales.float().repeat_interleave(self.group_size, dim=-2)
        return ((q - 8).float() * s).to(dtype)

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int = 128,
                 scale_dtype: torch.dtype = torch.float16) -> Int4Weights:
        """Round-to-nearest symmetric quantisation of ``w [.., K, N]`` (vLLM
        ``quantize_weights`` for uint4b8: ``scale = max(|max| / 7, |min| / 8)`` per group and
        column). For tests and benchmarks; real checkpoints come from GPTQ / AutoRound."""
        *lead, k, n = w.shape
        if k % group_size or k % 8:
            raise ValueError(f"K={k} must be a multiple of group_size={group_size} and of 8")
        wg = w.float().reshape(*lead, k // group_size, group_size, n)
        hi = wg.amax(-2, keepdim=True)
        lo = wg.amin(-2, keepdim=True)
        s = torch.maximum((hi / 7).abs(), (lo / -8).abs()).clamp(min=1e-8).to(scale_dtype)
        q = (torch.round(wg / s.float()).clamp(-8, 7) + 8).to(torch.int32)
        q = q.reshape(*lead, k // 8, 8, n)
        packed = torch.zeros(*lead, k // 8, n, dtype=torch.int32, device=w.device)
        for i in range(8):
            packed |= q[..., i, :] << (4 * i)
        return cls(packed.contiguous(), s.reshape(*lead, k // group_size, n).contiguous(),
                   group_size)

    @classmethod
    def from_gptq(cls, qweight: torch.Tensor, scales: torch.Tensor, *,
                  qzeros: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
                  group_size: int | None = None) -> Int4Weights:
        """From a vLLM GPTQ / AutoRound layer's ``qweight``, ``scales`` (and optionally
        ``qzeros``, ``g_idx``). Raises ValueError for asymmetric zeros or act-order."""
        k = qweight.shape[-2] * 8
        if group_size is None:
            group_size = k // scales.shape[-2]
        if qzeros is not None:
            vals = {int(v) & 0xFFFFFFFF for v in torch.unique(qzeros).tolist()}
            if not vals <= {0x77777777, 0x88888888}:
                raise ValueError("qzeros are not symmetric (every nibble 7 or 8): asymmetric "
                                 "INT4 is not supported")
        if g_idx is not None:
            trivial = torch.arange(k, device=g_idx.device, dtype=g_idx.dtype) // group_size
            if g_idx.numel() and not torch.equal(g_idx.reshape(-1)[:k], trivial):
                raise ValueError("act-order (desc_act) g_idx is not supported: permute the "
                                 "input features first")
        return cls(qweight.contiguous(), scales.contiguous(), group_size)

    @functools.cached_property
    def _desc(self) -> tuple:
        e = self.num_experts
        return (_KIND_INT4, _DTYPE_CODES[self.scales.dtype], self.qweight.data_ptr(),
                self.qweight.stride(-2), self.scales.data_ptr(), self.scales.stride(-2),
                self.group_size, self.K, self.N,
                self.qweight.stride(0) if e is not None else 0,
                self.scales.stride(0) if e is not None else 0)


# ============================================================================== native door
class _CtypesGemv:
    """The C ABI of csrc/bindings/gemv.cpp through ctypes (while ``_C.gemv`` is not
    registered). Same signatures as the pybind functions; no fused mailbox entry points."""

    fused = False

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        u, i64, p64 = ctypes.c_size_t, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
        # int ccl_gemv_linear_f32(int x_dtype, uintptr_t x, int64_t ldx, int64_t M,
        #     const int64_t* desc, uintptr_t out, int64_t ldo, uintptr_t row_scale, int acc);
        self._linear = lib.ccl_gemv_linear_f32
        self._linear.argtypes = [ctypes.c_int, u, i64, i64, p64, u, i64, u, ctypes.c_int]
        self._linear.restype = ctypes.c_int
        # int ccl_gemv_moe_f32(int x_dtype, uintptr_t x, int64_t ldx, int64_t M,
        #     uintptr_t ids, uintptr_t topk_weights, int64_t topk, int64_t num_experts,
        #     const int64_t* w13, const int64_t* w2, uintptr_t out);
        self._moe = lib.ccl_gemv_moe_f32
        self._moe.argtypes = [ctypes.c_int, u, i64, i64, u, u, i64, i64, p64, p64, u]
        self._moe.restype = ctypes.c_int
        # void ccl_gemv_add_rms_norm_f32(int dtype, uintptr_t sums, uintptr_t residual,
        #     uintptr_t weight, uintptr_t out, uintptr_t residual_out, int64_t rows,
        #     int64_t cols, float eps, int gemma);
        self._norm = lib.ccl_gemv_add_rms_norm_f32
        self._norm.argtypes = [ctypes.c_int, u, u, u, u, u, i64, i64, ctypes.c_float, ctypes.c_int]
        self._norm.restype = None
        self._desc_t = ctypes.c_int64 * 11
        self._descs: dict[tuple, ctypes.Array] = {}  # descriptor tuple -> C array (reused)

    def _c(self, desc):
        arr = self._descs.get(desc)
        if arr is None:
            if len(self._descs) > 4096:
                self._descs.clear()
            arr = self._descs[desc] = self._desc_t(*desc)
        return arr

    def linear_f32(self, x_dtype, x, ldx, m, desc, out, ldo, row_scale, accumulate):
        return self._linear(x_dtype, x, ldx, m, self._c(desc), out, ldo, row_scale,
                            int(accumulate))

    def moe_f32(self, x_dtype, x, ldx, m, ids, tw, topk, num_experts, w13, w2, out):
        return self._moe(x_dtype, x, ldx, m, ids, tw, topk, num_experts, self._c(w13),
                         self._c(w2), out)

    def add_rms_norm_f32(self, dtype, sums, residual, weight, out, residual_out, rows, cols,
                         eps, gemma):
        self._norm(dtype, sums, residual, weight, out, residual_out, rows, cols, eps, int(gemma))


class _PybindGemv:
    fused = True

    def __init__(self, mod):
        self.linear_f32 = mod.linear_f32
        self.moe_f32 = mod.moe_f32
        self.add_rms_norm_f32 = mod.add_rms_norm_f32
        self.linear_add_rms_norm = mod.linear_add_rms_norm
        self.moe_add_rms_norm = mod.moe_add_rms_norm


@functools.lru_cache(maxsize=1)
def _native():
    mod = getattr(_C, "gemv", None)
    if mod is not None:
        return _PybindGemv(mod)
    return _CtypesGemv(_C.__file__)


# ============================================================================== validation
def _code(t: torch.Tensor, name: str) -> int:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")
    return code


def _weight_desc(weight, quant, k: int, device) -> tuple[tuple, int]:
    """(descriptor, N) of the dense weight [K, N] or the Int4Weights."""
    if (weight is None) == (quant is None):
        raise ValueError("pass exactly one of weight (dense [K, N]) and quant (Int4Weights)")
    if quant is not None:
        if not isinstance(quant, Int4Weights):
            raise TypeError(f"quant must be Int4Weights, got {type(quant).__name__}")
        if quant.num_experts is not None:
            raise ValueError("quant has an expert dimension; use ccl.fused_moe for expert stacks")
        if quant.K != k:
            raise ValueError(f"x has K={k} input features but quant has K={quant.K}")
        if quant.qweight.device != device:
            raise ValueError(f"quant is on {quant.qweight.device} but x on {device}")
        return quant._desc, quant.N
    code = _code(weight, "weight")
    if weight.dim() != 2 or weight.shape[0] != k:
        raise ValueError(f"weight must be [K={k}, N], got {tuple(weight.shape)} (an nn.Linear "
                         "weight [N, K] is passed as weight.t())")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but x on {device}")
    n = weight.shape[1]
    if weight.stride(1) == 1 and weight.stride(0) >= n:
        return (_KIND_DENSE_KN, code, weight.data_ptr(), weight.stride(0), 0, 0, 0, k, n, 0, 0), n
    if weight.stride(0) == 1 and weight.stride(1) >= k:
        return (_KIND_DENSE_NK, code, weight.data_ptr(), weight.stride(1), 0, 0, 0, k, n, 0, 0), n
    raise ValueError(f"weight [K, N] needs unit stride in N (row-major) or in K (the transpose "
                     f"of an nn.Linear weight), got stride {weight.stride()}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [M, K] with unit stride in K (a view when possible)."""
    if x.dim() == 2 and x.stride(1) == 1 and x.stride(0) >= x.shape[1] > 0:
        return x
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got {tuple(x.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or x2.stride(0) < x2.shape[1]:
        x2 = x2.contiguous()
    return x2


def _check_like(t, shape, dtype, device, name):
    if (type(t) is torch.Tensor and t.dtype is dtype and t.shape == shape
            and t.device == device and t.is_contiguous()):
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x is {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous; pass {name}.contiguous()")


def _outputs(x2, n, out_shape, residual, norm_weight, out, residual_out):
    dtype, device = x2.dtype, x2.device
    _check_like(norm_weight, (n,), dtype, device, "norm_weight")
    if residual is not None:
        _check_like(residual, out_shape, dtype, device, "residual")
    if out is None:
        out = torch.empty(out_shape, dtype=dtype, device=device)
    else:
        _check_like(out, out_shape, dtype, device, "out")
    if residual_out is None:
        residual_out = torch.empty(out_shape, dtype=dtype, device=device)
    else:
        _check_like(residual_out, out_shape, dtype, device, "residual_out")
    return out, residual_out


# ============================================================================== public ops
@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def linear_partial(x: torch.Tensor, weight: torch.Tensor | None = None, *,
                   quant: Int4Weights | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """linear_partial(x, weight=None, *, quant=None, out=None) -> Tensor

    This rank's fp32 partial ``x [.., K] @ W [K, N]`` (the unfused building block; not a
    collective). CPU tensors run the C++ GEMV; device tensors the Triton GEMV of the fused
    kernels (``device_linear_partial``), or torch (dequantise + matmul) where Triton is
    missing. (2x H200, session 6: torch's path converted the whole weight to fp32 per call,
    ~11 us per 3072x3072 projection before the GEMV itself.)"""
    _code(x, "x")
    x2 = _rows(x)
    desc, n = _weight_desc(weight, quant, x2.shape[1], x.device)
    shape = (*x.shape[:-1], n)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    else:
        _check_like(out, shape, torch.float32, x.device, "out")
    if not x.is_cpu:
        if _triton_available() and x2.stride(-1) == 1:
            device_linear_partial(x2, weight, quant=quant, out=out.view(-1, n))
            return out
        w = quant.dequantize() if quant is not None else weight.float()
        torch.matmul(x2.float(), w, out=out.view(-1, n))
        return out
    st = _native().linear_f32(_DTYPE_CODES[x.dtype], x2.data_ptr(), x2.stride(0), x2.shape[0],
                              desc, out.data_ptr(), n, 0, False)
    if st:
        raise CclError(f"GEMV rejected its arguments (status {st}): {desc}")
    return out


def linear_all_reduce_add_rms_norm(
    comm: Communicator,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    quant: Int4Weights | None = None,
    norm_style: NormStyle = NormStyle.STANDARD,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_all_reduce_add_rms_norm(comm, x, weight, residual, norm_weight, eps=1e-6, *,
    quant=None, norm_style=STANDARD, out=None, residual_out=None) -> (out, residual_out)

    The row-parallel projection (o_proj / down_proj) of a TP decode step, its all-reduce and
    the next residual-add + RMSNorm, in one call. This is a collective operation::

        p_r          = x_r [M, K] @ W_r [K, N]                   (fp32, rank r's partial)
        residual_out = sum_r p_r (rank order, fp32) + residual
        out          = residual_out * rsqrt(mean(residual_out², -1) + eps) * w

    with ``w = norm_weight`` (STANDARD) or ``1 + norm_weight`` (GEMMA); fp32 math, nothing
    rounded before the outputs, which are stored in x's dtype (fp32 / bf16 / fp16).
    ``x``: ``[.., K]`` (K = this rank's shard of the input features). The weight is either
    ``weight``, dense ``[K, N]`` (row-major, or ``linear.weight.t()`` of an nn.Linear, any
    float dtype), or ``quant``, :class:`Int4Weights` (GPTQ / AutoRound symmetric INT4, group
    32 / 64 / 128; pass ``weight=None``). ``residual`` (or None), ``out``, ``residual_out``:
    ``[.., N]`` in x's dtype; outputs may alias ``residual`` and are allocated when None.
    ``norm_weight``: ``[N]``. Every rank gets bitwise-identical outputs.

    CPU tensors: C++ GEMV + host mailbox (above ``comm.max_bytes`` of fp32 partial the
    all-reduce goes to the wrapped backend). CUDA / XPU tensors: one Triton launch on the
    device mailbox (asynchronous; errors surface in ``comm.synchronize()``).
    """
    code = _code(x, "x")
    gemma = NormStyle(norm_style) is NormStyle.GEMMA
    x2 = _rows(x)
    m, k = x2.shape
    desc, n = _weight_desc(weight, quant, k, x.device)
    out_shape = (*x.shape[:-1], n)
    out, residual_out = _outputs(x2, n, out_shape, residual, norm_weight, out, residual_out)
    eps = float(eps)
    if m == 0:
        return out, residual_out
    if x.is_cpu:
        mailbox = comm._live()
        if mailbox is None:
            raise ValueError(f"x is on the CPU but this communicator runs on {comm.device}")
        _host(comm, mailbox, code, x2, desc, n, residual, norm_weight, out, residual_out, eps,
              gemma)
        return out, residual_out
    comm._live()
    dm = comm._device_mailbox
    if dm is not None and device_kernel_fits(dm, m, n):
        device_linear_add_rms_norm(dm, x2, weight, quant, residual, norm_weight, eps,
                                   gemma=gemma, out=out, residual_out=residual_out)
        return out, residual_out
    # Wrapped backend (no device mailboxes, or a partial above the mailbox capacity).
    partial = linear_partial(x2, weight, quant=quant)
    comm.all_reduce(partial)
    from ccl.kernels.reference import add_rms_norm_reference

    o, r = add_rms_norm_reference(partial, residual.reshape(m, n) if residual is not None else None,
                                  norm_weight, eps, gemma=gemma)
    out.view(m, n).copy_(o)
    residual_out.view(m, n).copy_(r)
    return out, residual_out


def linear_qk_rms_norm(
    comm: Communicator,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    q_cols: int,
    k_cols: int,
    quant: Int4Weights | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """linear_qk_rms_norm(comm, x, weight, q_weight, k_weight, eps=1e-6, *, q_cols, k_cols,
    quant=None, out=None) -> (q, k, v)

    The column-parallel QKV projection of a TP decode step with the TP-sharded Q/K RMSNorm
    (``Communicator.qk_rms_norm``) in its epilogue. This is a collective operation::

        qkv = x [M, K] @ W [K, N]          (rounded to x's dtype; this rank's columns)
        q, k, v = qkv[:, :q_cols], qkv[:, q_cols:q_cols + k_cols], qkv[:, q_cols + k_cols:]
        q = q * rsqrt(sum_r |q_r|² / (q_cols * world) + eps) * q_weight     (k alike)

    ``weight`` dense ``[K, N]`` or ``quant`` :class:`Int4Weights`; ``q_weight`` ``[q_cols]``
    and ``k_weight`` ``[k_cols]`` (this rank's shards of the norm weights); ``out``
    ``[M, N]`` contiguous in x's dtype (allocated when None). Returns views of ``out``.
    CUDA / XPU: one Triton launch when the device mailbox can take it (asynchronous; errors
    surface in ``comm.synchronize()``); otherwise, and on CPUs, the projection then
    ``comm.qk_rms_norm`` (the same values up to the order of the sums of squares).
    """
    _code(x, "x")
    x2 = _rows(x)
    m, k = x2.shape
    _, n = _weight_desc(weight, quant, k, x.device)
    if q_cols <= 0 or k_cols <= 0 or q_cols + k_cols > n:
        raise ValueError(f"q_cols={q_cols} and k_cols={k_cols} must be positive and fit in the "
                         f"{n} projected columns")
    _check_like(q_weight, (q_cols,), x.dtype, x.device, "q_weight")
    _check_like(k_weight, (k_cols,), x.dtype, x.device, "k_weight")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        _check_like(out, (m, n), x.dtype, x.device, "out")
    views = (out[:, :q_cols], out[:, q_cols:q_cols + k_cols], out[:, q_cols + k_cols:])
    if m == 0:
        return views
    if not x.is_cpu:
        comm._live()
        dm = comm._device_mailbox
        if dm is not None and device_qk_kernel_fits(dm, m, n):
            device_linear_qk_rms_norm(dm, x2, weight, quant, q_weight, k_weight, float(eps),
                                      q_cols=q_cols, k_cols=k_cols, out=out)
            return views
    out.copy_(linear_partial(x2, weight, quant=quant))
    q, kk, _ = views
    comm.qk_rms_norm(q, kk, q_weight, k_weight, float(eps), q_out=q, k_out=kk)
    return views


def _host(comm, mailbox, code, x2, desc, n, residual, norm_weight, out, residual_out, eps,
          gemma):
    native = _native()
    m = x2.shape[0]
    nbytes = 4 * m * n
    rp = residual.data_ptr() if residual is not None else 0
    if native.fused and nbytes <= comm.max_bytes:
        st = native.linear_add_rms_norm(
            mailbox, code, x2.data_ptr(), x2.stride(0), m, desc, rp, norm_weight.data_ptr(),
            out.data_ptr(), residual_out.data_ptr(), eps, gemma, comm._algorithm(nbytes, None))
        if st:
            comm._raise(st)
        return
    partial = torch.empty((m, n), dtype=torch.float32)
    st = native.linear_f32(code, x2.data_ptr(), x2.stride(0), m, desc, partial.data_ptr(), n, 0,
                           False)
    if st:
        raise CclError(f"rank {comm.rank}: GEMV rejected its arguments (status {st})")
    comm.all_reduce(partial)
    native.add_rms_norm_f32(code, partial.data_ptr(), rp, norm_weight.data_ptr(),
                            out.data_ptr(), residual_out.data_ptr(), m, n, eps, gemma)


# ============================================================================== device door
class _DeviceState:
    """Per DeviceMailbox: the ticket counter and the own-partial LL workspace."""

    def __init__(self, dm):
        from ccl.kernels import triton_fused_linear as F

        self.aux = torch.zeros(F.AUX_WORDS, dtype=torch.int64, device=dm.device)
        # fp32 scratch of the tile programs: [M, N] pre-norm rows + [M, n_tiles] sums of
        # squares, at most 2 * cap_words floats (int64 storage keeps the 8-byte alignment)
        self.ws = torch.zeros(dm.layout.cap_words, dtype=torch.int64, device=dm.device)


_DEVICE_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _device_weight(weight, quant):
    """(w_ptr, swe, swk, swn, s_ptr, sse, lds, group, WDT, N) kernel arguments of a dense
    ``[(E,) K, N]`` weight (any strides) or an :class:`Int4Weights` (``swe`` / ``sse``: the
    expert strides of a stacked ``[E, ...]`` weight, else 0)."""
    if quant is not None:
        q, sc = quant.qweight, quant.scales
        lead = q.dim() == 3
        return (q, q.stride(0) if lead else 0, q.stride(-2), q.stride(-1), sc,
                sc.stride(0) if lead else 0, sc.stride(-2), quant.group_size,
                _DTYPE_CODES[sc.dtype], quant.N)
    lead = weight.dim() == 3
    return (weight, weight.stride(0) if lead else 0, weight.stride(-2), weight.stride(-1),
            weight, 0, 0, 1, _DTYPE_CODES[weight.dtype], weight.shape[-1])


@dataclasses.dataclass(frozen=True)
class GemvTiles:
    """Tile shape of the device GEMV (``ccl.kernels.triton_fused_linear``).

    ``use_dot``: several activation rows per tile through ``tl.dot`` (``bm`` rows, padded to
    at least 16); otherwise one row at a time with elementwise fp32 products (the decode
    case, and every MoE slot). ``bn`` columns x ``bk`` K values per step; ``num_warps`` of
    the launch (the fused kernel's epilogue shares it); ``stages``: K tiles in flight in the
    ``tl.dot`` path's software pipeline (the row path always has two: it prefetches one)."""

    bn: int
    bk: int
    use_dot: bool = False
    bm: int = 1
    num_warps: int = 4
    stages: int = 1


# Defaults by (path, INT4), from bench/results/h200x2-fused-linear.json (2x H200, K 1536 per
# rank, N 3072, bf16): GEMV alone M=1 bf16 3.5 us (torch F.linear 4.5), INT4 3.7 us with
# 16-column tiles of 512 K values (more bytes in flight per step; 5.9 us with 256); M=8
# bf16 8.0 us with 8 warps. ``up`` / ``down``: the MoE gate/up kernel and the routed down
# projection (every slot's K step in one tile: BK K values per slot); their numbers are in
# bench/results/h200-moe*.json. The interpreter and other devices use the same.
_TILES = {
    # session 6 (h200x2-fused-linear-s6-sweep1.json, -oproj.json): 8 columns, twice the
    # programs: fused M=1 bf16 7.75 vs 7.96 us, INT4 7.67 vs 8.51; at o_proj's K 3072 9.35
    # vs 10.04 and 9.50 vs 11.03; decode step 4.92 vs 5.01 ms
    ("row", False): GemvTiles(bn=8, bk=256),
    ("row", True): GemvTiles(bn=8, bk=512),  # session 5: INT4 M=1 3.67 us (bk 256: 5.89)
    # M > 1 through tl.dot, software-pipelined (h200x2-fused-linear-m8sweep.json and
    # -s6-guess0.json, M=8): bf16 256 K values, 4 warps, 4 stages fused 9.36 us (GEMV 4.43,
    # torch 4.47; unpipelined 128 K values 8 warps 13.78 / 8.00); INT4 256 K values 3 stages
    # 13.27 (GEMV 7.82; unpipelined 16.75 / 12.41)
    ("dot", False): GemvTiles(bn=32, bk=256, use_dot=True, bm=16, stages=4),
    ("dot", True): GemvTiles(bn=32, bk=256, use_dot=True, bm=16, stages=3),
    ("up", False): GemvTiles(bn=16, bk=256),
    ("up", True): GemvTiles(bn=16, bk=512),
    ("down", False): GemvTiles(bn=8, bk=64),  # (dense experts: not measured on a GPU)
    # 2x H200 (h200-moe-s6-run{1,2}.json), INT4 down projection H 3072, I 768, top-8, one
    # token: 8x256x4 9.2 us, 4x128x4 10.0, 16x256x8 11.6, 16x512x8 17.7; one slot at a
    # time (session 5) ~21 us in the decode profile; roofline 2.0 us
    ("down", True): GemvTiles(bn=8, bk=256),
}
_PATHS = ("row", "dot", "up", "down")
_ROW_MAX_M = 1  # up to this many rows, one row at a time; above, tl.dot
_TILES_ENV = "CCL_GEMV_TILES"


@functools.lru_cache(maxsize=None)
def _tile_overrides(raw: str) -> dict:
    """``CCL_GEMV_TILES``: tile overrides for tuning on new hardware, e.g.
    ``row_int4=16x512x4,dot=32x128x8x3,down_int4=8x256x4`` (path ``row`` / ``dot`` / ``up``
    (MoE gate/up) / ``down`` (MoE down projection), ``_int4`` for INT4 weights;
    ``BNxBKxWARPS``, powers of two, and optionally ``xSTAGES``, 1..8, the dot path's
    pipeline depth)."""
    out = {}
    for item in filter(None, (p.strip() for p in raw.split(","))):
        try:
            key, dims = item.split("=")
            path, _, q = key.strip().partition("_")
            vals = [int(v) for v in dims.lower().split("x")]
            if len(vals) not in (3, 4) or (len(vals) == 4 and not 1 <= vals[3] <= 8):
                raise ValueError(dims)
            bn, bk, warps = vals[:3]
            base = _TILES[(path, q == "int4")] if path in _PATHS and q in ("", "int4") else None
            if base is None:
                raise ValueError(key)
            if any(v <= 0 or v & (v - 1) for v in (bn, bk, warps)) or bk < 16 or warps > 16:
                raise ValueError(dims)
        except ValueError as exc:
            raise ConfigError(f"{_TILES_ENV}: bad entry {item!r} ({exc}); expected e.g. "
                              "row_int4=16x512x4 or dot=16x128x4x3 (BNxBKxWARPS[xSTAGES])"
                              ) from None
        out[(path, q == "int4")] = dataclasses.replace(
            base, bn=bn, bk=bk, num_warps=warps,
            stages=vals[3] if len(vals) == 4 else base.stages)
    return out


def _tiles(path: str, int4: bool) -> GemvTiles:
    return _tile_overrides(os.environ.get(_TILES_ENV, "")).get((path, int4),
                                                              _TILES[(path, int4)])


def gemv_tiles(m: int, int4: bool, moe: str | None = None) -> GemvTiles:
    """The default tiles for an M-row GEMV, or for an MoE kernel (``moe``: ``"up"``, the
    gate/up kernel, or ``"down"``, the routed down projection; both one row at a time)."""
    if moe is not None:
        if moe not in ("up", "down"):
            raise ValueError(f"moe must be 'up' or 'down', got {moe!r}")
        return _tiles(moe, int4)
    if m <= _ROW_MAX_M:
        return _tiles("row", int4)
    t = _tiles("dot", int4)
    return dataclasses.replace(t, bm=min(64, max(t.bm, _next_pow2(m))))


def _native_dot(x, wdt: int, int4: bool) -> bool:
    """16-bit operands straight to ``tl.dot`` (tensor cores): on a device, for bf16 / fp16
    activations with weights of the same dtype or INT4. The interpreter keeps fp32."""
    return x.device.type != "cpu" and x.dtype != torch.float32 and (
        int4 or wdt == _DTYPE_CODES[x.dtype])


def _routing_args(topk_ids, topk_weights, x, weight, quant):
    """(ids_ptr, tw_ptr, n_experts, TOPK) kernel arguments; dummy pointers and 0s without
    routing."""
    if topk_ids is None:
        return x, x, 0, 0
    n_experts = quant.num_experts if quant is not None else weight.shape[0]
    return topk_ids, topk_weights, n_experts, topk_ids.shape[1]


def device_kernel_fits(dm, m: int, n: int) -> bool:
    """Whether an [M, N] fp32 partial fits the fused device kernel on ``dm``: the mailbox
    capacity, rows of at most 16384 columns, at most MAX_ROWS rows (else the callers take the
    unfused path: partial, all-reduce, norm)."""
    return m * n <= dm.layout.cap_words and n <= _MAX_ROW and m <= _MAX_ROWS


def _launch_now(kernel, grid, *args, **kwargs):
    from ccl.kernels.ll import pdl_kwargs

    kernel[grid](*args, **kwargs, **pdl_kwargs(kernel, args[0].device))


# Epilogue of the fused kernels: each row's final pass (normalise and store) is split over
# several programs of ``chunk`` columns each. CCL_FUSED_EPILOGUE_SPLIT (read once) sets the
# programs per row: 1 is one program per row (rows up to _EPI_MAX_COLS), 0 or unset the
# default below. 2x H200, N=3072 (bench/results/h200x2-fused-linear.json of session 5's
# sweep, programs per row 1/2/4/8/6): bf16 M=1 8.43/7.95/7.81/7.73/7.72 us, INT4 M=1
# 9.03/8.24/9.11/8.82/8.82, bf16 M=8 14.14/13.78/13.69/16.74/16.38, INT4 M=8
# 16.83/16.85/16.51/17.56/17.45: two per row is never the worst and wins at M=8, where more
# epilogue programs plus the tiles exceed the SMs.
_EPI_MAX_COLS = 4096  # most columns of one epilogue program: one block, 32 fp32 per thread
_EPI_AUTO_COLS = 512  # default: one program per this many columns ...
_EPI_AUTO_MAX = 2  # ... and at most this many per row
_EPI_SPLIT_ENV = "CCL_FUSED_EPILOGUE_SPLIT"


@functools.lru_cache(maxsize=1)
def _env_epilogue_split() -> int:
    raw = os.environ.get(_EPI_SPLIT_ENV, "0").strip() or "0"
    try:
        v = int(raw)
    except ValueError:
        v = -1
    if v < 0:
        raise ConfigError(f"{_EPI_SPLIT_ENV}={raw!r}: expected an integer >= 0 (programs per "
                          "row of the fused epilogue; 0 = the default)")
    return v


# How the fused linear kernel hands the all-reduced rows to its epilogue. "direct": the tiles
# publish their partials (to the peers and to our own slot) and leave; each epilogue program
# polls every source's packets of its columns itself, and a row's parts exchange their sums
# of squares (one LL word each). "counter": each tile all-reduces its own columns, leaves the
# sums in a scratch and counts the row done; the epilogue polls the counter (sessions 3-6).
# CCL_FUSED_HANDOFF picks one (read once; default _DEFAULT_HANDOFF).
_HANDOFF_ENV = "CCL_FUSED_HANDOFF"
_DEFAULT_HANDOFF = "counter"
_DIRECT_PART_COLS = 1024  # direct: one epilogue program per this many columns (power of 2)


@functools.lru_cache(maxsize=1)
def _env_handoff() -> str:
    raw = os.environ.get(_HANDOFF_ENV, _DEFAULT_HANDOFF).strip().lower() or _DEFAULT_HANDOFF
    if raw not in ("direct", "counter"):
        raise ConfigError(f"{_HANDOFF_ENV}={raw!r}: expected 'direct' or 'counter'")
    return raw


def direct_split(cols: int, interpreted: bool, split: int | None = None) -> int:
    """Epilogue programs per row of the direct handoff: a power of two (the parts' words are
    one block), ``split`` (None: CCL_FUSED_EPILOGUE_SPLIT, 0: one per 1024 columns) rounded
    up; always 1 under the Triton interpreter, which runs programs one after another (a part
    would wait on a sibling that has not run yet)."""
    if interpreted:
        return 1
    if split is None:
        split = _env_epilogue_split()
    if split <= 0:
        split = -(-cols // _DIRECT_PART_COLS)
    least = _next_pow2(-(-cols // _EPI_MAX_COLS))  # (one block holds at most 4096 columns)
    split = max(_next_pow2(split), least)
    while split > least and epilogue_split(cols, split)[0] != split:  # 16-column chunks
        split //= 2
    return split


def epilogue_split(cols: int, split: int | None = None) -> tuple[int, int, int]:
    """(parts, chunk, block): the epilogue of a row of ``cols`` columns runs as ``parts``
    programs of ``chunk`` columns (a multiple of 16, so every chunk starts aligned; the last
    one may be shorter), each one block of ``block`` lanes (a power of two >= chunk).
    ``split``: the programs per row wanted (None: CCL_FUSED_EPILOGUE_SPLIT; 0: the default,
    one per 512 columns, 1 or 2); rows longer than 4096 columns get at least enough programs
    for 4096 columns each."""
    if split is None:
        split = _env_epilogue_split()
    if split < 0:
        raise ValueError(f"epilogue split must be >= 0, got {split}")
    if split == 0:
        split = min(_EPI_AUTO_MAX, max(1, cols // _EPI_AUTO_COLS))
    split = max(split, -(-cols // _EPI_MAX_COLS))
    chunk = -(-cols // split)
    chunk = -(-chunk // 16) * 16
    return -(-cols // chunk), chunk, max(16, _next_pow2(chunk))


def device_linear_partial(x, weight=None, *, quant=None, out=None, tiles=None,
                          topk_ids=None, topk_weights=None, launch=None):
    """This rank's fp32 partial on a device (or the Triton interpreter): ``x [M, K] @ W
    [K, N]``, or with ``topk_ids`` / ``topk_weights`` ``[M, k]`` the MoE down projection
    ``sum_s tw[m, s] * x[m*k + s] @ W[ids[m, s]]`` (x ``[M*k, K]``, W stacked ``[E, K, N]``).
    The GEMV tiles of the fused kernel alone (``linear_kernel``): the unfused path's GEMV
    and the fused op's compute share in benchmarks. ``x`` has unit stride in K. ``launch``
    (kernel, grid, *args, **kwargs) replaces the launch (``DeviceMailbox._launch`` compiles
    only)."""
    from ccl.kernels import triton_fused_linear as F

    k = x.shape[1]
    w_ptr, swe, swk, swn, s_ptr, sse, lds, group, wdt, n = _device_weight(weight, quant)
    ids, tw, n_experts, topk = _routing_args(topk_ids, topk_weights, x, weight, quant)
    m = x.shape[0] // max(1, topk)
    if out is None:
        out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    elif (out.dtype not in (torch.float32, x.dtype) or tuple(out.shape) != (m, n)
          or not out.is_contiguous() or out.device != x.device):
        raise ValueError(f"out must be a contiguous [{m}, {n}] tensor of fp32 or x's dtype "
                         f"({x.dtype}) on {x.device}, got {tuple(out.shape)} {out.dtype}")
    t = tiles or gemv_tiles(m, quant is not None, moe="down" if topk else None)
    (launch or _launch_now)(
        F.linear_kernel, ((n + t.bn - 1) // t.bn,),
        x, x.stride(0), w_ptr, swk, swn, s_ptr, lds, group, out, m, k, n, ids, tw, swe, sse,
        n_experts,
        XDT=_DTYPE_CODES[x.dtype], WDT=wdt, INT4=quant is not None, BM=t.bm, BN=t.bn,
        BK=t.bk, USE_DOT=t.use_dot, STAGES=t.stages,
        NATIVE=_native_dot(x, wdt, quant is not None), TOPK=topk,
        SLOTS=_next_pow2(max(1, topk)), ODT=_DTYPE_CODES[out.dtype], num_warps=t.num_warps,
    )
    return out


def device_moe_gate_up(x, topk_ids, w13, *, quant=None, out=None, tiles=None, launch=None):
    """SiLU-gated MoE first half on a device: ``h [M*k, I]`` (x's dtype) with ``h[m*k + s] =
    silu(x[m] @ W13[e][:, :I]) * (x[m] @ W13[e][:, I:])``, ``e = topk_ids[m, s]``; W13 dense
    ``[E, H, 2I]`` or :class:`Int4Weights` ``[E, H/8, 2I]``. The Triton stand-in for a
    framework's fused-MoE gate/up GEMM; the down projection is :func:`device_linear_partial`
    or the fused all-reduce kernel with routing."""
    from ccl.kernels import triton_fused_linear as F

    m, k = x.shape
    topk = topk_ids.shape[1]
    w_ptr, swe, swk, swn, s_ptr, sse, lds, group, wdt, n2 = _device_weight(w13, quant)
    inter = n2 // 2
    if out is None:
        out = torch.empty((m * topk, inter), dtype=x.dtype, device=x.device)
    t = tiles or gemv_tiles(1, quant is not None, moe="up")
    (launch or _launch_now)(
        F.moe_gate_up_kernel, ((inter + t.bn - 1) // t.bn, m * topk),
        x, x.stride(0), topk_ids, w13.shape[0] if quant is None else quant.num_experts, w_ptr,
        swe, swk, swn, s_ptr, sse, lds, group, out, k, inter,
        TOPK=topk, XDT=_DTYPE_CODES[x.dtype], WDT=wdt, INT4=quant is not None, BN=t.bn,
        BK=t.bk, num_warps=t.num_warps,
    )
    return out


def device_linear_add_rms_norm(dm, x, weight, quant, residual, norm_weight, eps, *,
                               gemma=False, out, residual_out, tiles=None, topk_ids=None,
                               topk_weights=None, epi_split=None, handoff=None):
    """The device kernel on a :class:`ccl.device_mailbox.DeviceMailbox` (also the Triton
    interpreter's "cpu" mailbox). ``x`` ``[M, K]`` with unit stride in K (MoE: ``[M*k, K]``
    with ``topk_ids`` / ``topk_weights`` ``[M, k]`` and stacked weights); outputs / residual
    contiguous ``[M, N]``; ``epi_split``: epilogue programs per row (:func:`epilogue_split`;
    with the direct handoff, :func:`direct_split`); ``handoff``: "direct" / "counter" (None:
    CCL_FUSED_HANDOFF). Collective, asynchronous (``dm.raise_if_failed()``)."""
    from ccl.kernels import ll
    from ccl.kernels import triton_fused_linear as F

    state = _DEVICE_STATES.get(dm)
    if state is None:
        state = _DEVICE_STATES[dm] = _DeviceState(dm)
    code = _DTYPE_CODES[x.dtype]
    k = x.shape[1]
    w_ptr, swe, swk, swn, s_ptr, sse, lds, group, wdt, n = _device_weight(weight, quant)
    ids, tw, n_experts, topk = _routing_args(topk_ids, topk_weights, x, weight, quant)
    m = x.shape[0] // max(1, topk)
    if m > F.MAX_ROWS:
        raise ValueError(f"{m} rows exceed the fused kernel's {F.MAX_ROWS}")
    if m * n > dm.layout.cap_words:
        raise ValueError(f"the fp32 partial of {m}x{n} exceeds the mailbox capacity "
                         f"{dm.capacity_bytes} bytes ({dm.layout.cap_words} packets)")
    if n > _MAX_ROW:
        raise ValueError(f"rows of {n} elements exceed the fused epilogue's {_MAX_ROW}")
    flags = ((F.FLAG_RESIDUAL if residual is not None else 0) | (F.FLAG_GEMMA if gemma else 0)
             | (F.FLAG_INT4 if quant is not None else 0) | (F.FLAG_MOE if topk else 0))
    if handoff not in (None, "direct", "counter"):
        raise ValueError(f"handoff must be 'direct' or 'counter', got {handoff!r}")
    direct = (handoff or _env_handoff()) == "direct"
    if direct:
        interpreted = dm.backend == ll.BACKEND_INTERPRET.value
        parts, chunk, block = epilogue_split(n, direct_split(n, interpreted, epi_split))
        # the parts' sum-of-squares words follow the rows in our own slot; where they do not
        # fit, the counter handoff (the same choice on every rank: same shapes)
        direct = parts == 1 or m * n + 2 * m * parts <= dm.layout.cap_words
    if not direct:
        parts, chunk, block = epilogue_split(n, epi_split)
    flags |= F.FLAG_DIRECT if direct else 0
    h = ((F.OP_LINEAR_ADD_RMS_NORM << 24) | (code << 16) | flags, (m * n) & 0xFFFFFFFF,
         n & 0xFFFFFFFF, _f32_bits(eps))
    t = tiles or gemv_tiles(m, quant is not None, moe="down" if topk else None)
    n_tiles = (n + t.bn - 1) // t.bn
    # dm._launch: a compile-only mailbox (DeviceMailbox._compile_only) compiles and launches
    # nothing, so benches can compile every variant before any rank waits on a peer.
    dm._launch(
        F.linear_add_rms_norm_kernel, (n_tiles + m * parts,),
        x, x.stride(0), w_ptr, swk, swn, s_ptr, lds, group,
        residual if residual is not None else out, norm_weight, out,
        residual_out if residual_out is not None else out,
        m, k, n, n_tiles, float(eps), state.ws, parts, chunk,
        dm._table, dm._ctrl, state.aux, dm.rank, *h,
        dm._hop1, dm.layout.slot_words, dm._hop2, dm.layout.hop2_words, dm.limit,
        ids, tw, swe, sse, n_experts,
        XDT=code, WDT=wdt, INT4=quant is not None, BM=t.bm, BN=t.bn, BK=t.bk,
        USE_DOT=t.use_dot, STAGES=t.stages,
        NATIVE=_native_dot(x, wdt, quant is not None), TOPK=topk,
        SLOTS=_next_pow2(max(1, topk)),
        BLOCK_TILES=max(2, _next_pow2(n_tiles)), EPI_BLOCK=block,
        WORLD=dm.world_size, HAS_RES=residual is not None,
        HAS_RES_OUT=residual_out is not None, GEMMA=bool(gemma), BACKEND=dm.backend,
        DIRECT=direct, SPANS=direct and block >= 32 * t.num_warps, EPI_PARTS=parts,
        num_warps=t.num_warps,
    )
    return out, residual_out


def device_qk_kernel_fits(dm, m: int, n: int, bn: int = 16) -> bool:
    """Whether the fused QKV + Q/K-norm kernel takes M rows of N columns in ``bn``-column
    tiles (16: the narrowest default) on ``dm``: at most MAX_ROWS rows, two payload words per
    row in the mailbox, two fp32 sums of squares per row and tile in the scratch."""
    n_tiles = (n + bn - 1) // bn
    return m <= _MAX_ROWS and 2 * m <= dm.layout.cap_words and m * n_tiles <= dm.layout.cap_words


def device_linear_qk_rms_norm(dm, x, weight, quant, q_weight, k_weight, eps, *, q_cols, k_cols,
                              out, tiles=None, epi_split=None):
    """The fused QKV + Q/K-norm kernel (``linear_qk_rms_norm_kernel``) on a
    :class:`ccl.device_mailbox.DeviceMailbox` (also the interpreter's "cpu" mailbox): ``x``
    ``[M, K]`` with unit stride in K, ``out`` ``[M, N]`` contiguous; ``epi_split``: epilogue
    programs per row over the q and k columns (:func:`epilogue_split`). Collective,
    asynchronous (``dm.raise_if_failed()``)."""
    from ccl.kernels import triton_fused_linear as F

    state = _DEVICE_STATES.get(dm)
    if state is None:
        state = _DEVICE_STATES[dm] = _DeviceState(dm)
    code = _DTYPE_CODES[x.dtype]
    m, k = x.shape
    w_ptr, _, swk, swn, s_ptr, _, lds, group, wdt, n = _device_weight(weight, quant)
    t = tiles or gemv_tiles(m, quant is not None)
    n_tiles = (n + t.bn - 1) // t.bn
    if not device_qk_kernel_fits(dm, m, n, t.bn):
        raise ValueError(f"{m} rows x {n_tiles} tiles exceed the fused QKV kernel's limits")
    if q_cols >= 1 << 16 or k_cols >= 1 << 16:
        raise ValueError("q_cols and k_cols must be below 65536")
    h = ((F.OP_LINEAR_QK_RMS_NORM << 24) | (code << 16) | (F.FLAG_INT4 if quant is not None else 0),
         (m * n) & 0xFFFFFFFF, (q_cols << 16) | k_cols, _f32_bits(eps))
    parts, chunk, block = epilogue_split(q_cols + k_cols, epi_split)
    dm._launch(
        F.linear_qk_rms_norm_kernel, (n_tiles + m * parts,),
        x, x.stride(0), w_ptr, swk, swn, s_ptr, lds, group, out, q_weight, k_weight,
        m, k, n, q_cols, k_cols, n_tiles, float(eps), state.ws, parts, chunk,
        dm._table, dm._ctrl, state.aux, dm.rank, *h,
        dm._hop1, dm.layout.slot_words, dm._hop2, dm.layout.hop2_words, dm.limit,
        XDT=code, WDT=wdt, INT4=quant is not None, BM=t.bm, BN=t.bn, BK=t.bk,
        USE_DOT=t.use_dot, STAGES=t.stages,
        NATIVE=_native_dot(x, wdt, quant is not None),
        BLOCK_TILES=max(2, _next_pow2(n_tiles)), EPI_BLOCK=block,
        WORLD=dm.world_size, BACKEND=dm.backend, num_warps=t.num_warps,
    )
    return out
