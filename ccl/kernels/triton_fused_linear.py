"""Row-parallel projection fused with the mailbox all-reduce and residual-add + RMSNorm, in one
Triton launch (DESIGN.md §4 ``linear_all_reduce_add_rms_norm``): the all-reduce lives inside
the GEMV. Same wire format and device layout as ``ccl.kernels.triton_mailbox`` (LL8 packets,
hop-1 slots ``[phase][src]`` with a 4-word header then payload at ``PAYLOAD_OFFSET``), whose
helpers and constants this module imports.

One launch has ``n_tiles + M`` programs. Each program first takes a **ticket** from a counter
(``aux[AUX_TICKET]``); tickets, not program ids, assign the work:

* ticket ``t < n_tiles`` -- GEMV tile: the fp32 partial ``x[:, :] @ W[:, t*BN:(t+1)*BN]`` of
  this rank, pushed as LL8 packets (one fp32 per packet, payload word ``m * N + n``) into every
  peer's hop-1 slot, and into this rank's own workspace ``ws`` (an LL8 array that only this
  rank writes and reads). It never waits.
* ticket ``t >= n_tiles`` -- epilogue row ``m = t - n_tiles``: waits for row m of every
  source (its own from ``ws``, peers' from its inbox), sums them in rank order 0..WORLD-1 in
  fp32 (so every rank holds bitwise-identical sums), adds the residual and applies RMSNorm.

Tickets make the dependency safe everywhere: a program only gets an epilogue ticket after
every GEMV ticket was handed to a program that is already running (so spinning epilogue
programs can never starve the GEMV tiles they wait for of SMs), and under the Triton
interpreter, which runs one launch's programs one after another, tickets follow program
order: epilogue programs wait only on earlier programs of their own rank and on other ranks'
GEMV tiles, which never wait.

The partial travels in fp32 (no rounding between the GEMV and the norm). Sequence number,
done counter, status words and bounded waits are those of ``triton_mailbox`` (``ctrl``);
the last program to finish publishes ``seq`` and resets the done counter and the ticket.
Every 2^31 calls the unused tails of our peers' slots (``_scrub``) and of ``ws`` are
rewritten with the current flag, so no stale word can carry a matching 32-bit flag.

INT4 weights: GPTQ / AutoRound symmetric (vLLM's layout, see ``ccl.fused_linear``):
qweight int32 ``[K/8, N]`` (nibble ``k % 8`` of word ``[k // 8, n]``), scales ``[K/G, N]``,
value ``(nibble - 8) * scale`` computed in fp32 (exact), fp32 accumulation.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ccl.kernels import ll
from ccl.kernels.triton_mailbox import (
    CTRL_DONE,
    CTRL_HEADERS,
    CTRL_MISMATCH,
    CTRL_MISSING,
    CTRL_SCRATCH,
    CTRL_SEQ,
    CTRL_STATUS,
    HEADER_WORDS,
    PAYLOAD_OFFSET,
    SCRUB_BLOCK,
    SCRUB_MASK,
    _header,
    _load_f32,
    _load_seq,
    _ptr,
    _scrub,
    _wait_peer,
)

AUX_TICKET = tl.constexpr(0)  # next ticket of the running launch
AUX_WORDS = 8

OP_LINEAR_ADD_RMS_NORM = 5  # header op code (1..4 are triton_mailbox's / the host's)
FLAG_RESIDUAL, FLAG_GEMMA, FLAG_INT4 = 0x01, 0x02, 0x10


@triton.jit
def _gemv_tile(
    x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, M, K, N, n0, m0,
    XDT: tl.constexpr, WDT: tl.constexpr, INT4: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
):
    """fp32 ``x[m0:m0+BM, :] @ W[:, n0:n0+BN]`` (rows/columns past M/N are 0)."""
    rows = m0 + tl.arange(0, BM)
    cols = n0 + tl.arange(0, BN)
    rmask = rows < M
    cmask = cols < N
    acc = tl.zeros([BM, BN], tl.float32)
    k0 = tl.full([], 0, tl.int32)
    while k0 < K:
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        xt = _load_f32(x_ptr + rows.to(tl.int64)[:, None] * ldx + ks[None, :],
                       rmask[:, None] & kmask[None, :], XDT)
        wmask = kmask[:, None] & cmask[None, :]
        if INT4:
            q = tl.load(w_ptr + (ks // 8).to(tl.int64)[:, None] * swk + cols[None, :] * swn,
                        mask=wmask, other=0)
            nib = (q >> ((ks % 8) * 4)[:, None]) & 0xF
            sc = _load_f32(s_ptr + (ks // group).to(tl.int64)[:, None] * lds + cols[None, :],
                           wmask, WDT)
            wt = (nib - 8).to(tl.float32) * sc
        else:
            wt = _load_f32(w_ptr + ks.to(tl.int64)[:, None] * swk + cols[None, :] * swn,
                           wmask, WDT)
        if USE_DOT:
            acc += tl.dot(xt, wt, input_precision="ieee")
        else:
            acc += tl.sum(xt[:, :, None] * wt[None, :, :], 1)
        k0 += BK
    return acc


@triton.jit
def linear_add_rms_norm_kernel(
    x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group,
    res_ptr, nw_ptr, out_ptr, res_out_ptr,
    M, K, N, n_tiles, eps, ws, ws_words,
    table, ctrl, aux, rank, h0, h1, h2, h3,
    hop1_off, slot_words, hop2_off, hop2_words, limit,
    XDT: tl.constexpr, WDT: tl.constexpr, INT4: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_ROW: tl.constexpr, WORLD: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_RES_OUT: tl.constexpr, GEMMA: tl.constexpr,
    BACKEND: tl.constexpr,
):
    """``out, res_out = add_rms_norm(sum_r x_r @ W_r (+ residual))`` for x ``[M, K]`` (row
    stride ``ldx``), W ``[K, N]`` (strides ``swk``, ``swn``; INT4: qweight strides of the
    packed ``[K/8, N]``), residual / outputs ``[M, N]`` contiguous, norm weight ``[N]``.
    Outputs may alias the residual (each epilogue program reads its row before writing)."""
    seq = _load_seq(ctrl, BACKEND)
    ticket = tl.atomic_add(aux + AUX_TICKET, 1)
    flag = seq & ll.LOW32
    phase = seq & 1
    hl = tl.arange(0, HEADER_WORDS)
    my_hdr = _header(h0, h1, h2, h3)
    me = _ptr(table, rank)
    one = tl.full([], 1, tl.int64)
    ll.publish_fence(ctrl + CTRL_SCRATCH, BACKEND)

    if ticket < n_tiles:
        # ---------------------------------------------------------------- GEMV tile + push
        hmask = ll.both(hl < HEADER_WORDS, ticket == 0)
        mine1 = hop1_off + (phase * WORLD + rank) * slot_words  # our slot in a peer's hop 1
        for i in tl.static_range(1, WORLD):
            peer = _ptr(table, (rank + i) % WORLD)
            ll.store(peer + mine1 + hl, ll.pack(my_hdr, flag), hmask, BACKEND)
        n0 = ticket * BN
        m0 = tl.full([], 0, tl.int32)
        while m0 < M:
            acc = _gemv_tile(x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, M, K, N, n0, m0,
                             XDT, WDT, INT4, BM, BN, BK, USE_DOT)
            rows = m0 + tl.arange(0, BM)
            cols = n0 + tl.arange(0, BN)
            words = rows[:, None] * N + cols[None, :]
            wmask = (rows < M)[:, None] & (cols < N)[None, :]
            packets = ll.pack(acc.to(tl.int32, bitcast=True), flag)
            for i in tl.static_range(1, WORLD):
                peer = _ptr(table, (rank + i) % WORLD)
                ll.store(peer + mine1 + PAYLOAD_OFFSET + words, packets, wmask, BACKEND)
            ll.store(ws + words, packets, wmask, BACKEND)
            m0 += BM
    else:
        # ---------------------------------------------------------------- epilogue row
        row = ticket - n_tiles
        c = tl.arange(0, BLOCK_ROW)
        cm = c < N
        words = row * N + c
        none = cm & (c < 0)
        own, _, own_ok = ll.wait(ws + words, cm, ws + words, none, flag, limit, BACKEND)
        failed = (own_ok == 0).to(tl.int32)
        tl.atomic_or(ctrl + CTRL_MISSING, one << rank, mask=own_ok == 0)
        tl.atomic_max(ctrl + CTRL_STATUS, tl.full([], 1, tl.int64), mask=own_ok == 0)
        own_v = ll.bits_to_f32(ll.data_of(own), 0)
        acc = tl.zeros([BLOCK_ROW], tl.float32)
        for src in tl.static_range(WORLD):
            is_me = rank == src
            slot = me + hop1_off + (phase * WORLD + src) * slot_words
            lim = tl.where(failed != 0, 0, limit)
            got, theirs, st = _wait_peer(
                slot + PAYLOAD_OFFSET + words, ll.both(cm, is_me == 0), slot,
                ll.both(hl < HEADER_WORDS, is_me == 0), my_hdr, flag, lim, BACKEND,
            )
            bit = one << src
            tl.atomic_or(ctrl + CTRL_MISSING, bit, mask=st == 1)
            tl.atomic_or(ctrl + CTRL_MISMATCH, bit, mask=st == 2)
            tl.store(ctrl + CTRL_HEADERS + 4 * src + hl, ll.data_of(theirs),
                     mask=ll.both(hl < HEADER_WORDS, st == 2))
            tl.store(ctrl + CTRL_HEADERS + 4 * rank + hl, my_hdr,
                     mask=ll.both(hl < HEADER_WORDS, st == 2))
            tl.atomic_max(ctrl + CTRL_STATUS, st.to(tl.int64), mask=st != 0)
            failed = failed | (st != 0).to(tl.int32)
            v = tl.where(is_me, own_v, ll.bits_to_f32(ll.data_of(got), 0))
            if src == 0:
                acc = v
            else:
                acc = acc + v
        base = row.to(tl.int64) * N
        if HAS_RES:
            acc = acc + _load_f32(res_ptr + base + c, cm, XDT)
        ss = tl.sum(tl.where(cm, acc * acc, 0.0), 0)
        inv = tl.math.rsqrt(ss / N + eps)
        wn = _load_f32(nw_ptr + c, cm, XDT)
        if GEMMA:
            wn = wn + 1.0
        ok = failed == 0
        if HAS_RES_OUT:
            tl.store(res_out_ptr + base + c, ll.from_f32(acc, XDT), mask=ll.both(cm, ok))
        tl.store(out_ptr + base + c, ll.from_f32((acc * inv) * wn, XDT), mask=ll.both(cm, ok))

    n_words = M * N
    _scrub(table, rank, seq, n_words, 0, hop1_off, slot_words, hop2_off, hop2_words,
           1, WORLD, False, BACKEND)
    _scrub_workspace(ws, ws_words, n_words, seq, BACKEND)
    _finish(ctrl, aux, seq)


@triton.jit
def _scrub_workspace(ws, ws_words, n_words, seq, BACKEND: tl.constexpr):
    """Every 2^31 calls, rewrite the unused tail of the workspace with the current flag."""
    if (seq & SCRUB_MASK) < 2:
        flag = seq & ll.LOW32
        offs = tl.arange(0, SCRUB_BLOCK)
        fill = ll.pack(offs * 0, flag)
        t = n_words + tl.program_id(0) * SCRUB_BLOCK
        step = tl.num_programs(0) * SCRUB_BLOCK
        while t < ws_words:
            ll.store(ws + t + offs, fill, t + offs < ws_words, BACKEND)
            t += step


@triton.jit
def _finish(ctrl, aux, seq):
    """The last program of the launch publishes ``seq`` and resets the counters."""
    n = tl.num_programs(0) * tl.num_programs(1)
    old = tl.atomic_add(ctrl + CTRL_DONE, 1, sem="acq_rel", scope="gpu")
    if old == n - 1:
        tl.store(ctrl + CTRL_DONE, 0)
        tl.store(aux + AUX_TICKET, 0)
        tl.store(ctrl + CTRL_SEQ, seq)


@triton.jit
def linear_kernel(
    x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, out_ptr, M, K, N,
    XDT: tl.constexpr, WDT: tl.constexpr, INT4: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
):
    """The GEMV alone (no communication): fp32 ``out [M, N] = x @ W``, one program per BN
    columns looping over M exactly like the GEMV tiles of ``linear_add_rms_norm_kernel``
    (same ``_gemv_tile``, same blocks), so it times the fused kernel's compute share."""
    n0 = tl.program_id(0) * BN
    m0 = tl.full([], 0, tl.int32)
    while m0 < M:
        acc = _gemv_tile(x_ptr, ldx, w_ptr, swk, swn, s_ptr, lds, group, M, K, N, n0, m0,
                         XDT, WDT, INT4, BM, BN, BK, USE_DOT)
        rows = m0 + tl.arange(0, BM)
        cols = n0 + tl.arange(0, BN)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc,
                 mask=(rows < M)[:, None] & (cols < N)[None, :])
        m0 += BM


@triton.jit
def fill_words_kernel(ptr, n_words, value, BLOCK: tl.constexpr):
    """``ptr[0:n_words] = value`` (int64): initialises a workspace."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(ptr + offs, tl.full([BLOCK], 0, tl.int64) + value, mask=offs < n_words)


ll.interpreter_fast_calls(globals(), keep=("linear_add_rms_norm_kernel", "linear_kernel",
                                         "fill_words_kernel"))
