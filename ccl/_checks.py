"""Input checks shared by the host Communicator and the DeviceMailbox: one wording for every
rejected tensor, raised before anything is communicated."""

from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _dtype_code(t, name: str) -> int:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")
    return code


def _check_device(t: torch.Tensor, name: str, device: torch.device, where: str) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}; {where}")


def check_tensor(t, name: str, device: torch.device, where: str) -> int:
    """A contiguous float32/bfloat16/float16 tensor on ``device``; returns its dtype code."""
    code = _dtype_code(t, name)
    _check_device(t, name, device, where)
    if not t.is_contiguous():
        raise ValueError(
            f"{name} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
            "pass tensor.contiguous()"
        )
    return code


def check_rows(t, name: str, device: torch.device, where: str) -> int:
    """A 2-D [tokens, dim] tensor with unit stride in dim (rows may be strided)."""
    code = _dtype_code(t, name)
    _check_device(t, name, device, where)
    if t.dim() != 2 or t.stride(1) != 1 or t.shape[1] == 0:
        raise ValueError(
            f"{name} must be 2-D [tokens, dim] with unit stride in dim, got shape "
            f"{tuple(t.shape)} stride {t.stride()}"
        )
    return code


def check_like(t, ref: torch.Tensor, name: str, shape, device: torch.device, where: str) -> None:
    """``t`` is a valid tensor of ``ref``'s dtype and the given shape."""
    check_tensor(t, name, device, where)
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the input is {ref.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_qk(q, k, q_weight, k_weight, device: torch.device, where: str) -> int:
    """Inputs of qk_rms_norm: 2-D q and k of one dtype and token count, weights matching their
    last dimensions. Returns the dtype code."""
    code = check_rows(q, "q", device, where)
    if check_rows(k, "k", device, where) != code:
        raise TypeError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(
            f"q and k need the same number of tokens, got {q.shape[0]} and {k.shape[0]}"
        )
    check_like(q_weight, q, "q_weight", (q.shape[1],), device, where)
    check_like(k_weight, k, "k_weight", (k.shape[1],), device, where)
    return code
