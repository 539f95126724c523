"""Device mailboxes: the state one rank keeps on its GPU (or XPU) and the launches of the Triton
mailbox kernels (``ccl.kernels.triton_mailbox``).

A :class:`DeviceMailbox` knows every rank's region as mapped on this device (a pointer table
of base addresses, from whichever transport mapped them: CUDA VMM/IPC, Level Zero IPC, or
host shared memory for the interpreter) and owns a small control tensor (sequence number,
done counter, status words). It does not allocate or map regions itself.

Ops are asynchronous: they enqueue one kernel on the current stream and return. Errors
(a peer that never delivered, a peer that called a different op) are recorded by the kernel
in device memory; :meth:`DeviceMailbox.check` / :meth:`DeviceMailbox.raise_if_failed` read
them (a device synchronisation). Kernels never hang: every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct

import torch

from ccl import _checks
from ccl.errors import CclError, CollectiveMismatch, CollectiveTimeout, ConfigError
from ccl.kernels import ll
from ccl.kernels import triton_mailbox as K

logger = logging.getLogger(__name__)

__all__ = ["DeviceMailbox", "DeviceStatus", "DeviceLayout"]

_CONTROL_BYTES = 4096
_PHASES = 2
_MAX_WORLD = 64
_DTYPE_CODES = _checks.DTYPE_CODES
_CODE_NAMES = {0: "float32", 1: "bfloat16", 2: "float16"}
_OP_ALL_REDUCE, _OP_ADD_RMS_NORM, _OP_QK_RMS_NORM, _OP_HANDSHAKE = 1, 2, 3, 4
_OP_NAMES = {1: "all_reduce", 2: "all_reduce_add_rms_norm", 3: "qk_rms_norm", 4: "handshake",
             5: "linear_all_reduce_add_rms_norm", 6: "moe_all_reduce_add_rms_norm"}
_FLAG_RESIDUAL, _FLAG_GEMMA, _FLAG_TWO_SHOT, _FLAG_HANDSHAKE = 0x01, 0x02, 0x40, 0x80
_FLAG_ROWWIDE = 0x04  # fused norm: every program reduces the whole row (other bits than split)
_ROWWIDE_MAX_SPLIT = 8  # row-wide norm: at most this many programs read each row
_MAX_ROW_WORDS = 16384  # fused norm: one program holds a whole row in registers
# Fused norm with rows split over several programs (CUDA): those programs wait on each other,
# so the launch must be co-resident; 128 programs stay far below one per SM of any GPU this
# targets (an H100/H200 has 132 SMs, and these small programs fit several per SM).
_MAX_SPLIT_PROGRAMS = 128
_MAX_AR_PROGRAMS = 1024
_SPLIT_SHIFT = 8  # header word 0, bits 8..15: log2 of the programs per row

# Control-tensor word indices (host side: plain ints).
_CTRL_SEQ = K.CTRL_SEQ.value
_CTRL_STATUS = K.CTRL_STATUS.value
_CTRL_MISSING = K.CTRL_MISSING.value
_CTRL_MISMATCH = K.CTRL_MISMATCH.value
_CTRL_HEADERS = K.CTRL_HEADERS.value
_CTRL_WHERE = K.CTRL_WHERE.value
_CTRL_FAIL_SEQ = K.CTRL_FAIL_SEQ.value

# Rough wall time of one poll of the inbox, used to turn a timeout in seconds into a poll
# count (Intel GPUs have no device timer). cuda: 2x H200, 12M polls took ~3 s (bench run 1;
# bench/gpu_validate.py's timeout step measures it); xpu: a guess; cpu: the interpreter.
# CCL_SPIN_NS overrides.
_SPIN_NS = {"cuda": 250.0, "xpu": 500.0, "cpu": 1_000_000.0}


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


@dataclasses.dataclass(frozen=True)
class DeviceLayout:
    """Offsets of one rank's device region.

    The wire format is the CPU one (csrc/common/ll_packet.h, csrc/host/layout.h): LL8
    packets, hop-1 slots ``[phase][src]`` with a 4-word header, hop-2 slots ``[phase][src]``
    of fp32 reduced shards for two-shot, 2 phases. Every payload travels as LL packets (the
    host transport's bulk protocol above 1 KB is not used on devices), and the layout is
    tuned for coalescing: the header has its own 128-byte line and every slot and payload
    starts 128-byte aligned (``PAYLOAD_OFFSET`` = 16 words into a slot)::

        [0, 4096)                              unused (the host layout's control block)
        hop1 [2][world][slot_words]            header (words 0..3), payload from word 16
        hop2 [2][world][hop2_words]            fp32 sums, one per packet
    """

    world: int
    capacity_bytes: int
    cap_words: int  # payload packets one rank may push in one call
    slot_words: int
    shard_words_max: int
    hop2_words: int
    hop1_offset: int  # bytes
    hop2_offset: int  # bytes
    region_bytes: int

    @classmethod
    def make(cls, world: int, capacity_bytes: int) -> DeviceLayout:
        cap_words = _round_up((capacity_bytes + 3) // 4, 8)
        slot_words = _round_up(K.PAYLOAD_OFFSET.value + cap_words, 16)
        shard_words_max = _round_up((cap_words + world - 1) // world, 8)
        hop2_words = _round_up(2 * shard_words_max, 16)  # 16-bit payloads: 2 sums per word
        hop1_offset = _CONTROL_BYTES
        hop2_offset = hop1_offset + 8 * _PHASES * world * slot_words
        region_bytes = _round_up(hop2_offset + 8 * _PHASES * world * hop2_words, 4096)
        return cls(
            world,
            capacity_bytes,
            cap_words,
            slot_words,
            shard_words_max,
            hop2_words,
            hop1_offset,
            hop2_offset,
            region_bytes,
        )


@dataclasses.dataclass(frozen=True)
class DeviceStatus:
    """What the kernels recorded since the last check. ``code``: 0 ok, 1 timeout, 2 mismatch.
    ``headers[r]``: the 4 header words rank r sent, for mismatching ranks (and our own)."""

    code: int
    seq: int
    missing_ranks: tuple[int, ...] = ()
    mismatch_ranks: tuple[int, ...] = ()
    headers: dict = dataclasses.field(default_factory=dict)
    #: which waits expired: "hop1" (payload or header), "hop2" (two-shot reduced shards)
    expired: tuple[str, ...] = ()
    #: sequence number of the (last) call that failed
    failed_seq: int = 0

    @property
    def ok(self) -> bool:
        return self.code == K.STATUS_OK


def _bits(mask: int) -> tuple[int, ...]:
    mask &= (1 << 64) - 1
    return tuple(r for r in range(64) if mask >> r & 1)


def _describe(h) -> str:
    op, dt, flags = h[0] >> 24 & 0xFF, h[0] >> 16 & 0xFF, h[0] & 0xFF
    split = 1 << (h[0] >> _SPLIT_SHIFT & 0xFF)
    eps = struct.unpack("<f", struct.pack("<I", h[3] & 0xFFFFFFFF))[0]
    s = f"{_OP_NAMES.get(op, op)}({_CODE_NAMES.get(dt, dt)}, numel={h[1]}"
    if h[2]:
        s += f", cols={h[2]}"
    if op in (_OP_ADD_RMS_NORM, _OP_QK_RMS_NORM):
        s += f", eps={eps:g}"
    if flags & _FLAG_TWO_SHOT and op < 5:
        s += ", two_shot"
    if flags & 0x08 and op in (5, 6):  # triton_fused_linear.FLAG_DIRECT
        s += ", direct handoff"
    if split > 1:
        s += f", {split} programs per row"
    if flags & _FLAG_ROWWIDE and op == _OP_ADD_RMS_NORM:
        s += ", row-wide"
    return s + ")"


def _sync(device: torch.device) -> None:
    mod = getattr(torch, device.type, None)
    if mod is not None and hasattr(mod, "synchronize") and device.type != "cpu":
        mod.synchronize(device)


class DeviceMailbox:
    """DeviceMailbox(rank, world_size, bases, capacity_bytes, device, *, timeout=120.0,
    spin_ns=None, backend=None)

    Device mailbox collectives of one rank. ``bases[r]`` is the address of rank r's region
    (``DeviceLayout.make(world_size, capacity_bytes).region_bytes`` bytes, cleared with
    :meth:`init_region` before its handle left the owner) as mapped on ``device`` in this
    process. ``device`` is a CUDA/ROCm or XPU device, or "cpu" under the Triton interpreter
    (TRITON_INTERPRET=1 set before ``ccl.kernels.triton_mailbox`` is imported) with host
    shared-memory regions. ``timeout`` bounds every wait in seconds (converted to a poll
    count with ``spin_ns`` nanoseconds per poll; see :attr:`limit`). ``backend`` forces an
    LL publish variant ("cuda", "cuda_fenced", "cuda_xchg", "xpu", "xpu_atomic", "interpret").

    Construction is local (no communication). Every rank must run the same sequence of ops
    with the same shapes, dtypes and algorithms, on one stream per communicator.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        bases: list[int],
        capacity_bytes: int,
        device,
        *,
        timeout: float = 120.0,
        spin_ns: float | None = None,
        backend: str | None = None,
    ):
        if not 1 <= world_size <= _MAX_WORLD:
            raise ConfigError(f"world size {world_size} is outside 1..{_MAX_WORLD}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if len(bases) != world_size or any(not b for b in bases):
            raise ValueError(f"need {world_size} non-zero region bases, got {list(bases)}")
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.device = torch.device(device)
        if self.device.type == "cpu" and not _interpreting():
            raise ConfigError(
                "DeviceMailbox on 'cpu' runs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before ccl.kernels.triton_mailbox is imported (or use the host Communicator)"
            )
        # CCL_LL_VARIANT (cuda, cuda_fenced, cuda_xchg, xpu, xpu_atomic) picks the publish /
        # poll variant of ccl.kernels.ll when the caller does not.
        variant = backend or os.environ.get("CCL_LL_VARIANT") or None
        self.backend = ll.backend_for(self.device.type, variant)
        self.rank = rank
        self.world_size = world_size
        self.layout = DeviceLayout.make(world_size, capacity_bytes)
        self.capacity_bytes = capacity_bytes
        self._table = torch.tensor([int(b) for b in bases], dtype=torch.int64, device=self.device)
        self._ctrl = torch.zeros(K.CTRL_WORDS, dtype=torch.int64, device=self.device)
        self._dummy = torch.zeros(1, dtype=torch.float32, device=self.device)
        # Row scratch of the split fused norm (2 words per program; zero between launches).
        self._rows = torch.zeros(2 * _MAX_SPLIT_PROGRAMS, dtype=torch.int64, device=self.device)
        self._hop1 = self.layout.hop1_offset // 8
        self._hop2 = self.layout.hop2_offset // 8
        env_spin = os.environ.get("CCL_SPIN_NS")
        self.spin_ns = float(
            spin_ns or (env_spin and float(env_spin)) or _SPIN_NS.get(self.device.type, 500.0)
        )
        #: payload words per program of an all-reduce launch of several programs
        #: (CCL_DEVICE_MAX_BLOCK; see _ar_shape)
        self.max_block = int(os.environ.get("CCL_DEVICE_MAX_BLOCK", "64"))
        #: largest all-reduce payload (words) done by one program (CCL_DEVICE_SINGLE_MAX)
        self.single_max = int(os.environ.get("CCL_DEVICE_SINGLE_MAX", "256"))
        #: most programs of one all-reduce launch (CCL_DEVICE_MAX_PROGRAMS). Session 2 capped
        #: launches at 128 programs after wrong blocks in 512-1024-program launches; those were
        #: the per-warp spin exits fixed in session 4, and session 5 validated 1024-program
        #: launches of single-warp programs (docs/TRITON.md).
        self.max_programs = int(os.environ.get("CCL_DEVICE_MAX_PROGRAMS", str(_MAX_AR_PROGRAMS)))
        #: warps per all-reduce program (0: one per 64 payload words, 1..8); a bench knob,
        #: CCL_DEVICE_AR_WARPS
        self.ar_warps = int(os.environ.get("CCL_DEVICE_AR_WARPS", "0"))
        #: polls with one cross-warp reduction instead of two (``_poll_code`` SPANS) wherever
        #: the block covers every warp; CCL_DEVICE_FAST_POLL=0 turns it off
        self.fast_poll = os.environ.get("CCL_DEVICE_FAST_POLL", "1") != "0"
        #: nanoseconds between our publishes and the first poll (CUDA), all-reduce and fused
        #: norm (CCL_DEVICE_POLL_DELAY_NS, CCL_DEVICE_NORM_POLL_DELAY_NS). 2x H200, session 5:
        #: 300 ns took 0.12-0.15 us off the fused norm (polls that cannot succeed yet seem to
        #: slow the arriving writes) and gained nothing reliable on the all-reduce.
        self.poll_delay_ns = int(os.environ.get("CCL_DEVICE_POLL_DELAY_NS", "0"))
        self.norm_poll_delay_ns = int(os.environ.get("CCL_DEVICE_NORM_POLL_DELAY_NS", "300"))
        #: fused norm: payload words per program when a row is split over programs (CUDA;
        #: CCL_DEVICE_NORM_CHUNK, 0 keeps one program per row). 256: 8x7168 bf16 5.7 vs 9.4 us
        #: on 2x H200. (Its session-2 hangs were the per-warp spin exits, docs/TRITON.md.)
        self.norm_chunk = int(os.environ.get("CCL_DEVICE_NORM_CHUNK", "256"))
        #: fused norm: warps per program (0: chosen from the block; a bench knob)
        self.norm_warps = int(os.environ.get("CCL_DEVICE_NORM_WARPS", "0"))
        #: fused norm with split rows: every program reads and reduces the whole row and
        #: writes its chunk (no sum-of-squares exchange after the peers' words arrive);
        #: CCL_DEVICE_NORM_ROWWIDE=1, opt-in until measured on two GPUs (session 7)
        self.norm_rowwide = os.environ.get("CCL_DEVICE_NORM_ROWWIDE", "0") == "1"
        # Test/bench hook: ops compile their kernel variant (Triton cache) and launch nothing.
        self._compile_only = False
        #: Two-shot on CUDA: its session-1/2 wrong 16-bit results were the per-warp spin exits
        #: (docs/TRITON.md, session 4; 100k graph-replayed one- and two-shot ops since, 0
        #: mismatches). CCL_DEVICE_TWO_SHOT=0 turns it off (requests then run one-shot: the
        #: same result by definition, decided identically on every rank).
        self.two_shot_enabled = os.environ.get("CCL_DEVICE_TWO_SHOT", "1") != "0"
        if not self.two_shot_enabled:
            logger.info(
                "ccl: device two-shot disabled (CCL_DEVICE_TWO_SHOT=0); two-shot requests run "
                "one-shot."
            )
        self.timeout = 0.0
        self.limit = 0
        self.set_timeout(timeout)

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def region_bytes(world_size: int, capacity_bytes: int) -> int:
        """Bytes of one rank's region (same layout as the host transport)."""
        return DeviceLayout.make(world_size, capacity_bytes).region_bytes

    @staticmethod
    def init_region(base: int, nbytes: int, device) -> None:
        """Clears a freshly allocated region (every word 0, so no stale flag can match the
        first calls). Call it on the owner before the region's handle is exported: a peer
        may push into it as soon as it has mapped it. Synchronises the device."""
        device = torch.device(device)
        table = torch.tensor([int(base)], dtype=torch.int64, device=device)
        n_words = nbytes // 8
        block = 1024
        K.fill_kernel[(_cdiv(n_words, block),)](table, 0, n_words, 0, BLOCK=block)
        _sync(device)

    def set_timeout(self, timeout: float) -> None:
        """Bound of every wait, in seconds (as a poll count: ``timeout / spin_ns``)."""
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.timeout = float(timeout)
        self.limit = max(1, min((1 << 31) - 1, int(timeout * 1e9 / self.spin_ns)))

    def close(self) -> None:
        """Drops the device state. Local, idempotent. The regions belong to the transport."""
        self._table = None
        self._ctrl = None

    @property
    def closed(self) -> bool:
        return self._ctrl is None

    # ------------------------------------------------------------------ status
    @property
    def seq(self) -> int:
        """Sequence number of the last call (synchronises)."""
        return int(self._live()[_CTRL_SEQ].item())

    def set_seq(self, seq: int) -> None:
        """Test hook: the next call runs with ``seq + 1``. Every rank must set the same value
        between calls. Jumping is only safe to a point at most 2^31 calls past the last
        scrub (calls with ``seq % 2^31 < 2``), as in a real run."""
        self._live()[_CTRL_SEQ].fill_(int(seq) & ((1 << 63) - 1))

    def wait_stats(self) -> dict:
        """Diagnostics since the last call, then cleared (synchronises): the most polls one
        hop-1 wait took (``max_spins``; the bound is :attr:`limit`) and how many waits took
        more than ~1 ms (``long_waits``)."""
        ctrl = self._live()
        lo, hi = K.CTRL_MAX_SPINS.value, K.CTRL_LONG_WAITS.value
        v = [int(x) for x in ctrl[lo : hi + 1].cpu().tolist()]
        ctrl[lo : hi + 1].zero_()
        return dict(max_spins=v[0], long_waits=v[1], limit=self.limit)

    def check(self) -> DeviceStatus:
        """Status recorded since the last check, then cleared (synchronises)."""
        ctrl = self._live()
        n = _CTRL_HEADERS + 4 * self.world_size
        v = [int(x) for x in ctrl[:n].cpu().tolist()]
        code = v[_CTRL_STATUS]
        if code == K.STATUS_OK:
            return DeviceStatus(code, v[_CTRL_SEQ])
        mism = _bits(v[_CTRL_MISMATCH])
        headers = {}
        if mism:
            for r in set(mism) | {self.rank}:
                base = _CTRL_HEADERS + 4 * r
                headers[r] = tuple(x & 0xFFFFFFFF for x in v[base : base + 4])
        ctrl[_CTRL_STATUS : _CTRL_MISMATCH + 1].zero_()
        ctrl[_CTRL_WHERE : _CTRL_FAIL_SEQ + 1].zero_()
        where = tuple(
            n for b, n in ((1, "hop1"), (2, "hop2"), (4, "row")) if v[_CTRL_WHERE] & b
        )
        return DeviceStatus(
            code, v[_CTRL_SEQ], _bits(v[_CTRL_MISSING]), mism, headers, where, v[_CTRL_FAIL_SEQ]
        )

    def raise_if_failed(self) -> None:
        """Raises CollectiveTimeout (missing ranks named) or CollectiveMismatch if a kernel
        recorded one since the last check (synchronises). After a timeout the mailbox is
        unusable (ranks disagree on the sequence number): close it."""
        st = self.check()
        if st.ok:
            return
        if st.code == K.STATUS_MISMATCH and st.mismatch_ranks:
            peer = st.mismatch_ranks[0]
            mine = st.headers.get(self.rank)
            raise CollectiveMismatch(
                f"rank {peer} called {_describe(st.headers[peer])} but rank {self.rank} called "
                f"{_describe(mine) if mine else 'something else'} (device collective "
                f"#{st.seq}); every rank must make the same call",
                self.rank,
                peer,
            )
        if st.code == K.STATUS_TIMEOUT:
            missing = list(st.missing_ranks)
            raise CollectiveTimeout(
                f"rank {self.rank}: device collective #{st.seq} timed out after ~"
                f"{self.timeout:.3g}s ({self.limit} polls) waiting for rank(s) {missing}; the "
                "communicator is unusable now (close it and create a new one)",
                missing,
                self.rank,
                self.timeout,
            )
        raise CclError(f"rank {self.rank}: device mailbox status {st.code} ({st})")

    # ------------------------------------------------------------------ ops
    def all_reduce(
        self, x: torch.Tensor, out: torch.Tensor | None = None, *, algorithm: str | int = "one_shot"
    ) -> torch.Tensor:
        """all_reduce(x, out=None, *, algorithm="one_shot") -> out

        ``out = sum_r x_r`` (fp32 accumulation in rank order, stored in x's dtype; bitwise
        identical on every rank and for both algorithms). In place when ``out`` is None or
        ``x``. This is a collective operation (asynchronous)."""
        code = self._check(x, "x")
        if out is None:
            out = x
        elif out is not x:
            self._check(out, "out")
            if out.dtype != x.dtype or out.numel() != x.numel():
                raise ValueError(
                    f"out must be {x.dtype} with {x.numel()} elements, got "
                    f"{out.dtype} with {out.numel()}"
                )
        numel = x.numel()
        if numel == 0:
            return out
        epw = 1 if code == 0 else 2
        n_words = (numel + epw - 1) // epw
        self._check_words(n_words, numel * x.element_size())
        two = self._two_shot(algorithm)
        flags = _FLAG_TWO_SHOT if two else 0
        self._launch_all_reduce(x, out, numel, n_words, code, _OP_ALL_REDUCE, flags, 0, 0.0, two)
        return out

    def handshake(
        self, op: int, dtype_code: int, numel: int, cols: int = 0, eps: float = 0.0
    ) -> None:
        """Header-only exchange (no payload): proves every rank makes the same call, e.g.
        before a call is delegated to another backend. Collective, asynchronous."""
        dummy = self._dummy  # never read or written (no payload words)
        self._launch_all_reduce(
            dummy,
            dummy,
            0,
            0,
            0,
            op,
            _FLAG_HANDSHAKE,
            cols,
            eps,
            False,
            numel_header=numel,
            dtype_header=dtype_code,
        )

    def add_rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float = 1e-6,
        *,
        gemma: bool = False,
        out: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None,
        algorithm: str | int = "one_shot",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """add_rms_norm(x, residual, weight, eps=1e-6, *, gemma=False, out=None,
        residual_out=None, algorithm="one_shot") -> (out, residual_out)

        ``r = sum_r x_r (+ residual)``, ``residual_out = r``, ``out = r * rsqrt(mean(r^2, -1)
        + eps) * w`` with ``w = weight`` (or ``1 + weight`` when ``gemma``); fp32 math,
        stored in x's dtype. Outputs may alias x / residual; ``out`` is allocated when None;
        ``residual_out`` is not written when None. Collective, asynchronous."""
        code = self._check(x, "x")
        if x.dim() < 1 or x.shape[-1] == 0:
            raise ValueError(f"x must have a non-empty last dimension, got {tuple(x.shape)}")
        cols = x.shape[-1]
        rows = x.numel() // cols
        self._check_like(weight, x, "weight", (cols,))
        if residual is not None:
            self._check_like(residual, x, "residual", tuple(x.shape))
        if out is None:
            out = torch.empty_like(x)
        else:
            self._check_like(out, x, "out", tuple(x.shape))
        if residual_out is not None:
            self._check_like(residual_out, x, "residual_out", tuple(x.shape))
        if rows == 0:
            return out, residual_out
        epw = 1 if code == 0 else 2
        wpr = (cols + epw - 1) // epw
        if wpr > _MAX_ROW_WORDS:
            raise ValueError(
                f"rows of {cols} {x.dtype} elements exceed the fused kernel's {_MAX_ROW_WORDS} "
                "payload words per row; use all_reduce and a separate norm"
            )
        n_words = rows * wpr
        self._check_words(n_words, x.numel() * x.element_size())
        two = self._two_shot(algorithm)
        flags = (
            (_FLAG_RESIDUAL if residual is not None else 0)
            | (_FLAG_GEMMA if gemma else 0)
            | (_FLAG_TWO_SHOT if two else 0)
        )
        split = self._norm_split(rows, wpr)
        # (row-wide: one "done reading" word per program follows the rows in our own slot)
        rowwide = (self.norm_rowwide and split > 1 and not two
                   and n_words + rows * _ROWWIDE_MAX_SPLIT <= self.layout.cap_words)
        if rowwide:
            split = min(split, _ROWWIDE_MAX_SPLIT)
            flags |= _FLAG_ROWWIDE
        flags |= (split.bit_length() - 1) << _SPLIT_SHIFT
        h = self._header(_OP_ADD_RMS_NORM, code, flags, rows * cols, cols, eps)
        chunk = _cdiv(wpr, split)
        block = max(32, _next_pow2(wpr if rowwide else chunk))
        shard = _round_up((n_words + self.world_size - 1) // self.world_size, 8)
        # split rows: two payload words per thread (session 5 sweep: 256-word chunks, 4 warps:
        # 1x4096 4.24 vs 4.41 us with 2); a whole row in one program: up to 16 warps
        if split > 1 and not rowwide:
            warps = max(1, min(8, block // 64))
        else:
            warps = max(4, min(16, block // 256))
        self._launch(
            K.add_rms_norm_kernel,
            (rows, split),
            x,
            residual if residual is not None else x,
            weight,
            out,
            residual_out if residual_out is not None else out,
            self._rows,
            cols,
            wpr,
            chunk,
            float(eps),
            shard,
            *self._mailbox_args(h),
            DTYPE=code,
            EPW=epw,
            WORLD=self.world_size,
            BLOCK=block,
            SPLIT=split,
            TWO_SHOT=two,
            HAS_RES=residual is not None,
            HAS_RES_OUT=residual_out is not None,
            GEMMA=bool(gemma),
            SOLO=rows * split == 1,
            BACKEND=self.backend,
            ROWWIDE=rowwide,
            **self._poll_variant(block, self.norm_warps or warps, norm=True),
            num_warps=self.norm_warps or warps,
        )
        return out, residual_out

    def qk_rms_norm(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        q_weight: torch.Tensor,
        k_weight: torch.Tensor,
        eps: float = 1e-6,
        *,
        q_out: torch.Tensor | None = None,
        k_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """qk_rms_norm(q, k, q_weight, k_weight, eps=1e-6, *, q_out=None, k_out=None)
        -> (q_out, k_out)

        RMSNorm of TP-sharded q and k ([tokens, local dim], unit stride in dim, rows may be
        strided) over the full dimension ``local dim * world``: per-token local sums of
        squares ([tokens, 2] fp32) are all-reduced in the kernel. Outputs may alias q / k.
        Collective, asynchronous."""
        code = _checks.check_qk(
            q, k, q_weight, k_weight, self.device, f"this mailbox runs on {self.device}"
        )
        rows = q.shape[0]
        q_out = (
            torch.empty_like(q, memory_format=torch.contiguous_format) if q_out is None else q_out
        )
        k_out = (
            torch.empty_like(k, memory_format=torch.contiguous_format) if k_out is None else k_out
        )
        for t, ref, name in ((q_out, q, "q_out"), (k_out, k, "k_out")):
            if self._check_rows(t, name) != code or t.shape != ref.shape:
                raise ValueError(f"{name} must be {ref.dtype} of shape {tuple(ref.shape)}")
        if rows == 0:
            return q_out, k_out
        self._check_words(2 * rows, 8 * rows)
        qc, kc = q.shape[1], k.shape[1]
        h = self._header(_OP_QK_RMS_NORM, code, 0, rows, ((qc & 0xFFFF) << 16) | (kc & 0xFFFF), eps)
        bq, bk = max(16, _next_pow2(qc)), max(16, _next_pow2(kc))
        self._launch(
            K.qk_rms_norm_kernel,
            (rows,),
            q,
            q.stride(0),
            k,
            k.stride(0),
            q_weight,
            k_weight,
            q_out,
            q_out.stride(0),
            k_out,
            k_out.stride(0),
            qc,
            kc,
            float(eps),
            *self._mailbox_args(h),
            DTYPE=code,
            WORLD=self.world_size,
            BQ=bq,
            BK=bk,
            SOLO=rows == 1,
            BACKEND=self.backend,
            num_warps=max(1, min(8, max(bq, bk) // 256)),
        )
        return q_out, k_out

    # ------------------------------------------------------------------ internals
    def _launch_all_reduce(
        self,
        x,
        out,
        numel,
        n_words,
        code,
        op,
        flags,
        cols,
        eps,
        two,
        *,
        numel_header=None,
        dtype_header=None,
    ):
        h = self._header(
            op,
            code if dtype_header is None else dtype_header,
            flags,
            numel if numel_header is None else numel_header,
            cols,
            eps,
        )
        block, warps = self._ar_shape(n_words)
        grid = max(1, _cdiv(n_words, block))
        shard = _round_up((n_words + self.world_size - 1) // self.world_size, 8) if two else 0
        self._launch(
            K.all_reduce_kernel,
            (grid,),
            x,
            out,
            numel,
            n_words,
            shard,
            *self._mailbox_args(h),
            DTYPE=code,
            EPW=1 if code == 0 else 2,
            WORLD=self.world_size,
            BLOCK=block,
            TWO_SHOT=two,
            SOLO=grid == 1,
            BACKEND=self.backend,
            **self._poll_variant(block, warps),
            num_warps=warps,
        )

    def _ar_shape(self, n_words: int) -> tuple[int, int]:
        """(payload words per program, warps per program) of an all-reduce launch.

        2x H200, session 5 sweeps (bench/results/h200x2-s5-sweep{1,2,3}.json): about two payload words
        per thread is fastest at every size, and single-warp programs beat wide ones once
        there are several (8 KB bf16: 2.89 us in 64-word programs vs 3.38 in 1024-word ones;
        256 KB: 4.49 vs 4.93; a poll of a wide program pays a cross-warp reduction). So: up
        to ``single_max`` words one program of ``block / 64`` warps, above it
        ``max_block``-word programs (64, one warp), at most ``max_programs`` of them."""
        if n_words <= self.single_max:
            block = max(64, _next_pow2(n_words))
        else:
            block = max(min(self.max_block, _next_pow2(n_words)),
                        _next_pow2(_cdiv(n_words, self.max_programs)))
        warps = self.ar_warps or block // 64
        return block, max(1, min(8, warps, block // 32))

    def _poll_variant(self, block: int, warps: int, norm: bool = False) -> dict:
        """The polls' constexprs: SPANS only where a ``block``-lane block has lanes in every
        one of ``warps`` warps (what makes its single reduction cross-warp)."""
        return dict(
            SPANS=self.fast_poll and block >= 32 * warps,
            POLL_DELAY=(self.norm_poll_delay_ns if norm else self.poll_delay_ns)
            if self.device.type == "cuda"
            else 0,
        )

    def _launch(self, kernel, grid, *args, **kwargs):
        kwargs.update(ll.pdl_kwargs(kernel, self.device))  # CCL_PDL=1 on CUDA sm_90+
        if self._compile_only:
            compiled = kernel.warmup(*args, grid=grid, **kwargs)
            init = getattr(compiled, "_init_handles", None)
            if init is not None:  # also builds and caches the launcher stub
                init()
        else:
            kernel[grid](*args, **kwargs)

    def _mailbox_args(self, h) -> tuple:
        """The arguments every mailbox kernel takes after its own, in the kernels' order
        (``table, ctrl, rank, h0..h3`` then ``triton_mailbox._COMMON``'s offsets and limit)."""
        return (
            self._table,
            self._ctrl,
            self.rank,
            *h,
            self._hop1,
            self.layout.slot_words,
            self._hop2,
            self.layout.hop2_words,
            self.limit,
        )

    def _header(self, op, code, flags, numel, cols, eps):
        return (
            (op << 24) | (code << 16) | flags,
            numel & 0xFFFFFFFF,
            cols & 0xFFFFFFFF,
            _f32_bits(eps),
        )

    def _norm_split(self, rows: int, wpr: int) -> int:
        """Programs per row of the fused norm: a power of two, so that programs hold about
        ``norm_chunk`` payload words each, with at most ``_MAX_SPLIT_PROGRAMS`` programs in
        the launch. 1 under the interpreter (its programs run one after another and cannot
        wait on each other) and on XPU (co-residency of a launch not established there)."""
        if (
            self.norm_chunk <= 0
            or self.backend == ll.BACKEND_INTERPRET.value
            or self.device.type != "cuda"
        ):
            return 1
        cap = _MAX_SPLIT_PROGRAMS // rows
        split = 1
        while split * 2 <= cap and split * self.norm_chunk < wpr:
            split *= 2
        return split

    def _two_shot(self, algorithm) -> bool:
        if algorithm in ("one_shot", 0):
            return False
        if algorithm in ("two_shot", 1):
            return self.world_size > 1 and self.two_shot_enabled
        raise ValueError(f"algorithm must be 'one_shot' or 'two_shot', got {algorithm!r}")

    def _live(self) -> torch.Tensor:
        if self._ctrl is None:
            raise CclError(f"rank {self.rank}: the device mailbox is closed")
        return self._ctrl

    def _check_words(self, n_words: int, nbytes: int) -> None:
        self._live()
        if n_words > self.layout.cap_words:
            raise ValueError(
                f"payload of {nbytes} bytes ({n_words} packets) exceeds the mailbox capacity "
                f"{self.capacity_bytes} bytes ({self.layout.cap_words} packets)"
            )

    def _check(self, t, name: str) -> int:
        return _checks.check_tensor(t, name, self.device, f"this mailbox runs on {self.device}")

    def _check_rows(self, t, name: str) -> int:
        return _checks.check_rows(t, name, self.device, f"this mailbox runs on {self.device}")

    def _check_like(self, t, ref, name, shape) -> None:
        _checks.check_like(t, ref, name, shape, self.device, f"this mailbox runs on {self.device}")


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _interpreting() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(K.all_reduce_kernel, InterpretedFunction)
