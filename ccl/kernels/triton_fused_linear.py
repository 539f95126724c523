"""Row-parallel projection fused with the mailbox all-reduce and residual-add + RMSNorm, in one
Triton launch (DESIGN.md §4 ``linear_all_reduce_add_rms_norm``): the all-reduce lives inside
the GEMV. Same wire format and device layout as ``ccl.kernels.triton_mailbox`` (LL8 packets,
hop-1 slots ``[phase][src]`` with a 4-word header then payload at ``PAYLOAD_OFFSET``), whose
helpers and constants this module imports.

One launch has ``n_tiles + M * P`` programs (``P``: epilogue programs per row, chosen by the
host). Each program first takes a **ticket** from a counter (``aux[AUX_TICKET]``); tickets,
not program ids, assign the work:

* ticket ``t < n_tiles`` -- a column tile: computes this rank's fp32 partial of columns
  ``[t*BN, (t+1)*BN)`` for every row (``x @ W``, or the routed MoE down projection), publishes
  it as LL8 packets (one fp32 per packet, payload word ``m * N + n``) into every peer's hop-1
  slot, then waits for every peer's packets of the *same* tile, sums in rank order
  0..WORLD-1 in fp32 (so every rank holds bitwise-identical sums), adds the residual, and
  leaves the pre-norm values and the tile's per-row sum of squares in a scratch of this rank
  (``ws``), counting the row done in ``aux[AUX_ROWS + m]``.
* ticket ``t >= n_tiles`` -- part ``p`` of the epilogue of row ``m`` (``t - n_tiles = m * P
  + p``): waits until all ``n_tiles`` tiles counted the row, adds the per-tile sums of
  squares in tile order (every part the same way, so every part gets the same bits) and
  writes ``residual_out`` and the normalised ``out`` for its column chunk.

So the all-reduce is spread over the tile programs (each waits only for its own tile, which
the peer's same tile publishes before it waits), and the epilogue is one counter poll and one
pass over memory that is already summed, split over ``P`` programs per row. What does not
depend on a wait is loaded before it (the residual before a tile's publish, the norm weight
before an epilogue's counter poll). Tickets make every wait safe: a tile's peer tile is
published by a program that never waits before publishing, and, both ranks handing tickets out
in order, the lowest waiting ticket's peer is always running or about to (no circular wait
whatever the number of tiles); an epilogue program only exists after every tile ticket was
handed to a running program, so spinning epilogues never starve tiles of SMs. Under the Triton
interpreter, which runs one launch's programs one after another, tickets follow program order:
tile j waits only on the peer's tile j, which it reaches after waiting on our tiles < j, and
epilogues run after every tile.

The partial travels in fp32 (no rounding between the GEMV and the norm). Sequence number,
done counter, status words and bounded waits are those of ``triton_mailbox`` (``ctrl``);
the last program to finish publishes ``seq`` and resets the done counter, the ticket, the
failure flag and the row counters (a row's counter has ``P`` readers, all done by then).
Every 2^31 calls the unused tails of our peers' slots are rewritten with the current flag
(``_scrub``), so no stale word can carry a matching 32-bit flag.

INT4 weights: GPTQ / AutoRound symmetric (vLLM's layout, see ``ccl.fused_linear``):
qweight int32 ``[K/8, N]`` (nibble ``k % 8`` of word ``[k // 8, n]``), scales ``[K/G, N]``,
value ``(nibble - 8) * scale`` computed in fp32 (exact), fp32 accumulation (the tl.dot path
for several rows rounds the dequantised weight to the activations' 16-bit dtype first, as
vLLM's INT4 GEMMs do).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ccl.kernels import ll
from ccl.kernels.triton_mailbox import (
    CTRL_DONE,
    CTRL_FAIL_SEQ,
    CTRL_MISSING,
    CTRL_SCRATCH,
    CTRL_SEQ,
    CTRL_STATUS,
    HEADER_WORDS,
    PAYLOAD_OFFSET,
    _header,
    _load_f32,
    _load_seq,
    _ptr,
    _record_hop1_failure,
    _row_sum_of_squares,
    _exchange,
    _scrub,
    _wait_peer,
)

# INT4 dequantisation of the row path: scale applied once per packed word (default) or once
# per nibble (CCL_INT4_SCALE_ONCE=0, read at import: the A/B switch for the bench).
INT4_SCALE_ONCE = tl.constexpr(os.environ.get("CCL_INT4_SCALE_ONCE", "1") != "0")

# INT4 dequantisation of the tl.dot path: "packed" loads the [BK/8, BN] packed words once and
# unpacks through a [BK/8, 8, BN] reshape (a layout conversion before the MMA operand);
# "bcast" loads the word of every [BK, BN] element (8 rows share one: L1 hits) so the unpack
# is elementwise and can happen in the operand's own layout. CCL_INT4_DOT_LOAD, read at
# import: the A/B switch for the bench. Same values either way, so the same bits.
INT4_DOT_BCAST = tl.constexpr(os.environ.get("CCL_INT4_DOT_LOAD", "packed") == "bcast")

AUX_TICKET = tl.constexpr(0)  # next ticket of the running launch
AUX_FAILED = tl.constexpr(1)  # nonzero: a tile program of the running launch failed a wait
# Row counters sit two cache lines away from the ticket, which every program's start hits.
AUX_ROWS = tl.constexpr(16)  # [MAX_ROWS]: tile programs that finished row m
MAX_ROWS = 64  # rows (tokens) of one fused launch
ROWS_BLOCK = tl.constexpr(MAX_ROWS)  # (the same, inside the kernels)
AUX_WORDS = 16 + MAX_ROWS

OP_LINEAR_ADD_RMS_NORM = 5  # header op code (1..4 are triton_mailbox's / the host's)
OP_LINEAR_QK_RMS_NORM = 7  # (6: the MoE variant of 5, host side)
FLAG_RESIDUAL, FLAG_GEMMA, FLAG_INT4, FLAG_MOE = 0x01, 0x02, 0x10, 0x20
# the direct handoff (ranks on different handoffs would add the residual twice or never)
FLAG_DIRECT = 0x08


@triton.jit
def _row_raw(x_row, w_ptr, swk, swn, s_ptr, lds, group, K, k0, cols, cm,
             INT4: tl.constexpr, BK: tl.constexpr):
    """Raw loads of one K tile of the row GEMV (no conversion, so a prefetched tile costs no
    wait until it is used): x ``[BK]`` (INT4: ``[BK/8, 8]``), W ``[BK, BN]`` (INT4: packed
    words ``[BK/8, BN]`` and scales ``[BK/8, BN]``, one group per 8 K values). The one-slot
    case of ``_slots_raw`` (every tile row from the same activation row and weights)."""
    RS: tl.constexpr = BK // 8 if INT4 else BK
    same = tl.zeros([RS], tl.int64)
    return _slots_raw(x_row + same, w_ptr + same, s_ptr + same, True, swk, swn, lds, group, K,
                      k0, cols, cm, INT4, BK, RS)


@triton.jit
def _row_fma(acc, xr, wr, sr, XDT: tl.constexpr, WDT: tl.constexpr, INT4: tl.constexpr,
             BK: tl.constexpr):
    """``acc += x * W`` elementwise for one raw tile (fp32; INT4 values ``(nibble - 8) *
    scale``, exact in fp32). INT4: acc ``[BK/8, BN]``, one nibble position at a time (a
    3-D ``[BK/8, 8, BN]`` unpack measured 38.5 vs 8.9 us fused on H200: register spills)."""
    if INT4:  # nibble by nibble on [BK/8, BN] blocks
        x8 = ll.bits_to_f32(ll.elem_bits(xr, XDT), XDT)  # [BK/8, 8]
        sc = ll.bits_to_f32(ll.elem_bits(sr, WDT), WDT)  # [BK/8, BN]
        j8 = tl.arange(0, 8)[None, :]
        if INT4_SCALE_ONCE:
            # sum_j x_j * (nibble_j - 8) for the packed word's 8 K values, then one multiply
            # by the scale (one group per word) instead of eight; nibble - 8 from a float's
            # mantissa (2^23 + nibble, exact) instead of an int -> float conversion
            t = tl.zeros(acc.shape, tl.float32)
            for j in tl.static_range(8):
                xj = tl.sum(tl.where(j8 == j, x8, 0.0), 1)  # x[k0 + 8 i + j]: [BK/8]
                q = (((wr >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
                t += xj[:, None] * (q - 8388616.0)
            acc += t * sc
        else:
            for j in tl.static_range(8):
                xj = tl.sum(tl.where(j8 == j, x8, 0.0), 1)  # x[k0 + 8 i + j]: [BK/8]
                wj = (((wr >> (4 * j)) & 0xF) - 8).to(tl.float32) * sc
                acc += xj[:, None] * wj
    else:
        xv = ll.bits_to_f32(ll.elem_bits(xr, XDT), XDT)
        wv = ll.bits_to_f32(ll.elem_bits(wr, WDT), WDT)
        acc += xv[:, None] * wv
    return acc


@triton.jit
def _gemv_row(x_row, w_ptr, swk, swn, s_ptr, lds, group, K, n0, n_end,
              XDT: tl.constexpr, WDT: tl.constexpr, INT4: tl.constexpr,
              BN: tl.constexpr, BK: tl.constexpr):
    """fp32 ``x_row[0:K] @ W[:, n0:n0+BN]`` (columns at or past ``n_end`` are 0), for one
    activation row: the decode case (M = 1, and every MoE slot). See ``_gemv_cols``."""
    cols = n0 + tl.arange(0, BN)
    return _gemv_cols(x_row, w_ptr, swk, swn, s_ptr, lds, group, K, cols, cols < n_end,
                      XDT, WDT, INT4, BN, BK)


@triton.jit
def _gemv_cols(x_row, w_ptr, swk, swn, s_ptr, lds, group, K, cols, cm,
               XDT: tl.constexpr, WDT: tl.constexpr, INT4: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr):
    """fp32 ``x_row[0:K] @ W[:, cols]`` for ``BN`` column indices (``cm``: valid), one
    activation row. Products accumulate elementwise in registers and are reduced once at
    the end; the next K tile is loaded before the current one is used, so two tiles are in
    flight per program."""
    if INT4:
        acc = tl.zeros([BK // 8, BN], tl.float32)
    else:
        acc = tl.zeros([BK, BN], tl.float32)
    k0 = tl.full([], 0, tl.int32)
    xn, wn, sn = _row_raw(x_row, w_ptr, swk, swn, s_ptr, lds, group, K, k0, cols, cm, INT4, BK)
    while k0 < K:
        xc, wc, sc = xn, wn, sn
        xn, wn, sn = _row_raw(x_row, w_ptr, swk, swn, s_ptr, lds, group, K, k0 + BK, cols, cm,
                              INT4, BK)
        acc = _row_fma(acc, xc, wc, sc, XDT, WDT, INT4, BK)
        k0 += BK
    return tl.sum(acc, 0)


@triton.jit
def _slots_raw(x_rows, w_rows, s_rows, rok, swk, swn, lds, group, K, k0, cols, cm,
               INT4: tl.constexpr, BK: tl.constexpr, R: tl.constexpr):
    """Raw loads of one K step of every routing slot at once: tile row ``i`` belongs to slot
    ``i // (BK/8)`` (INT4) or ``i // BK`` (dense), whose activation row, expert weights and
    scales start at ``x_rows[i]``, ``w_rows[i]``, ``s_rows[i]`` (``rok``: the slot exists
    and routes to an expert here; else nothing is read and the row stays 0). The shapes are
    ``_row_raw``'s with ``R`` rows, so ``_row_fma`` consumes them unchanged."""
    i = tl.arange(0, R)
    if INT4:
        k8 = k0 + (i % (BK // 8)) * 8
        km = (k8 < K) & rok
        m2 = km[:, None] & cm[None, :]
        xr = tl.load(x_rows[:, None] + k8[:, None] + tl.arange(0, 8)[None, :], mask=km[:, None],
                     other=0.0)
        wr = tl.load(w_rows[:, None] + (k8 // 8).to(tl.int64)[:, None] * swk
                     + cols[None, :] * swn, mask=m2, other=0)
        sr = tl.load(s_rows[:, None] + (k8 // group).to(tl.int64)[:, None] * lds
                     + cols[None, :], mask=m2, other=0.0)
    else:
        ks = k0 + i % BK
        km = (ks < K) & rok
        xr = tl.load(x_rows + ks, mask=km, other=0.0)
        wr = tl.load(w_rows[:, None] + ks.to(tl.int64)[:, None] * swk + cols[None, :] * swn,
                     mask=km[:, None] & cm[None, :], other=0.0)
        sr = wr
    return xr, wr, sr


@triton.jit
def _gemv_routed(x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, K, N, n0, m,
                 ids_ptr, tw_ptr, swe, sse, n_experts,
                 XDT: tl.constexpr, WDT: tl.constexpr, INT4: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, TOPK: tl.constexpr, SLOTS: tl.constexpr):
    """``sum_s tw[m, s] * (x[m*TOPK + s] @ W[ids[m, s]][:, n0:n0+BN])``: every routing slot's
    K step is one tile (``SLOTS`` = TOPK rounded up to a power of two, rows of absent slots
    masked), so a K step has all TOPK experts' bytes in flight and the dependent chain is
    K / BK steps long, not TOPK * K / BK (2x H200, MiniMax-M2 down projection: one slot at a
    time took ~21 us per layer in session 5's decode profile, each step waiting on one 4 KB
    tile; this 9.2 us, bench/results/h200-moe.json). Ids outside [0, E) are skipped: their
    rows read nothing and add 0 (the expert-parallel sentinel)."""
    RS: tl.constexpr = BK // 8 if INT4 else BK  # tile rows per slot
    R: tl.constexpr = SLOTS * RS
    cols = n0 + tl.arange(0, BN)
    cm = cols < N
    sidx = tl.arange(0, R) // RS
    slot = m.to(tl.int64) * TOPK + sidx
    e = tl.load(ids_ptr + slot, mask=sidx < TOPK, other=-1).to(tl.int64)
    rok = (sidx < TOPK) & (e >= 0) & (e < n_experts)
    e = tl.where(rok, e, 0)
    x_rows = x_ptr + slot * ldx
    w_rows = w_ptr + e * swe
    s_rows = s_ptr + e * sse
    acc = tl.zeros([R, BN], tl.float32)
    k0 = tl.full([], 0, tl.int32)
    xn, wn, sn = _slots_raw(x_rows, w_rows, s_rows, rok, swk, swn, lds, group, K, k0, cols, cm,
                            INT4, BK, R)
    while k0 < K:
        xc, wc, sc = xn, wn, sn
        xn, wn, sn = _slots_raw(x_rows, w_rows, s_rows, rok, swk, swn, lds, group, K, k0 + BK,
                                cols, cm, INT4, BK, R)
        acc = _row_fma(acc, xc, wc, sc, XDT, WDT, INT4, BK)
        k0 += BK
    y = tl.sum(tl.reshape(acc, [SLOTS, RS, BN]), 1)  # [SLOTS, BN]: one row per slot
    s = tl.arange(0, SLOTS)
    es = tl.load(ids_ptr + m.to(tl.int64) * TOPK + s, mask=s < TOPK, other=-1)
    sok = (s < TOPK) & (es >= 0) & (es < n_experts)
    tw = tl.load(tw_ptr + m.to(tl.int64) * TOPK + s, mask=sok, other=0.0).to(tl.float32)
    return tl.sum(tl.where(sok[:, None], tw[:, None] * y, 0.0), 0)


@triton.jit
def _dot_operand(ptr, mask, DT: tl.constexpr, NATIVE: tl.constexpr):
    """A ``tl.dot`` operand tile: as stored (16-bit, ``NATIVE``) or converted to fp32."""
    if NATIVE:
        v = tl.load(ptr, mask=mask, other=0.0)
    else:
        v = _load_f32(ptr, mask, DT)
    return v


@triton.jit
def _gemv_dot(x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, M, K, N, n0, m0,
              XDT: tl.constexpr, WDT: tl.constexpr, INT4: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NATIVE: tl.constexpr,
              STAGES: tl.constexpr):
    """fp32 ``x[m0:m0+BM, :] @ W[:, n0:n0+BN]`` with ``tl.dot`` (rows/columns past M/N are 0),
    for several activation rows; the K loop software-pipelined over ``STAGES`` tiles (1: each
    step's loads issued at the step). ``NATIVE``: 16-bit operands straight to the tensor cores
    (INT4 dequantised to x's dtype first, as vLLM's INT4 GEMMs do), fp32 accumulation;
    otherwise fp32 operands and an IEEE fp32 dot (the Triton interpreter, fp32 activations,
    or mixed dtypes)."""
    rows = m0 + tl.arange(0, BM)
    cols = n0 + tl.arange(0, BN)
    rmask = rows < M
    cmask = cols < N
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        xt = _dot_operand(x_ptr + rows.to(tl.int64)[:, None] * ldx + ks[None, :],
                          rmask[:, None] & kmask[None, :], XDT, NATIVE)
        if INT4 and INT4_DOT_BCAST:
            m2 = kmask[:, None] & cmask[None, :]
            q = tl.load(w_ptr + (ks // 8).to(tl.int64)[:, None] * swk + cols[None, :] * swn,
                        mask=m2, other=0)
            sc = _load_f32(s_ptr + (ks // group).to(tl.int64)[:, None] * lds + cols[None, :],
                           m2, WDT)
            nib = ((q >> ((ks % 8) * 4)[:, None]) & 0xF) | 0x4B000000
            wt = (nib.to(tl.float32, bitcast=True) - 8388616.0) * sc
            if NATIVE:
                wt = wt.to(xt.dtype)
        elif INT4:
            k8 = k0 + tl.arange(0, BK // 8) * 8
            m2 = (k8 < K)[:, None] & cmask[None, :]
            q = tl.load(w_ptr + (k8 // 8).to(tl.int64)[:, None] * swk + cols[None, :] * swn,
                        mask=m2, other=0)
            sc = _load_f32(s_ptr + (k8 // group).to(tl.int64)[:, None] * lds + cols[None, :],
                           m2, WDT)
            # nibble - 8 from a float's mantissa (2^23 + nibble, exact; as the row path):
            # an OR and an add instead of an int -> float conversion (quarter rate on
            # Hopper); the same values, so the same bits. (Measured on 2x H200, session 6:
            # fused INT4 M=8 13.27 vs 13.28 us: the dequantisation is not what bounds it.)
            nib = ((q[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF) | 0x4B000000
            wt = tl.reshape((nib.to(tl.float32, bitcast=True) - 8388616.0) * sc[:, None, :],
                            [BK, BN])
            if NATIVE:
                wt = wt.to(xt.dtype)
        else:
            wt = _dot_operand(w_ptr + ks.to(tl.int64)[:, None] * swk + cols[None, :] * swn,
                              kmask[:, None] & cmask[None, :], WDT, NATIVE)
        if NATIVE:
            acc = tl.dot(xt, wt, acc)
        else:
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
    return acc


@triton.jit
def _partial_row(x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, K, N, n0, m,
                 ids_ptr, tw_ptr, swe, sse, n_experts,
                 XDT: tl.constexpr, WDT: tl.constexpr, INT4: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, TOPK: tl.constexpr,
                 SLOTS: tl.constexpr):
    """Row ``m`` of this rank's fp32 partial, columns ``[n0, n0+BN)``. ``TOPK == 0``: a
    linear layer, ``x[m] @ W``. ``TOPK > 0``: an MoE down projection, ``sum_s tw[m, s] *
    (x[m*TOPK + s] @ W[ids[m, s]])`` over the routing slots in order (experts stacked along
    the weights' leading dimension, strides ``swe`` / ``sse``)."""
    if TOPK == 0:
        acc = _gemv_row(x_ptr + m.to(tl.int64) * ldx, w_ptr, swk, swn, s_ptr, lds, group, K,
                        n0, N, XDT, WDT, INT4, BN, BK)
    else:
        acc = _gemv_routed(x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, K, N, n0, m,
                           ids_ptr, tw_ptr, swe, sse, n_experts, XDT, WDT, INT4, BN, BK, TOPK,
                           SLOTS)
    return acc


@triton.jit
def _failed_flag(aux, BACKEND: tl.constexpr):
    """``aux[AUX_FAILED]`` as loaded by every thread (polled like the inbox: L1 bypassed on XPU
    too). Issued before a tile's GEMV, so its latency overlaps the GEMV instead of delaying the
    first poll of the tile's wait; ``_tile_reduce`` makes it uniform across warps."""
    return ll.load(aux + AUX_FAILED, tl.full([], 1, tl.int1), BACKEND).to(tl.int32)


@triton.jit
def _sum_in_rank_order(words, wmask, own, failed, me, hop1_off, phase, slot_words, rank, my_hdr,
                       flag, seq, limit, ctrl, aux, NW: tl.constexpr, WORLD: tl.constexpr,
                       BACKEND: tl.constexpr, SPANS: tl.constexpr = False):
    """fp32 sum in rank order 0..WORLD-1 of every source's packets at payload words
    ``words`` (``wmask`` valid; any shape of ``NW`` elements) of its hop-1 slot in our region,
    ours being ``own`` (no wait for it). A failed wait (peer missing, header mismatch) is
    recorded once and sets ``aux[AUX_FAILED]``; ``failed`` (nonzero: skip the waits) comes in
    and goes out. Returns (total, failed)."""
    hl = tl.arange(0, HEADER_WORDS)
    one = tl.full([], 1, tl.int64)
    total = tl.zeros(own.shape, tl.float32)
    for src in tl.static_range(WORLD):
        is_me = rank == src
        slot = me + hop1_off + (phase * WORLD + src) * slot_words
        lim = tl.where(failed != 0, 0, limit)
        # (_wait_peer reduces over one axis: it takes a tile flattened)
        got, theirs, st = _wait_peer(
            tl.reshape(slot + PAYLOAD_OFFSET + words, [NW]),
            tl.reshape(ll.both(wmask, is_me == 0), [NW]), slot,
            ll.both(hl < HEADER_WORDS, is_me == 0), my_hdr, flag, lim, ctrl, BACKEND, SPANS,
        )
        got = tl.reshape(got, own.shape)
        if (st != 0) & (failed == 0):  # uniform branch: no bookkeeping on the fast path
            _record_hop1_failure(ctrl, src, rank, st, theirs, my_hdr, seq)
            tl.atomic_or(aux + AUX_FAILED, one)
        failed = failed | (st != 0).to(tl.int32)
        v = tl.where(is_me, own, ll.bits_to_f32(ll.data_of(got), 0))
        if src == 0:
            total = v
        else:
            total = total + v
    return total, failed


@triton.jit
def _tile_reduce(acc, rows, cols, M, N, flag, seq, table, ctrl, aux, rank, phase, my_hdr,
                 hop1_off, slot_words, limit, res_ptr, sums, ssp, tile, n_tiles, failed_raw,
                 XDT: tl.constexpr, HAS_RES: tl.constexpr, WORLD: tl.constexpr,
                 BACKEND: tl.constexpr):
    """All-reduce of one partial tile (``acc [R, C]`` at ``rows x cols``, fp32), done by the
    program that computed it: publish it as LL8 packets (word ``m * N + n``) to every peer's
    hop-1 slot, wait for every peer's packets of the same tile, sum in rank order
    0..WORLD-1 (our own values from registers), add the residual, and leave the pre-norm
    row values in ``sums`` and the tile's sum of squares per row in ``ssp[m, tile]`` (fp32
    scratch of this rank) for the epilogue. Then count the rows done in ``aux[AUX_ROWS + m]``
    (release: the epilogue acquires it before reading the scratch). ``failed_raw``: the
    ``_failed_flag`` the caller loaded before the GEMV (nonzero: an earlier tile failed, skip
    the waits)."""
    NW: tl.constexpr = acc.shape[0] * acc.shape[1]
    words = rows[:, None] * N + cols[None, :]
    rmask = rows < M
    wmask = rmask[:, None] & (cols < N)[None, :]
    # The residual does not depend on the peers: loaded before the publish, its latency
    # overlaps the wait instead of following it (the same add after the sum: same bits).
    if HAS_RES:
        res = _load_f32(res_ptr + words, wmask, XDT)
    mine1 = hop1_off + (phase * WORLD + rank) * slot_words  # our slot in a peer's hop 1
    for i in tl.static_range(1, WORLD):
        peer = _ptr(table, (rank + i) % WORLD)
        ll.store(peer + mine1 + PAYLOAD_OFFSET + words, ll.pack(acc.to(tl.int32, bitcast=True),
                                                               flag), wmask, BACKEND)
    ll.publish_flush(ctrl + CTRL_SCRATCH, BACKEND)
    me = _ptr(table, rank)
    # it decides the waits' bounds (a spin loop's exit): the same value in every warp
    failed = ll.all_warps_max(failed_raw)
    total, failed = _sum_in_rank_order(words, wmask, acc, failed, me, hop1_off, phase,
                                       slot_words, rank, my_hdr, flag, seq, limit, ctrl, aux,
                                       NW, WORLD, BACKEND)
    if HAS_RES:
        total = total + res
    tl.store(sums + words, total, mask=wmask)
    tl.store(ssp + rows * n_tiles + tile, tl.sum(tl.where(wmask, total * total, 0.0), 1),
             mask=rmask)
    tl.atomic_add(aux + AUX_ROWS + rows, 1, mask=rmask, sem="release", scope="gpu")


@triton.jit
def _tile_publish(acc, rows, cols, M, N, flag, table, ctrl, rank, phase, hop1_off, slot_words,
                  res_ptr, XDT: tl.constexpr, HAS_RES: tl.constexpr, WORLD: tl.constexpr,
                  BACKEND: tl.constexpr):
    """Direct handoff, tile side: publish this rank's fp32 partial tile (``acc [R, C]`` at
    ``rows x cols``) as LL8 packets into our slot of every rank's hop-1 region, our own
    included (that slot is otherwise unused: one-shot skips its own source), and return --
    no wait. The epilogue programs poll those packets directly. The residual rides with the
    last rank's partial, so every rank sums ``p_0 + ... + (p_{W-1} + residual)`` in rank
    order: the same bits everywhere, and the residual is read only here, before the packets
    the epilogue waits on (so outputs may alias it)."""
    words = rows[:, None] * N + cols[None, :]
    wmask = (rows < M)[:, None] & (cols < N)[None, :]
    if HAS_RES:
        last = rank == WORLD - 1
        res = _load_f32(res_ptr + words, ll.both(wmask, last), XDT)
        acc = tl.where(last, acc + res, acc)
    packed = ll.pack(acc.to(tl.int32, bitcast=True), flag)
    mine1 = hop1_off + (phase * WORLD + rank) * slot_words + PAYLOAD_OFFSET
    for i in tl.static_range(WORLD):
        dst = _ptr(table, (rank + i) % WORLD)
        ll.store(dst + mine1 + words, packed, wmask, BACKEND)
    ll.publish_flush(ctrl + CTRL_SCRATCH, BACKEND)


@triton.jit
def _epilogue_direct(row, part, c0, chunk, M, N, eps, flag, seq, table, ctrl, aux, rank, phase,
                     my_hdr, hop1_off, slot_words, limit, nw_ptr, out_ptr, res_out_ptr,
                     XDT: tl.constexpr, WORLD: tl.constexpr, EPI_BLOCK: tl.constexpr,
                     PARTS: tl.constexpr, GEMMA: tl.constexpr, HAS_RES_OUT: tl.constexpr,
                     SPANS: tl.constexpr, BACKEND: tl.constexpr):
    """Direct handoff, epilogue side: part ``part`` of row ``row`` polls every source's
    packets of its columns ``[c0, c0 + chunk)`` itself -- our own tiles' first (they land
    earliest), then the peers' in rank order -- and sums them in rank order. With ``PARTS >
    1`` the parts' sums of squares meet in LL words after the row's packets in our own slot
    (``_row_sum_of_squares``: that slot's words carry the call's flag, and ``_scrub(OWN)``
    refreshes the rest every 2^31 calls, so nothing needs clearing); with one part the
    program has the whole row. No counter, no scratch pass, no release/acquire between the
    last packet's arrival and the stores."""
    c = c0 + tl.arange(0, EPI_BLOCK)
    cm = (c < c0 + chunk) & (c < N)
    hl = tl.arange(0, HEADER_WORDS)
    one = tl.full([], 1, tl.int64)
    failed = ll.all_warps_max(_failed_flag(aux, BACKEND))
    me = _ptr(table, rank)
    words = row * N + c
    own_slot = me + hop1_off + (phase * WORLD + rank) * slot_words
    lim = tl.where(failed != 0, 0, limit)
    got, _, st = _wait_peer(own_slot + PAYLOAD_OFFSET + words, cm, own_slot, hl < 0, my_hdr,
                            flag, lim, ctrl, BACKEND, SPANS)
    if (st != 0) & (failed == 0):  # our own tiles never published: record, never hang
        tl.atomic_max(ctrl + CTRL_STATUS, tl.full([], 1, tl.int64))
        tl.atomic_max(ctrl + CTRL_FAIL_SEQ, seq)
        tl.atomic_or(ctrl + CTRL_MISSING, one << rank)
        tl.atomic_or(aux + AUX_FAILED, one)
    failed = failed | (st != 0).to(tl.int32)
    own = ll.bits_to_f32(ll.data_of(got), 0)
    total, failed = _sum_in_rank_order(words, cm, own, failed, me, hop1_off, phase, slot_words,
                                       rank, my_hdr, flag, seq, limit, ctrl, aux, EPI_BLOCK,
                                       WORLD, BACKEND, SPANS)
    # the norm weight is loaded here, not before the polls: it would hold registers across
    # them in every program of the launch (tiles included), and its latency hides behind the
    # siblings' exchange or the sum of squares
    wn = _load_f32(nw_ptr + c, cm, XDT)
    ss = tl.sum(tl.where(cm, total * total, 0.0), 0)
    if PARTS > 1:
        ss, failed = _row_sum_of_squares(own_slot + PAYLOAD_OFFSET + M * N, row, part, ss,
                                         failed, seq, ctrl, limit, PARTS, BACKEND)
    if GEMMA:
        wn = wn + 1.0
    inv = tl.math.rsqrt(ss / N + eps)
    _epi_store(total, inv, wn, out_ptr, res_out_ptr, row.to(tl.int64) * N, c, cm, failed == 0,
               XDT, HAS_RES_OUT)


@triton.jit
def _wait_row_tiles(aux, row, n_tiles, limit, ctrl, rank, seq, BACKEND: tl.constexpr):
    """Epilogue side of a row counter: waits until ``n_tiles`` tile programs counted row
    ``row`` (``aux[AUX_ROWS + row]``), then one acquire orders the reads of what they wrote.
    Polled with plain L1-bypassing loads: atomics in a spin loop would contend for the
    counters' cache line with the tiles' increments (measured: M=8 calls slowed ~100x on
    H200); no barrier inside, so per-warp exits are safe. The wait only outlasts the tiles'
    own bounded waits, and a count still short at the bound is recorded as a timeout of this
    rank. Returns whether the row is complete (the same in every warp)."""
    cnt = aux + AUX_ROWS + row
    yes = tl.full([], 1, tl.int1)
    done = ll.load(cnt, yes, BACKEND)
    spins = 0
    while (done < n_tiles) & (spins < limit):
        done = ll.load(cnt, yes, BACKEND)
        spins += 1
    done = tl.atomic_add(cnt, 0, sem="acquire", scope="gpu")
    if done < n_tiles:  # record, never hang
        tl.atomic_max(ctrl + CTRL_STATUS, tl.full([], 1, tl.int64))
        tl.atomic_max(ctrl + CTRL_FAIL_SEQ, seq)
        tl.atomic_or(ctrl + CTRL_MISSING, tl.full([], 1, tl.int64) << rank)
    return done >= n_tiles


@triton.jit
def _epi_store(acc, inv, wn, out_ptr, res_out_ptr, base, c, cm, ok, XDT: tl.constexpr,
               HAS_RES_OUT: tl.constexpr):
    """Writes ``res_out = acc`` and ``out = acc * inv * wn`` (``wn``: the norm weight as
    fp32, ``+ 1`` already added for Gemma) for columns ``c`` of a row, unless the call
    failed."""
    if HAS_RES_OUT:
        tl.store(res_out_ptr + base + c, ll.from_f32(acc, XDT), mask=ll.both(cm, ok))
    tl.store(out_ptr + base + c, ll.from_f32((acc * inv) * wn, XDT), mask=ll.both(cm, ok))


@triton.jit
def linear_add_rms_norm_kernel(
    x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group,
    res_ptr, nw_ptr, out_ptr, res_out_ptr,
    M, K, N, n_tiles, eps, ws, epi_parts, epi_chunk,
    table, ctrl, aux, rank, h0, h1, h2, h3,
    hop1_off, slot_words, hop2_off, hop2_words, limit,
    ids_ptr, tw_ptr, swe, sse, n_experts,
    XDT: tl.constexpr, WDT: tl.constexpr, INT4: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
    STAGES: tl.constexpr,
    NATIVE: tl.constexpr, TOPK: tl.constexpr, SLOTS: tl.constexpr,
    BLOCK_TILES: tl.constexpr, EPI_BLOCK: tl.constexpr, WORLD: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_RES_OUT: tl.constexpr, GEMMA: tl.constexpr,
    BACKEND: tl.constexpr, DIRECT: tl.constexpr = False, SPANS: tl.constexpr = False,
    EPI_PARTS: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """``out, res_out = add_rms_norm(sum_r partial_r (+ residual))`` where this rank's partial
    is ``x [M, K] @ W [K, N]`` (``TOPK == 0``; x row stride ``ldx``; W strides ``swk``,
    ``swn``; INT4: qweight strides of the packed ``[K/8, N]``) or the MoE down projection
    ``sum_s tw[m, s] * x[m*TOPK + s] @ W[ids[m, s]]`` (``TOPK > 0``, expert strides ``swe``,
    ``sse``). Residual / outputs ``[M, N]`` contiguous, norm weight ``[N]``, M <= MAX_ROWS.
    Outputs may alias the residual (the residual is read by the tile programs, which all
    finish before an epilogue program writes). Each row's epilogue is ``epi_parts``
    programs, one per ``epi_chunk`` columns (``epi_chunk <= EPI_BLOCK``).

    ``DIRECT``: the direct handoff (``_tile_publish`` / ``_epilogue_direct``): tiles publish
    and leave, each epilogue program polls its whole row (``EPI_BLOCK >= N``) itself; else
    the tiles all-reduce their own columns and hand the sums over through the scratch and
    the row counters. ``SPANS``: ``EPI_BLOCK >= 32 * num_warps`` (one-reduction polls)."""
    ll.await_prior_kernel(PDL, BACKEND)
    seq = _load_seq(ctrl, BACKEND)
    ticket = tl.atomic_add(aux + AUX_TICKET, 1, sem="relaxed")
    flag = seq & ll.LOW32
    phase = seq & 1
    hl = tl.arange(0, HEADER_WORDS)
    my_hdr = _header(h0, h1, h2, h3)
    sums = ws.to(tl.pointer_type(tl.float32))  # [M, N] pre-norm rows (fp32 scratch)
    ssp = sums + M * N  # [M, n_tiles] sums of squares per row and tile
    ll.publish_fence(ctrl + CTRL_SCRATCH, BACKEND)

    if ticket < n_tiles:
        # -------------------------------------------- GEMV tile, then its all-reduce
        hmask = ll.both(hl < HEADER_WORDS, ticket == 0)
        mine1 = hop1_off + (phase * WORLD + rank) * slot_words
        for i in tl.static_range(1, WORLD):
            peer = _ptr(table, (rank + i) % WORLD)
            ll.store(peer + mine1 + hl, ll.pack(my_hdr, flag), hmask, BACKEND)
        n0 = ticket * BN
        cols = n0 + tl.arange(0, BN)
        if USE_DOT:
            m0 = tl.full([], 0, tl.int32)
            while m0 < M:
                if DIRECT:
                    acc = _gemv_dot(x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, M, K, N, n0,
                                    m0, XDT, WDT, INT4, BM, BN, BK, NATIVE, STAGES)
                    _tile_publish(acc, m0 + tl.arange(0, BM), cols, M, N, flag, table, ctrl,
                                  rank, phase, hop1_off, slot_words, res_ptr, XDT, HAS_RES,
                                  WORLD, BACKEND)
                else:
                    failed_raw = _failed_flag(aux, BACKEND)
                    acc = _gemv_dot(x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, M, K, N, n0,
                                    m0, XDT, WDT, INT4, BM, BN, BK, NATIVE, STAGES)
                    _tile_reduce(acc, m0 + tl.arange(0, BM), cols, M, N, flag, seq, table, ctrl,
                                 aux, rank, phase, my_hdr, hop1_off, slot_words, limit, res_ptr,
                                 sums, ssp, ticket, n_tiles, failed_raw, XDT, HAS_RES, WORLD,
                                 BACKEND)
                m0 += BM
        else:
            m = tl.full([], 0, tl.int32)
            while m < M:
                if DIRECT:
                    acc = _partial_row(x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, K, N, n0,
                                       m, ids_ptr, tw_ptr, swe, sse, n_experts, XDT, WDT, INT4,
                                       BN, BK, TOPK, SLOTS)
                    _tile_publish(acc[None, :], m + tl.arange(0, 1), cols, M, N, flag, table,
                                  ctrl, rank, phase, hop1_off, slot_words, res_ptr, XDT,
                                  HAS_RES, WORLD, BACKEND)
                else:
                    failed_raw = _failed_flag(aux, BACKEND)
                    acc = _partial_row(x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, K, N, n0,
                                       m, ids_ptr, tw_ptr, swe, sse, n_experts, XDT, WDT, INT4,
                                       BN, BK, TOPK, SLOTS)
                    _tile_reduce(acc[None, :], m + tl.arange(0, 1), cols, M, N, flag, seq, table,
                                 ctrl, aux, rank, phase, my_hdr, hop1_off, slot_words, limit,
                                 res_ptr, sums, ssp, ticket, n_tiles, failed_raw, XDT, HAS_RES,
                                 WORLD, BACKEND)
                m += 1
    else:
        # -------------------------------------------- epilogue: RMSNorm of one row chunk
        # Program (row, part) waits until every tile program finished the row (one counter),
        # then normalises its ``epi_chunk`` columns of the all-reduced values the tile
        # programs left in the scratch. Every part of a row adds the same per-tile sums of
        # squares in the same order (same code, same block): the same ``inv`` in all of them.
        # Tickets guarantee every tile program is running before any epilogue program spins
        # (no starvation), and the interpreter runs the tiles first.
        e = ticket - n_tiles
        row = e // epi_parts
        c0 = (e - row * epi_parts) * epi_chunk
        if DIRECT:
            _epilogue_direct(row, e - row * epi_parts, c0, epi_chunk, M, N, eps, flag, seq,
                             table, ctrl, aux, rank, phase, my_hdr, hop1_off, slot_words, limit,
                             nw_ptr, out_ptr, res_out_ptr, XDT, WORLD, EPI_BLOCK, EPI_PARTS,
                             GEMMA, HAS_RES_OUT, SPANS, BACKEND)
        else:
            c = c0 + tl.arange(0, EPI_BLOCK)
            cm = (c < c0 + epi_chunk) & (c < N)
            # the norm weight does not depend on the tiles: loaded before the spin
            wn = _load_f32(nw_ptr + c, cm, XDT)
            if GEMMA:
                wn = wn + 1.0
            yes = tl.full([], 1, tl.int1)
            tiles_ok = _wait_row_tiles(aux, row, n_tiles, limit, ctrl, rank, seq, BACKEND)
            # Everything the tiles left, read at once after the acquire (no load waits for
            # another's value or for a reduction first).
            failed = ll.load(aux + AUX_FAILED, yes, BACKEND).to(tl.int32)
            t = tl.arange(0, BLOCK_TILES)
            ssv = tl.load(ssp + row * n_tiles + t, mask=t < n_tiles, other=0.0)
            base = row.to(tl.int64) * N
            acc = tl.load(sums + base + c, mask=cm, other=0.0)
            ok = tiles_ok & (ll.all_warps_max(failed) == 0)
            inv = tl.math.rsqrt(tl.sum(ssv, 0) / N + eps)
            _epi_store(acc, inv, wn, out_ptr, res_out_ptr, base, c, cm, ok, XDT, HAS_RES_OUT)

    n_words = M * N
    # (direct handoff: our partial's rows in our own slot, then the parts' sum-of-squares
    # words when a row has several)
    own_used = n_words + M * (2 * EPI_PARTS) if EPI_PARTS > 1 else n_words
    _scrub(table, rank, seq, n_words, 0, hop1_off, slot_words, hop2_off, hop2_words,
           1, WORLD, False, BACKEND, OWN=DIRECT, own_used=own_used)
    _finish(ctrl, aux, seq, M)


@triton.jit
def _finish(ctrl, aux, seq, M):
    """The last program of the launch publishes ``seq`` and resets the counters: the done
    counter, the ticket, the failure flag and the ``M`` row counters (several epilogue
    programs read a row's counter, so none of them may reset it; every one of them has
    counted itself done before the last program gets here)."""
    n = tl.num_programs(0) * tl.num_programs(1)
    # Relaxed, as triton_mailbox._finish: a program's seq load matters only if it is the last
    # one, which then stores that value; the next launch sees these stores by stream order.
    # (acq_rel measured 0.4 us slower per call on H200 and did not change the open hang in
    # bench/results/h200x2-s3-run6.log.)
    old = tl.atomic_add(ctrl + CTRL_DONE, 1, sem="relaxed", scope="gpu")
    if old == n - 1:
        r = tl.arange(0, ROWS_BLOCK)
        tl.store(aux + AUX_ROWS + r, tl.zeros([ROWS_BLOCK], tl.int64), mask=r < M)
        tl.store(ctrl + CTRL_DONE, 0)
        tl.store(aux + AUX_TICKET, 0)
        tl.store(aux + AUX_FAILED, 0)
        tl.store(ctrl + CTRL_SEQ, seq)


@triton.jit
def linear_qk_rms_norm_kernel(
    x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, qkv_ptr, qw_ptr, kw_ptr,
    M, K, N, q_cols, k_cols, n_tiles, eps, ws, epi_parts, epi_chunk,
    table, ctrl, aux, rank, h0, h1, h2, h3,
    hop1_off, slot_words, hop2_off, hop2_words, limit,
    XDT: tl.constexpr, WDT: tl.constexpr, INT4: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
    STAGES: tl.constexpr,
    NATIVE: tl.constexpr, BLOCK_TILES: tl.constexpr, EPI_BLOCK: tl.constexpr,
    WORLD: tl.constexpr, BACKEND: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Column-parallel QKV projection with the TP-sharded Q/K RMSNorm in its epilogue
    (DESIGN.md §4 ``qk_rms_norm``): ``qkv [M, N] = x [M, K] @ W [K, N]`` in x's dtype, with
    columns ``[0, q_cols)`` this rank's q shard and ``[q_cols, q_cols + k_cols)`` its k
    shard, then ``q = q * rsqrt(sum_r ss_q,r / (q_cols * WORLD) + eps) * q_weight`` (k
    alike), where ``ss`` is the sum of squares of the rounded q (k) row. v is left as
    projected. One launch of ``n_tiles + M`` programs, tickets as
    ``linear_add_rms_norm_kernel``:

    * ticket ``t < n_tiles``: the GEMV of columns ``[t*BN, (t+1)*BN)``, stored rounded, and
      the tile's q and k sums of squares per row in the scratch ``ws`` (no communication);
      then the row counters.
    * ticket ``t >= n_tiles``: part ``p`` of row ``m`` (``t - n_tiles = m * epi_parts + p``)
      waits for the row's tiles, adds the tile sums in tile order, all-reduces the two sums
      with the peers' row ``m`` (payload words ``2m``, ``2m + 1``, exactly as
      ``qk_rms_norm_kernel``; every part of the row publishes the same two packets), and
      normalises its ``epi_chunk`` columns of ``[0, q_cols + k_cols)`` in place
      (``epi_chunk <= EPI_BLOCK``).
    """
    ll.await_prior_kernel(PDL, BACKEND)
    seq = _load_seq(ctrl, BACKEND)
    ticket = tl.atomic_add(aux + AUX_TICKET, 1, sem="relaxed")
    ssp = ws.to(tl.pointer_type(tl.float32))  # [M, 2, n_tiles] q / k sums of squares
    if ticket < n_tiles:
        n0 = ticket * BN
        cols = n0 + tl.arange(0, BN)
        isq = cols < q_cols
        isk = (cols >= q_cols) & (cols < q_cols + k_cols)
        if USE_DOT:
            m0 = tl.full([], 0, tl.int32)
            while m0 < M:
                acc = _gemv_dot(x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, M, K, N, n0, m0,
                                XDT, WDT, INT4, BM, BN, BK, NATIVE, STAGES)
                rows = m0 + tl.arange(0, BM)
                rm = rows < M
                y = ll.from_f32(acc, XDT)
                tl.store(qkv_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], y,
                         mask=rm[:, None] & (cols < N)[None, :])
                yf = y.to(tl.float32)
                sq = tl.sum(tl.where(isq[None, :], yf * yf, 0.0), 1)
                sk = tl.sum(tl.where(isk[None, :], yf * yf, 0.0), 1)
                tl.store(ssp + (rows * 2) * n_tiles + ticket, sq, mask=rm)
                tl.store(ssp + (rows * 2 + 1) * n_tiles + ticket, sk, mask=rm)
                tl.atomic_add(aux + AUX_ROWS + rows, 1, mask=rm, sem="release", scope="gpu")
                m0 += BM
        else:
            m = tl.full([], 0, tl.int32)
            while m < M:
                acc = _partial_row(x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, K, N, n0, m,
                                   x_ptr, x_ptr, 0, 0, 0, XDT, WDT, INT4, BN, BK, 0, 1)
                y = ll.from_f32(acc, XDT)
                tl.store(qkv_ptr + m.to(tl.int64) * N + cols, y, mask=cols < N)
                yf = y.to(tl.float32)
                tl.store(ssp + (m * 2) * n_tiles + ticket, tl.sum(tl.where(isq, yf * yf, 0.0), 0))
                tl.store(ssp + (m * 2 + 1) * n_tiles + ticket,
                         tl.sum(tl.where(isk, yf * yf, 0.0), 0))
                tl.atomic_add(aux + AUX_ROWS + m, 1, sem="release", scope="gpu")
                m += 1
    else:
        e = ticket - n_tiles
        row = e // epi_parts
        part = e - row * epi_parts
        c0 = part * epi_chunk
        c = c0 + tl.arange(0, EPI_BLOCK)
        cm = (c < c0 + epi_chunk) & (c < q_cols + k_cols)
        in_q = c < q_cols
        # the chunk's norm weights (q's, then k's) do not depend on anything: loaded before
        # the spin
        wv = tl.where(in_q, _load_f32(qw_ptr + c, cm & in_q, XDT),
                      _load_f32(kw_ptr + tl.where(in_q, 0, c - q_cols), cm & (in_q == 0), XDT))
        tiles_ok = _wait_row_tiles(aux, row, n_tiles, limit, ctrl, rank, seq, BACKEND)
        # the tiles' sums of squares and the chunk's projected values, read at once after the
        # acquire: the values are in registers before the exchange's wait starts
        t = tl.arange(0, BLOCK_TILES)
        tm = t < n_tiles
        sqv = tl.load(ssp + (row * 2) * n_tiles + t, mask=tm, other=0.0)
        skv = tl.load(ssp + (row * 2 + 1) * n_tiles + t, mask=tm, other=0.0)
        base = qkv_ptr + row.to(tl.int64) * N
        v = _load_f32(base + c, cm, XDT)
        sq = tl.sum(sqv, 0)
        sk = tl.sum(skv, 0)
        lane = tl.arange(0, 2)
        vals = tl.where(lane == 0, sq, sk)
        acc, _, failed = _exchange(
            2 * row + lane, lane < 2, lane < 2, ll.elem_bits(vals, 0), vals, vals * 0.0,
            (row == 0) & (part == 0),
            table, ctrl, rank, seq, h0, h1, h2, h3, 2 * M, 0,
            hop1_off, slot_words, hop2_off, hop2_words, limit, 0, 1, WORLD, False, BACKEND,
        )
        ok = (failed == 0) & tiles_ok
        iq = tl.math.rsqrt(tl.sum(tl.where(lane == 0, acc, 0.0), 0) / (q_cols * WORLD) + eps)
        ik = tl.math.rsqrt(tl.sum(tl.where(lane == 1, acc, 0.0), 0) / (k_cols * WORLD) + eps)
        inv = tl.where(in_q, iq, ik)
        tl.store(base + c, ll.from_f32((v * inv) * wv, XDT), mask=ll.both(cm, ok))
    _scrub(table, rank, seq, 2 * M, 0, hop1_off, slot_words, hop2_off, hop2_words,
           1, WORLD, False, BACKEND)
    _finish(ctrl, aux, seq, M)


@triton.jit
def linear_kernel(
    x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, out_ptr, M, K, N,
    ids_ptr, tw_ptr, swe, sse, n_experts,
    XDT: tl.constexpr, WDT: tl.constexpr, INT4: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
    STAGES: tl.constexpr,
    NATIVE: tl.constexpr, TOPK: tl.constexpr, SLOTS: tl.constexpr, ODT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The partial alone (no communication): ``out [M, N]`` (dtype code ``ODT``: fp32, or
    rounded once to bf16 / fp16 for a 16-bit all-reduce), one program per BN columns
    running exactly the GEMV tiles of ``linear_add_rms_norm_kernel`` (same helpers, same
    blocks), so it times the fused kernel's compute share and is the unfused path's GEMV."""
    ll.await_prior_kernel(PDL, ll.BACKEND_CUDA)  # (PDL is only ever set on CUDA)
    n0 = tl.program_id(0) * BN
    cols = n0 + tl.arange(0, BN)
    if USE_DOT:
        m0 = tl.full([], 0, tl.int32)
        while m0 < M:
            acc = _gemv_dot(x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, M, K, N, n0, m0,
                            XDT, WDT, INT4, BM, BN, BK, NATIVE, STAGES)
            rows = m0 + tl.arange(0, BM)
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :],
                     ll.from_f32(acc, ODT), mask=(rows < M)[:, None] & (cols < N)[None, :])
            m0 += BM
    else:
        m = tl.full([], 0, tl.int32)
        while m < M:
            acc = _partial_row(x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, K, N, n0, m,
                               ids_ptr, tw_ptr, swe, sse, n_experts, XDT, WDT, INT4, BN, BK, TOPK,
                               SLOTS)
            tl.store(out_ptr + m.to(tl.int64) * N + cols, ll.from_f32(acc, ODT), mask=cols < N)
            m += 1


@triton.jit
def moe_gate_up_kernel(
    x_ptr, ldx, ids_ptr, n_experts, w_ptr, swe, swk, swn, s_ptr, sse, lds, group, h_ptr, K, inter,
    TOPK: tl.constexpr, XDT: tl.constexpr, WDT: tl.constexpr, INT4: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False,
):
    """First half of a SiLU-gated MoE (the Triton stand-in for a framework's fused-MoE gate /
    up GEMM): program (j, r) computes routing slot ``r = m * TOPK + s`` columns
    ``[j*BN, (j+1)*BN)`` of ``h[r] = silu(x[m] @ W13[e][:, :I]) * (x[m] @ W13[e][:, I:])``,
    ``e = ids[r]`` (0 for ids outside [0, E)), rounded to x's dtype (``h`` ``[M*TOPK, I]`` contiguous). The down
    projection is ``linear_add_rms_norm_kernel`` / ``linear_kernel`` with ``TOPK``."""
    ll.await_prior_kernel(PDL, ll.BACKEND_CUDA)  # (PDL is only ever set on CUDA)
    r = tl.program_id(1).to(tl.int64)
    n0 = tl.program_id(0) * BN
    e = tl.load(ids_ptr + r).to(tl.int64)
    ok = (e >= 0) & (e < n_experts)  # else skipped: h = 0 (expert-parallel sentinel)
    e = tl.where(ok, e, 0)
    x_row = x_ptr + (r // TOPK) * ldx
    w_e = w_ptr + e * swe
    s_e = s_ptr + e * sse
    # gate and up columns in one [2*BN] tile: one K loop with twice the bytes in flight
    # (two loops one after the other measured 31 us per layer on H200 at the full shape)
    c2 = tl.arange(0, 2 * BN)
    is_up = c2 >= BN
    cc = n0 + tl.where(is_up, c2 - BN, c2)
    both = _gemv_cols(x_row, w_e, swk, swn, s_e, lds, group, K,
                      tl.where(is_up, inter + cc, cc), cc < inter, XDT, WDT, INT4, 2 * BN, BK)
    half = tl.reshape(both, [2, BN])
    which = tl.arange(0, 2)[:, None]
    gate = tl.sum(tl.where(which == 0, half, 0.0), 0)
    up = tl.sum(tl.where(which == 1, half, 0.0), 0)
    h = tl.where(ok, gate / (1.0 + tl.exp(-gate)) * up, 0.0)
    cols = n0 + tl.arange(0, BN)
    tl.store(h_ptr + r * inter + cols, ll.from_f32(h, XDT), mask=cols < inter)


@triton.jit
def fill_words_kernel(ptr, n_words, value, BLOCK: tl.constexpr):
    """``ptr[0:n_words] = value`` (int64): initialises a workspace."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(ptr + offs, tl.full([BLOCK], 0, tl.int64) + value, mask=offs < n_words)


ll.interpreter_fast_calls(globals(), keep=("linear_add_rms_norm_kernel", "linear_kernel",
                                         "linear_qk_rms_norm_kernel",
                                         "moe_gate_up_kernel", "fill_words_kernel"))
