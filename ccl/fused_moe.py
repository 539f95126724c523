"""MoE output fused with the TP all-reduce, residual-add and RMSNorm (DESIGN.md §4, "MoE").

Tensor-parallel MoE: every rank holds a shard of each expert's intermediate dimension, so
the expert output of a rank is a partial sum over the full hidden size, which is all-reduced
and followed by the next residual-add + RMSNorm. Here the expert kernel writes its partial
and the mailbox all-reduce + norm consume it without an extra pass:

* CPU: a stand-in expert kernel (``csrc/host/gemv.cpp`` ``moe_f32``: top-k routed SiLU-gated
  experts, dense or INT4 GPTQ weights) accumulates the weighted expert outputs straight into
  an fp32 partial, which goes through the host mailbox and the fused epilogue (one native
  call when ``_C.gemv`` is registered).
* CUDA / XPU with :class:`ExpertWeights`: Triton stand-in kernels (``ccl.kernels.
  triton_fused_linear``): a gate/up kernel writes the SiLU-gated intermediate in x's dtype
  (as vLLM's fused MoE does), then the routed down projection runs inside the fused
  all-reduce + add + norm kernel, so the partial never goes through memory. CI runs them under
  the Triton interpreter; measured on 2x H200 (bench/decode_step.py).
* CUDA / XPU with :class:`VllmExperts`: the framework's expert kernel (vLLM's
  ``fused_experts`` on CUDA, vllm-xpu-kernels' ``XpuFusedMoe`` on XPU) produces the partial;
  ``Communicator.all_reduce_add_rms_norm`` (one device kernel) finishes. Untested here (no
  vLLM on the GPU machine, no Intel GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from ccl.comm import Communicator, NormStyle
from ccl.errors import CclError
from ccl.fused_linear import (
    _DTYPE_CODES,
    _KIND_DENSE_KN,
    Int4Weights,
    _code,
    _launch_now,
    _native,
    _outputs,
    _rows,
)

__all__ = ["ExpertWeights", "VllmExperts", "moe_all_reduce_add_rms_norm", "moe_partial",
           "route_topk"]


@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """ExpertWeights(w13, w2)

    One rank's shard of a stack of E SiLU-gated experts (TP: each rank holds ``I`` of the
    intermediate features of every expert), in the [K, N] ("input-major") layout of the GEMV:

    * ``w13``: gate and up projections, ``[E, H, 2I]`` (gate columns ``[:I]``, up ``[I:]``),
      dense fp32 / bf16 / fp16, or :class:`Int4Weights` with qweight ``[E, H/8, 2I]``.
    * ``w2``: down projection, ``[E, I, H]``, dense or :class:`Int4Weights` ``[E, I/8, H]``.

    (vLLM stores ``w13`` as ``[E, 2I, H]`` and ``w2`` as ``[E, H, I]``: transpose the last two
    dims once at load time; GPTQ-MoE checkpoints already come K-packed like this.)
    """

    w13: torch.Tensor | Int4Weights
    w2: torch.Tensor | Int4Weights

    def __post_init__(self):
        e13, h, i2 = _dims(self.w13, "w13")
        e2, i, h2 = _dims(self.w2, "w2")
        if e13 != e2 or i2 != 2 * i or h2 != h:
            raise ValueError(f"w13 [E={e13}, H={h}, 2I={i2}] and w2 [E={e2}, I={i}, H={h2}] "
                             "do not describe the same experts")

    @property
    def num_experts(self) -> int:
        return _dims(self.w13, "w13")[0]

    @property
    def hidden(self) -> int:
        return _dims(self.w13, "w13")[1]

    @property
    def intermediate(self) -> int:
        return _dims(self.w2, "w2")[1]

    @functools.cached_property
    def _descs(self) -> tuple[tuple, tuple]:
        return _desc3(self.w13), _desc3(self.w2)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) as fp32 ``[E, K, N]`` tensors (reference math)."""
        return tuple(w.dequantize() if isinstance(w, Int4Weights) else w.float()
                     for w in (self.w13, self.w2))


def _dims(w, name):
    if isinstance(w, Int4Weights):
        if w.num_experts is None:
            raise ValueError(f"{name}: Int4Weights need a leading expert dim [E, K/8, N]")
        return w.num_experts, w.K, w.N
    _code(w, name)
    if w.dim() != 3 or not w.is_contiguous():
        raise ValueError(f"{name} must be a contiguous [E, K, N] tensor, got {tuple(w.shape)}")
    return tuple(w.shape)


def _desc3(w) -> tuple:
    if isinstance(w, Int4Weights):
        return w._desc
    e, k, n = w.shape
    return (_KIND_DENSE_KN, _DTYPE_CODES[w.dtype], w.data_ptr(), n, 0, 0, 0, k, n, k * n, 0)


def route_topk(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids int64 [M, k], topk_weights fp32 [M, k]): softmax over experts, top-k,
    renormalised (vLLM ``fused_topk``). Deterministic, so every rank routes alike. On a GPU
    one Triton launch (``ccl.kernels.triton_route``; equal probabilities go to the lower
    expert index, and Triton's ``exp`` may differ from torch's in the last bits), else
    torch."""
    if _route_on_device(router_logits, top_k):
        return _route_topk_device(router_logits, top_k, renormalize)
    p = torch.softmax(router_logits.float(), dim=-1)
    w, ids = torch.topk(p, top_k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return ids.to(torch.int64), w.contiguous()


_ROUTE_MAX_EXPERTS = 4096  # one block per token row


def _route_on_device(logits: torch.Tensor, top_k: int) -> bool:
    if logits.device.type == "cpu" or logits.dim() != 2 or logits.stride(-1) != 1:
        return False
    if not 0 < top_k <= logits.shape[1] <= _ROUTE_MAX_EXPERTS:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _route_topk_device(logits, top_k, renormalize, *, launch=None):
    from ccl.kernels.triton_route import route_topk_kernel

    m, e = logits.shape
    ids = torch.empty(m, top_k, dtype=torch.int64, device=logits.device)
    w = torch.empty(m, top_k, dtype=torch.float32, device=logits.device)
    if m:
        be = max(16, 1 << (e - 1).bit_length())
        kp = max(2, 1 << (top_k - 1).bit_length())
        (launch or _launch_now)(route_topk_kernel, (m,), logits, logits.stride(0), ids, w, e,
                                TOPK=top_k, KP=kp, BE=be, RENORM=bool(renormalize),
                                num_warps=max(1, min(8, be // 256)))
    return ids, w


@functools.lru_cache(maxsize=1)
def _env_fused_down() -> bool:
    """CCL_MOE_FUSED_DOWN, read once (as the fused linear's CCL_FUSED_EPILOGUE_SPLIT): not on
    every MoE layer's call."""
    return os.environ.get("CCL_MOE_FUSED_DOWN", "0") != "0"


def _check_routing(ids, tw, m, num_experts):
    if ids.dtype != torch.int64 or tw.dtype != torch.float32:
        raise TypeError(f"topk_ids must be int64 and topk_weights fp32, got {ids.dtype} and "
                        f"{tw.dtype}")
    if ids.dim() != 2 or ids.shape[0] != m or tw.shape != ids.shape:
        raise ValueError(f"topk_ids / topk_weights must be [M={m}, k], got {tuple(ids.shape)} "
                         f"and {tuple(tw.shape)}")
    if not (ids.is_contiguous() and tw.is_contiguous()):
        raise ValueError("topk_ids and topk_weights must be contiguous")


def moe_partial(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                experts: ExpertWeights, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """moe_partial(x, topk_ids, topk_weights, experts, *, out=None) -> [M, H]

    This rank's MoE partial (stand-in kernels: C++ on the CPU, Triton on devices; not a
    collective)::

        out[m] = sum_j topk_weights[m, j] * (silu(x[m] @ G_e) * (x[m] @ U_e)) @ D_e,
                 e = topk_ids[m, j]

    with ``G_e, U_e = w13[e][:, :I], w13[e][:, I:]`` and ``D_e = w2[e]``; fp32 math. The
    intermediate is not rounded on the CPU, and rounded to x's dtype on devices (as vLLM's
    fused MoE). Ids outside [0, E) are skipped (expert-parallel sentinel). ``out``: fp32
    (the default), or x's dtype to get the partial rounded once for a 16-bit all-reduce
    (on devices the kernel stores it so: no separate cast)."""
    _code(x, "x")
    x2 = _rows(x)
    m, h = x2.shape
    if h != experts.hidden:
        raise ValueError(f"x has {h} features but the experts take H={experts.hidden}")
    _check_routing(topk_ids, topk_weights, m, experts.num_experts)
    if out is not None and (out.dtype not in (torch.float32, x.dtype) or out.numel() != m * h
                            or not out.is_contiguous() or out.device != x.device):
        raise ValueError(f"out must be a contiguous tensor of {m}x{h} fp32 or x's dtype "
                         f"({x.dtype}) on {x.device}, got {tuple(out.shape)} {out.dtype} on "
                         f"{out.device}")
    if not x.is_cpu:
        return _device_partial(x2, topk_ids, topk_weights, experts, out)
    res = out if out is not None and out.dtype == torch.float32 else \
        torch.empty((m, h), dtype=torch.float32)
    w13, w2 = experts._descs
    st = _native().moe_f32(_DTYPE_CODES[x.dtype], x2.data_ptr(), x2.stride(0), m,
                           topk_ids.data_ptr(), topk_weights.data_ptr(), topk_ids.shape[1],
                           experts.num_experts, w13, w2, res.data_ptr())
    if st:
        raise CclError(f"MoE kernel rejected its arguments (status {st})")
    if out is not None and out is not res:
        out.copy_(res)
        return out
    return res


def moe_all_reduce_add_rms_norm(
    comm: Communicator,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts: ExpertWeights | VllmExperts,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    norm_style: NormStyle = NormStyle.STANDARD,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    fused_down: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_all_reduce_add_rms_norm(comm, x, topk_ids, topk_weights, experts, residual,
    norm_weight, eps=1e-6, *, norm_style=STANDARD, out=None, residual_out=None,
    fused_down=None) -> (out, residual_out)

    TP MoE layer output + all-reduce + residual-add + RMSNorm. This is a collective
    operation: ``residual_out = sum_r moe_partial_r(x) + residual`` (rank order, fp32 on the
    CPU path), ``out = residual_out * rsqrt(mean(residual_out², -1) + eps) * w``, stored in
    x's dtype. ``x`` ``[M, H]`` is identical on every rank (the normed hidden state);
    ``topk_ids`` (int64) / ``topk_weights`` (fp32) ``[M, k]`` must be identical on every rank
    (``route_topk`` of the replicated router logits is).

    On a GPU, ``fused_down`` picks one kernel for the routed down projection + all-reduce +
    add + norm (True) or the expert partial through memory and then the fused all-reduce +
    norm (False). None: ``CCL_MOE_FUSED_DOWN``, read once (default 0: on 2x H200 the two-kernel form
    measured 0.5 ms per decode step faster at the MiniMax-M2 shape, session 5).
    """
    gemma = NormStyle(norm_style) is NormStyle.GEMMA
    if isinstance(experts, VllmExperts):
        partial = experts(x, topk_ids, topk_weights)
        return comm.all_reduce_add_rms_norm(partial, residual, norm_weight, eps,
                                            norm_style=norm_style, out=out,
                                            residual_out=residual_out)
    code = _code(x, "x")
    x2 = _rows(x)
    m, h = x2.shape
    if h != experts.hidden:
        raise ValueError(f"x has {h} features but the experts take H={experts.hidden}")
    _check_routing(topk_ids, topk_weights, m, experts.num_experts)
    out, residual_out = _outputs(x2, h, tuple(x.shape), residual, norm_weight, out, residual_out)
    if not x.is_cpu:
        if fused_down is None:
            fused_down = _env_fused_down()
        _device_moe_add_rms_norm(comm, x2, topk_ids, topk_weights, experts, residual,
                                 norm_weight, float(eps), gemma, out, residual_out,
                                 fused_down)
        return out, residual_out
    mailbox = comm._live()
    if mailbox is None:
        raise ValueError(f"x is on the CPU but this communicator runs on {comm.device}")
    if m == 0:
        return out, residual_out
    native = _native()
    w13, w2 = experts._descs
    nbytes = 4 * m * h
    rp = residual.data_ptr() if residual is not None else 0
    args = (topk_ids.data_ptr(), topk_weights.data_ptr(), topk_ids.shape[1],
            experts.num_experts, w13, w2)
    if native.fused and nbytes <= comm.max_bytes:
        st = native.moe_add_rms_norm(
            mailbox, code, x2.data_ptr(), x2.stride(0), m, *args, rp, norm_weight.data_ptr(),
            out.data_ptr(), residual_out.data_ptr(), float(eps), gemma,
            comm._algorithm(nbytes, None))
        if st:
            comm._raise(st)
        return out, residual_out
    partial = torch.empty((m, h), dtype=torch.float32)
    st = native.moe_f32(code, x2.data_ptr(), x2.stride(0), m, *args, partial.data_ptr())
    if st:
        raise CclError(f"rank {comm.rank}: MoE kernel rejected its arguments (status {st})")
    comm.all_reduce(partial)
    native.add_rms_norm_f32(code, partial.data_ptr(), rp, norm_weight.data_ptr(),
                            out.data_ptr(), residual_out.data_ptr(), m, h, float(eps), gemma)
    return out, residual_out


# ============================================================================== device path
def _split(w):
    """(dense weight, Int4Weights) of one ExpertWeights member, the other None."""
    return (None, w) if isinstance(w, Int4Weights) else (w, None)


def _device_gate_up(x2, topk_ids, experts):
    from ccl.fused_linear import device_moe_gate_up

    w13, q13 = _split(experts.w13)
    return device_moe_gate_up(x2, topk_ids, w13, quant=q13)


def _device_partial(x2, topk_ids, topk_weights, experts, out):
    """Device MoE partial through the Triton stand-in kernels: gate/up (``h`` in x's dtype,
    as vLLM's fused MoE keeps its intermediate), then the routed down projection (fp32, or
    stored in ``out``'s 16-bit dtype)."""
    from ccl.fused_linear import device_linear_partial

    h = _device_gate_up(x2, topk_ids, experts)
    w2, q2 = _split(experts.w2)
    flat = None if out is None else out.view(x2.shape[0], -1)
    res = device_linear_partial(h, w2, quant=q2, out=flat, topk_ids=topk_ids,
                                topk_weights=topk_weights)
    return res if out is None else out


def _device_moe_add_rms_norm(comm, x2, topk_ids, topk_weights, experts, residual, norm_weight,
                             eps, gemma, out, residual_out, fused_down=True):
    """gate/up kernel, then (``fused_down``) ONE kernel for the routed down projection +
    all-reduce + add + RMSNorm: the partial goes from the expert GEMV's registers into the
    mailbox, never through global memory as a tensor; or the partial kernel, then the fused
    all-reduce + add + RMSNorm."""
    from ccl.fused_linear import device_kernel_fits, device_linear_add_rms_norm

    m, h = x2.shape
    comm._live()
    dm = comm._device_mailbox
    if not fused_down or dm is None or not device_kernel_fits(dm, m, h):
        partial = _device_partial(x2, topk_ids, topk_weights, experts, None)
        comm.all_reduce_add_rms_norm(partial, residual, norm_weight, eps,
                                     norm_style=NormStyle.GEMMA if gemma else NormStyle.STANDARD,
                                     out=out, residual_out=residual_out)
        return
    hid = _device_gate_up(x2, topk_ids, experts)
    w2, q2 = _split(experts.w2)
    device_linear_add_rms_norm(dm, hid, w2, q2, residual, norm_weight, eps, gemma=gemma,
                               out=out, residual_out=residual_out, topk_ids=topk_ids,
                               topk_weights=topk_weights)


# ============================================================================== GPU experts
class VllmExperts:
    """VllmExperts(w13, w2, *, w13_scales=None, w2_scales=None, group_size=None,
    activation="silu")

    The framework's fused-MoE kernel as the partial producer on GPU hosts, in vLLM's own
    layouts: CUDA / ROCm ``vllm.model_executor.layers.fused_moe.fused_moe.fused_experts``
    (``w13`` ``[E, 2I, H]``, ``w2`` ``[E, H, I]``; INT4 through ``int4_w4a16_moe_quant_config``
    with vLLM's packed layouts), Intel XPU ``vllm_xpu_kernels.fused_moe_interface.XpuFusedMoe``
    (``is_int4`` layouts of its docstring). Construct only after :meth:`availability` says
    yes; **untested here** (this repository's CI has no GPU).
    """

    def __init__(self, w13, w2, *, w13_scales=None, w2_scales=None, group_size=None,
                 activation: str = "silu"):
        ok, reason = self.availability(w13.device)
        if not ok:
            raise CclError(f"VllmExperts unavailable: {reason}")
        self.device = w13.device
        self.w13, self.w2 = w13, w2
        self.w13_scales, self.w2_scales = w13_scales, w2_scales
        self.group_size = group_size
        self.activation = activation
        self._xpu_impl = None

    @staticmethod
    def availability(device) -> tuple[bool, str]:
        """(ok, reason): vLLM's fused MoE for ``device`` can be imported and run."""
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return False, "torch.cuda is not available"
            try:
                from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts  # noqa: F401
            except Exception as e:  # noqa: BLE001 - reported
                return False, f"cannot import vllm fused_experts: {e}"
            return True, "vllm fused_experts (Triton)"
        if device.type == "xpu":
            if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
                return False, "torch.xpu is not available"
            try:
                from vllm_xpu_kernels.fused_moe_interface import XpuFusedMoe  # noqa: F401
            except Exception as e:  # noqa: BLE001
                return False, f"cannot import vllm_xpu_kernels XpuFusedMoe: {e}"
            return True, "vllm-xpu-kernels XpuFusedMoe"
        return False, f"no framework fused MoE for device type {device.type!r} (use ExpertWeights on CPU)"

    def __call__(self, x, topk_ids, topk_weights) -> torch.Tensor:
        """The rank's partial ``[M, H]`` in x's dtype (the framework kernel's output)."""
        if self.device.type == "cuda":
            from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

            quant = None
            if self.w13_scales is not None:
                from vllm.model_executor.layers.fused_moe.config import (
                    int4_w4a16_moe_quant_config,
                )

                quant = int4_w4a16_moe_quant_config(
                    w1_scale=self.w13_scales, w2_scale=self.w2_scales,
                    block_shape=[0, self.group_size])
            return fused_experts(x, self.w13, self.w2, topk_weights, topk_ids,
                                 quant_config=quant)
        if self._xpu_impl is None:
            from vllm_xpu_kernels.fused_moe_interface import XpuFusedMoe

            self._xpu_impl = XpuFusedMoe(
                w13=self.w13, w13_scales=self.w13_scales, w13_bias=None, w2=self.w2,
                w2_scales=self.w2_scales, w2_bias=None, n_experts_per_token=topk_ids.shape[-1],
                activation=self.activation, num_experts=self.w13.shape[0], ep_rank=0,
                ep_size=1, expert_map=None)
        out = torch.empty_like(x)
        self._xpu_impl.apply(output=out, hidden_states=x, topk_weights=topk_weights,
                             topk_ids=topk_ids, a1q_scale=None)
        return out
