"""Pure-torch reference semantics of every op (DESIGN.md §4). Tests compare against these;
the wrapped-backend fallback uses them for the epilogue of fused ops."""

from __future__ import annotations

import torch

__all__ = ["all_reduce_reference", "add_rms_norm_reference", "qk_rms_norm_reference"]


def all_reduce_reference(parts: list[torch.Tensor]) -> torch.Tensor:
    """Sum of every rank's tensor, accumulated in fp32 in rank order, stored in their dtype."""
    acc = parts[0].float().clone()
    for p in parts[1:]:
        acc += p.float()
    return acc.to(parts[0].dtype)


def add_rms_norm_reference(
    summed: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    gemma: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, residual_out) from the all-reduced ``summed`` (any float dtype, used in fp32)."""
    r = summed.float()
    if residual is not None:
        r = r + residual.float()
    w = weight.float() + (1.0 if gemma else 0.0)
    inv = torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
    dtype = weight.dtype
    return (r * inv * w).to(dtype), r.to(dtype)


def add_rms_norm_reference_parts(parts, residual, weight, eps, *, gemma=False):
    """Reference of the fused op from every rank's partial ``x`` (fp32 sum, no rounding)."""
    acc = parts[0].float().clone()
    for p in parts[1:]:
        acc += p.float()
    return add_rms_norm_reference(acc, residual, weight, eps, gemma=gemma)


def qk_rms_norm_reference(
    q_parts: list[torch.Tensor],
    k_parts: list[torch.Tensor],
    q_weights: list[torch.Tensor],
    k_weights: list[torch.Tensor],
    eps: float,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per rank (q_out, k_out): RMSNorm over the concatenation of every rank's shard."""
    q_full = torch.cat([q.float() for q in q_parts], dim=-1)
    k_full = torch.cat([k.float() for k in k_parts], dim=-1)
    iq = torch.rsqrt(q_full.pow(2).mean(-1, keepdim=True) + eps)
    ik = torch.rsqrt(k_full.pow(2).mean(-1, keepdim=True) + eps)
    dtype = q_parts[0].dtype
    return [
        ((q.float() * iq * qw.float()).to(dtype), (k.float() * ik * kw.float()).to(dtype))
        for q, k, qw, kw in zip(q_parts, k_parts, q_weights, k_weights)
    ]
