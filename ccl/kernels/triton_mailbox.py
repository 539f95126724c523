"""Device mailbox kernels in Triton: one source for CUDA, ROCm and Intel XPU (and the Triton
interpreter, which CI runs on host shared memory).

The protocol is the CPU one (DESIGN.md §3, csrc/host/mailbox.cpp): LL8 packets
(``ccl.kernels.ll``), hop-1 slots ``[phase][src]`` with a 4-word header then payload (at
``PAYLOAD_OFFSET``), hop-2 slots ``[phase][src]`` carrying fp32 reduced shards for two-shot;
offsets in ``ccl.device_mailbox.DeviceLayout``. Words are indexed in int64 units from each
region's base; region bases come from a pointer table (an int64 tensor of every rank's base
address as mapped in this process).

Per-launch state lives in a small int64 control tensor of the owning rank (``CTRL_*``):
every program reads ``seq`` at start and uses ``seq + 1``; each program ends with an
``atomic_add`` on ``done``; the program that sees ``num_programs - 1`` stores the new
``seq`` and resets ``done``. So every word of one call carries the same flag whatever the
grid and the word -> program mapping, and nothing per call is a host argument (CUDA/XPU
graphs replay correctly). Stream order makes the next launch see the bump.

Interpreter constraint (TRITON_INTERPRET=1 runs the programs of one launch one after
another): a program only ever waits on words that *other ranks'* programs write, and each
program pushes everything its peers' same-index program needs before it waits. Concretely:
one-shot program j pushes word block j and waits for block j; two-shot program j pushes the
lanes of block j to their owners, reduces the lanes it owns (waiting on the peers' program
j), pushes those sums, then waits for the other owners' sums of block j (their program j).
The fused norms give each program whole rows, so no program needs another program's
result (and outputs may alias inputs: a program reads its whole row before writing it).

Bounded spins: every wait gives up after ``limit`` polls (Intel GPUs have no device timer),
records ``1 << src`` in ``ctrl[CTRL_MISSING]`` and the status code in ``ctrl[CTRL_STATUS]``,
stops waiting for anything else and still finishes (seq bump included): the kernel never
hangs. A peer header that differs from ours (op, dtype, sizes, eps, algorithm) is recorded
as a mismatch (``ctrl[CTRL_MISMATCH]`` mask, the peer's header in ``ctrl[CTRL_HEADERS +
4*src:]``) and nothing is written to the outputs.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ccl.kernels import ll

__all__ = [
    "all_reduce_kernel",
    "add_rms_norm_kernel",
    "qk_rms_norm_kernel",
    "fill_kernel",
    "CTRL_WORDS",
]

# Control tensor (int64 words), one per rank per communicator.
CTRL_SEQ = tl.constexpr(0)  # sequence number of the last call
CTRL_DONE = tl.constexpr(1)  # programs of the running launch that finished
CTRL_STATUS = tl.constexpr(2)  # max status code seen (0 ok, 1 timeout, 2 mismatch)
CTRL_MISSING = tl.constexpr(3)  # bit r: a wait on rank r expired
CTRL_MISMATCH = tl.constexpr(4)  # bit r: rank r's header differed from ours
CTRL_SCRATCH = tl.constexpr(5)  # target of the release-fence atomics
CTRL_WHERE = tl.constexpr(6)  # bit 0: a hop-1/header wait expired, bit 1: a hop-2 wait expired
CTRL_FAIL_SEQ = tl.constexpr(7)  # largest sequence number of a call that failed
CTRL_HEADERS = tl.constexpr(8)  # [64][4] headers received from mismatching ranks
# Diagnostics (never reset by kernels; DeviceMailbox.wait_stats reads and clears them):
CTRL_MAX_SPINS = tl.constexpr(8 + 4 * 64)  # most polls any hop-1 wait took
CTRL_LONG_WAITS = tl.constexpr(8 + 4 * 64 + 1)  # hop-1 waits longer than LONG_WAIT_SPINS polls
CTRL_WORDS = 8 + 4 * 64 + 8
LONG_WAIT_SPINS = tl.constexpr(4096)  # ~1 ms on H200

HEADER_WORDS = tl.constexpr(4)  # csrc/common/ll_packet.h kHeaderWords
MISMATCH = tl.constexpr(1 << 30)  # _wait_peer's poll code for "a header differs"
PAYLOAD_OFFSET = tl.constexpr(16)  # payload packets start 128 bytes into a hop-1 slot
SCRUB_MASK = tl.constexpr(0x7FFFFFFF)  # scrub when (seq & mask) < 2, as the C++ code
SCRUB_BLOCK = tl.constexpr(256)

# The per-call sequence number is read with an L1-bypassing load by default: it is written by
# the last program of the previous launch, possibly on another SM. CCL_SEQ_PLAIN_LOAD=1 (read
# at import) restores a default load, for A/B runs of bench/stall_probe.py.
SEQ_VOLATILE = tl.constexpr(os.environ.get("CCL_SEQ_PLAIN_LOAD", "0") != "1")

STATUS_OK = 0
STATUS_TIMEOUT = 1
STATUS_MISMATCH = 2


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _ptr(table, r):
    """Base of rank ``r``'s region (int64 words) from the pointer table."""
    return tl.load(table + r).to(tl.pointer_type(tl.int64))


@triton.jit
def _load_seq(ctrl, BACKEND: tl.constexpr):
    """Sequence number of this launch: the last one's plus 1."""
    if SEQ_VOLATILE:
        if (BACKEND == ll.BACKEND_XPU) or (BACKEND == ll.BACKEND_XPU_ATOMIC):
            s = tl.load(ctrl + CTRL_SEQ, cache_modifier=".cv", volatile=True)
        else:
            s = tl.load(ctrl + CTRL_SEQ, volatile=True)
    else:
        s = tl.load(ctrl + CTRL_SEQ)
    return s + 1


@triton.jit
def _load_pair(ptr, e_lo, m_lo, e_hi, m_hi, DTYPE: tl.constexpr):
    """This rank's payload words from elements ``ptr[e_lo]`` (and ``ptr[e_hi]`` for 16-bit
    dtypes): returns (data bits as int64, fp32 values lo, fp32 values hi). Masked elements
    are 0 (a zero-padded last word, as the C++ ``raw_word``)."""
    if DTYPE == 0:
        b_lo = ll.elem_bits(tl.load(ptr + e_lo, mask=m_lo, other=0.0), DTYPE)
        data = b_lo
        hi = tl.zeros(e_lo.shape, tl.float32)
    else:
        b_lo = ll.elem_bits(tl.load(ptr + e_lo, mask=m_lo, other=0.0), DTYPE)
        b_hi = ll.elem_bits(tl.load(ptr + e_hi, mask=m_hi, other=0.0), DTYPE)
        data = b_lo | (b_hi << 16)
        hi = ll.bits_to_f32(b_hi, DTYPE)
    return data, ll.bits_to_f32(b_lo, DTYPE), hi


@triton.jit
def _load_f32(ptrs, mask, DTYPE: tl.constexpr):
    """Elements of ``DTYPE`` as fp32 (exact; masked lanes 0)."""
    return ll.bits_to_f32(ll.elem_bits(tl.load(ptrs, mask=mask, other=0.0), DTYPE), DTYPE)


@triton.jit
def _header(h0, h1, h2, h3):
    hl = tl.arange(0, HEADER_WORDS)
    h = tl.where(hl == 0, h0, tl.where(hl == 1, h1, tl.where(hl == 2, h2, h3)))
    return h.to(tl.int64) & ll.LOW32


@triton.jit
def _poll_code(rw, rh, h, hmask, my_hdr, SPANS: tl.constexpr):
    """One poll's verdict, the same in every warp: MISMATCH when a header word that arrived
    differs from ours, else > 0 while words are missing, 0 when all arrived.

    The header block (4 words) is replicated across warps and each warp reads its own copy,
    so its sum is per warp. ``SPANS`` (the payload block has lanes in every warp, i.e. BLOCK
    >= 32 * num_warps: the host guarantees it where it passes True) folds that per-warp
    header code into the payload lanes, and one max over the payload block is then the
    cross-warp reduction: one shared-memory round per poll. Otherwise a sum over the payload
    and ``ll.all_warps_max`` make two."""
    hs = tl.sum(tl.where(rh, tl.where(hmask & (ll.data_of(h) != my_hdr), 16, 0), 1), 0)
    if SPANS:
        hcode = tl.where(hs >= 16, MISMATCH, hs)
        code = tl.max(tl.maximum((rw == 0).to(tl.int32), hcode), 0)
    else:
        code = ll.all_warps_max(
            tl.where(hs >= 16, MISMATCH, tl.sum((rw == 0).to(tl.int32), 0) + hs)
        )
    return code


@triton.jit
def _wait_peer(ptr, mask, hptr, hmask, my_hdr, flag, limit, ctrl, BACKEND: tl.constexpr,
               SPANS: tl.constexpr = False):
    """Bounded spin on one source's payload words and header. Returns (words, header words,
    status): 0 ready, 1 timed out, 2 the header differs from ours (stops at once). A header
    lane counts 1 while not ready, 16 when ready but different (at most 4 lanes, so >= 16
    means a mismatch); ``_poll_code`` makes the verdict uniform across warps (``SPANS``: see
    there)."""
    hl = tl.arange(0, HEADER_WORDS)
    w = ll.load(ptr, mask, BACKEND)
    h = ll.load(hptr + hl, hmask, BACKEND)
    rw = (ll.flag_of(w) == flag) | (mask == 0)
    rh = (ll.flag_of(h) == flag) | (hmask == 0)
    code = _poll_code(rw, rh, h, hmask, my_hdr, SPANS)
    spins = 0
    while (code > 0) & (code < MISMATCH) & (spins < limit):
        w = tl.where(rw, w, ll.load(ptr, mask & (rw == 0), BACKEND))
        h = tl.where(rh, h, ll.load(hptr + hl, hmask & (rh == 0), BACKEND))
        rw = (ll.flag_of(w) == flag) | (mask == 0)
        rh = (ll.flag_of(h) == flag) | (hmask == 0)
        code = _poll_code(rw, rh, h, hmask, my_hdr, SPANS)
        spins += 1
    status = tl.where(code >= MISMATCH, 2, tl.where(code > 0, 1, 0))
    if spins > LONG_WAIT_SPINS:  # uniform branch, off the fast path
        tl.atomic_max(ctrl + CTRL_MAX_SPINS, spins.to(tl.int64))
        tl.atomic_add(ctrl + CTRL_LONG_WAITS, 1)
    return w, h, status


@triton.jit
def _record_hop1_failure(ctrl, src, rank, st, theirs, my_hdr, seq):
    """Records a failed wait on source ``src`` (``_wait_peer`` status ``st``: 1 timed out,
    2 header mismatch, with ``theirs`` the header words received) in the control words the
    host turns into CollectiveTimeout / CollectiveMismatch."""
    hl = tl.arange(0, HEADER_WORDS)
    bit = tl.full([], 1, tl.int64) << src
    tl.atomic_or(ctrl + CTRL_MISSING, bit, mask=st == 1)
    tl.atomic_or(ctrl + CTRL_MISMATCH, bit, mask=st == 2)
    hm = ll.both(hl < HEADER_WORDS, st == 2)
    tl.store(ctrl + CTRL_HEADERS + 4 * src + hl, ll.data_of(theirs), mask=hm)
    tl.store(ctrl + CTRL_HEADERS + 4 * rank + hl, my_hdr, mask=hm)
    tl.atomic_max(ctrl + CTRL_STATUS, st.to(tl.int64))
    tl.atomic_or(ctrl + CTRL_WHERE, 1, mask=st == 1)
    tl.atomic_max(ctrl + CTRL_FAIL_SEQ, seq)


@triton.jit
def _exchange(
    w,
    wmask,
    pmask,
    my_data,
    own_lo,
    own_hi,
    first,
    table,
    ctrl,
    rank,
    seq,
    h0,
    h1,
    h2,
    h3,
    n_words,
    shard_words,
    hop1_off,
    slot_words,
    hop2_off,
    hop2_words,
    limit,
    WDT: tl.constexpr,
    EPW: tl.constexpr,
    WORLD: tl.constexpr,
    TWO_SHOT: tl.constexpr,
    BACKEND: tl.constexpr,
    SPANS: tl.constexpr = False,
    POLL_DELAY: tl.constexpr = 0,
    SIBS: tl.constexpr = 0,
    sib_ptr=None,
    sib_me=0,
    sib_src=None,
):
    """All-reduce of payload words ``w`` (a block of word indices, ``wmask`` valid) whose
    local data is ``my_data`` (int64, low 32 bits) and fp32 values ``own_lo``/``own_hi``
    (elements of word dtype ``WDT``: 0 fp32 one per word, 1 bf16 / 2 fp16 two per word).
    ``first``: this program publishes the header. Returns (sum lo, sum hi, failed): fp32
    sums in rank order 0..WORLD-1, identical on every rank and for both algorithms.

    ``SPANS``: the block ``w`` has lanes in every warp (BLOCK >= 32 * num_warps), so a poll
    needs one cross-warp reduction (``_poll_code``). ``POLL_DELAY``: nanoseconds to sleep
    between our publishes and the first poll (CUDA; a bench knob).

    ``pmask``: the words this program pushes (one-shot; ``wmask`` everywhere but the
    row-wide fused norm, whose programs each push their chunk and reduce the whole row).
    ``SIBS > 0`` (the row-wide norm): after our pushes, publish word ``sib_me`` at ``sib_ptr``
    ("done reading": its data depends on a reduction of ``sib_src``, the program's inputs, so
    it cannot be seen before those loads completed), then wait until all ``SIBS`` words carry
    the call's flag -- while the peers' words are still in flight."""
    flag = seq & ll.LOW32
    phase = seq & 1
    hl = tl.arange(0, HEADER_WORDS)
    my_hdr = _header(h0, h1, h2, h3)
    hdr_words = ll.pack(my_hdr, flag)
    hmask = ll.both(hl < HEADER_WORDS, first)
    my_words = ll.pack(my_data, flag)
    me = _ptr(table, rank)
    mine1 = hop1_off + (phase * WORLD + rank) * slot_words  # our slot in a peer's hop 1
    one = tl.full([], 1, tl.int64)

    ll.publish_fence(ctrl + CTRL_SCRATCH, BACKEND)
    # ---- hop 1 push: the whole block to every peer (one-shot), or each lane to its owner
    if TWO_SHOT:
        owner = tl.minimum(w // shard_words, WORLD - 1)
        for i in tl.static_range(1, WORLD):
            peer = _ptr(table, (rank + i) % WORLD)
            ll.store(peer + mine1 + hl, hdr_words, hmask, BACKEND)
        remote = wmask & (owner != rank)
        pbase = tl.load(table + owner, mask=remote, other=0).to(tl.pointer_type(tl.int64))
        ll.store(
            pbase + mine1 + PAYLOAD_OFFSET + (w - owner * shard_words), my_words, remote, BACKEND
        )
        need = wmask & (owner == rank)
        woff = PAYLOAD_OFFSET + (w - rank * shard_words)
    else:
        owner = w * 0 + rank
        for i in tl.static_range(1, WORLD):
            peer = _ptr(table, (rank + i) % WORLD)
            ll.store(peer + mine1 + hl, hdr_words, hmask, BACKEND)
            ll.store(peer + mine1 + PAYLOAD_OFFSET + w, my_words, pmask, BACKEND)
        need = wmask
        woff = PAYLOAD_OFFSET + w
    ll.publish_flush(ctrl + CTRL_SCRATCH, BACKEND)
    if POLL_DELAY > 0:
        ll.pause(POLL_DELAY, BACKEND)

    failed = tl.zeros([], tl.int32)
    if SIBS > 0:
        dep = tl.max(sib_src, 0).to(tl.int32, bitcast=True).to(tl.int64) & 1
        sl = tl.arange(0, SIBS)
        ll.store(sib_ptr + sl, ll.pack(dep | 0x80000000, flag), sl == sib_me, BACKEND)
        sw, _, sst = _wait_peer(sib_ptr + sl, sl < SIBS, sib_ptr, hl < 0, my_hdr, flag, limit,
                                ctrl, BACKEND)
        if sst != 0:  # a sibling program never got here: it is stuck on a peer (recorded)
            tl.atomic_max(ctrl + CTRL_STATUS, tl.full([], 1, tl.int64))
            tl.atomic_or(ctrl + CTRL_WHERE, 4)
            tl.atomic_max(ctrl + CTRL_FAIL_SEQ, seq)
        failed = failed | (sst != 0).to(tl.int32)
    # ---- reduce in rank order (one-shot: every lane; two-shot: the lanes we own)
    acc_lo = tl.zeros(own_lo.shape, tl.float32)
    acc_hi = tl.zeros(own_lo.shape, tl.float32)
    for src in tl.static_range(WORLD):
        is_me = rank == src
        slot = me + hop1_off + (phase * WORLD + src) * slot_words
        lim = tl.where(failed != 0, 0, limit)
        words, theirs, st = _wait_peer(
            slot + woff,
            ll.both(need, is_me == 0),
            slot,
            ll.both(hl < HEADER_WORDS, is_me == 0),
            my_hdr,
            flag,
            lim,
            ctrl,
            BACKEND,
            SPANS,
        )
        if st != 0:  # uniform branch: the bookkeeping costs nothing on the fast path
            _record_hop1_failure(ctrl, src, rank, st, theirs, my_hdr, seq)
        failed = failed | (st != 0).to(tl.int32)
        d = ll.data_of(words)
        if WDT == 0:
            v_lo = ll.bits_to_f32(d, WDT)
            v_hi = acc_hi
        else:
            v_lo = ll.bits_to_f32(d, WDT)
            v_hi = ll.bits_to_f32(d >> 16, WDT)
        v_lo = tl.where(is_me, own_lo, v_lo)
        v_hi = tl.where(is_me, own_hi, v_hi)
        if src == 0:
            acc_lo = v_lo
            acc_hi = v_hi
        else:
            acc_lo = acc_lo + v_lo
            acc_hi = acc_hi + v_hi

    # ---- two-shot hop 2: push our reduced lanes (fp32, one per word) and gather the rest
    if TWO_SHOT:
        e2 = (w - rank * shard_words) * EPW
        s_lo = ll.pack(acc_lo.to(tl.int32, bitcast=True), flag)
        s_hi = ll.pack(acc_hi.to(tl.int32, bitcast=True), flag)
        mine2 = hop2_off + (phase * WORLD + rank) * hop2_words
        # A reduce that failed publishes nothing: its peers then time out too instead of
        # taking garbage sums for valid ones.
        pub = ll.both(need, failed == 0)
        for i in tl.static_range(1, WORLD):
            peer = _ptr(table, (rank + i) % WORLD)
            ll.store(peer + mine2 + e2, s_lo, pub, BACKEND)
            if EPW == 2:
                ll.store(peer + mine2 + e2 + 1, s_hi, pub, BACKEND)
        ll.publish_flush(ctrl + CTRL_SCRATCH, BACKEND)
        rem = wmask & (owner != rank)
        src2 = (
            me + hop2_off + (phase * WORLD + owner) * hop2_words + (w - owner * shard_words) * EPW
        )
        lim = tl.where(failed != 0, 0, limit)
        if EPW == 2:
            rem_hi = rem
        else:
            rem_hi = rem & (w < 0)
        g_lo, g_hi, ok = ll.wait(src2, rem, src2 + 1, rem_hi, flag, lim, BACKEND, SPANS)
        if (ok == 0) & (failed == 0):
            late = rem & ((ll.flag_of(g_lo) != flag) | (rem_hi & (ll.flag_of(g_hi) != flag)))
            tl.atomic_or(ctrl + CTRL_MISSING + owner * 0, one << owner.to(tl.int64), mask=late)
            tl.atomic_max(ctrl + CTRL_STATUS, tl.full([], 1, tl.int64))
            tl.atomic_or(ctrl + CTRL_WHERE, 2)
            tl.atomic_max(ctrl + CTRL_FAIL_SEQ, seq)
        failed = failed | (ok == 0).to(tl.int32)
        acc_lo = tl.where(rem, ll.bits_to_f32(ll.data_of(g_lo), 0), acc_lo)
        acc_hi = tl.where(rem, ll.bits_to_f32(ll.data_of(g_hi), 0), acc_hi)
    return acc_lo, acc_hi, failed


@triton.jit
def _scrub(
    table,
    rank,
    seq,
    n_words,
    shard_words,
    hop1_off,
    slot_words,
    hop2_off,
    hop2_words,
    EPW: tl.constexpr,
    WORLD: tl.constexpr,
    TWO_SHOT: tl.constexpr,
    BACKEND: tl.constexpr,
    OWN: tl.constexpr = False,
    own_used=0,
):
    """Every 2^31 calls (both phases), rewrite the unused tails of our slots in every peer
    with the current flag, so no word keeps a flag older than 2^31 calls and a 32-bit flag
    never matches stale data after the sequence number wraps (csrc/host/mailbox.cpp).
    ``OWN``: also our own slot in our own region (unused by the exchange itself: the fused
    norm's and the fused linear's sibling words, the fused linear's own partial), whose
    first ``own_used`` payload words the caller wrote this call."""
    if (seq & SCRUB_MASK) < 2:
        flag = seq & ll.LOW32
        phase = seq & 1
        pid = tl.program_id(0)
        step = tl.num_programs(0) * SCRUB_BLOCK
        offs = tl.arange(0, SCRUB_BLOCK)
        fill = ll.pack(offs * 0, flag)
        for i in tl.static_range(0 if OWN else 1, WORLD):
            p = (rank + i) % WORLD
            peer = _ptr(table, p)
            s1 = peer + hop1_off + (phase * WORLD + rank) * slot_words
            s2 = peer + hop2_off + (phase * WORLD + rank) * hop2_words
            if TWO_SHOT:
                used1 = tl.minimum(tl.maximum(n_words - p * shard_words, 0), shard_words)
                used2 = tl.minimum(tl.maximum(n_words - rank * shard_words, 0), shard_words) * EPW
            else:
                used1 = n_words
                used2 = 0
            if OWN:
                used1 = tl.where(p == rank, own_used, used1)
            # (while loops: the interpreter's range() takes no tensor bounds)
            t = PAYLOAD_OFFSET + used1 + pid * SCRUB_BLOCK
            while t < slot_words:
                ll.store(s1 + t + offs, fill, t + offs < slot_words, BACKEND)
                t += step
            t = used2 + pid * SCRUB_BLOCK
            while t < hop2_words:
                ll.store(s2 + t + offs, fill, t + offs < hop2_words, BACKEND)
                t += step


@triton.jit
def _finish(ctrl, seq, SOLO: tl.constexpr):
    """Last program of the launch publishes ``seq`` and resets the done counter (returns
    whether this program was the last). ``SOLO`` (a one-program launch) stores it directly. Relaxed atomic: every program reaches it only
    after spins whose exit depends on the flag derived from its own ``seq`` load, so that load
    has completed; a release fence here would wait for the remote stores (~µs)."""
    if SOLO:
        tl.store(ctrl + CTRL_SEQ, seq)
        last = True
    else:
        n = tl.num_programs(0) * tl.num_programs(1)
        old = tl.atomic_add(ctrl + CTRL_DONE, 1, sem="relaxed", scope="gpu")
        last = old == n - 1
        if last:
            tl.store(ctrl + CTRL_DONE, 0)
            tl.store(ctrl + CTRL_SEQ, seq)
    return last


# ----------------------------------------------------------------------------- kernels
_COMMON = (
    "rank",
    "h0",
    "h1",
    "h2",
    "h3",
    "hop1_off",
    "slot_words",
    "hop2_off",
    "hop2_words",
    "limit",
)


# Integer arguments are not specialised (no "== 1" / "% 16" variants): one binary per
# (dtype, world, block, algorithm) whatever the sizes and the rank.
@triton.jit(do_not_specialize=("numel", "n_words", "shard_words") + _COMMON)
def all_reduce_kernel(
    x_ptr,
    out_ptr,
    numel,
    n_words,
    shard_words,
    table,
    ctrl,
    rank,
    h0,
    h1,
    h2,
    h3,
    hop1_off,
    slot_words,
    hop2_off,
    hop2_words,
    limit,
    DTYPE: tl.constexpr,
    EPW: tl.constexpr,
    WORLD: tl.constexpr,
    BLOCK: tl.constexpr,
    TWO_SHOT: tl.constexpr,
    SOLO: tl.constexpr,
    BACKEND: tl.constexpr,
    SPANS: tl.constexpr = False,
    POLL_DELAY: tl.constexpr = 0,
    PDL: tl.constexpr = False,
):
    """out = sum_r x_r over ``numel`` elements (``n_words`` payload words). Program j owns
    payload words [j*BLOCK, (j+1)*BLOCK). out may alias x. ``n_words == 0``: header-only
    handshake."""
    pid = tl.program_id(0)
    ll.await_prior_kernel(PDL, BACKEND)
    seq = _load_seq(ctrl, BACKEND)
    w = pid * BLOCK + tl.arange(0, BLOCK)
    wmask = w < n_words
    if DTYPE == 0:
        e_lo = w
        e_hi = w
    else:
        e_lo = 2 * w
        e_hi = 2 * w + 1
    m_lo = e_lo < numel
    m_hi = e_hi < numel
    data, own_lo, own_hi = _load_pair(x_ptr, e_lo, m_lo, e_hi, m_hi, DTYPE)
    acc_lo, acc_hi, failed = _exchange(
        w,
        wmask,
        wmask,
        data,
        own_lo,
        own_hi,
        pid == 0,
        table,
        ctrl,
        rank,
        seq,
        h0,
        h1,
        h2,
        h3,
        n_words,
        shard_words,
        hop1_off,
        slot_words,
        hop2_off,
        hop2_words,
        limit,
        DTYPE,
        EPW,
        WORLD,
        TWO_SHOT,
        BACKEND,
        SPANS,
        POLL_DELAY,
    )
    ok = failed == 0
    tl.store(out_ptr + e_lo, ll.from_f32(acc_lo, DTYPE), mask=ll.both(m_lo, ok))
    if DTYPE != 0:
        tl.store(out_ptr + e_hi, ll.from_f32(acc_hi, DTYPE), mask=ll.both(m_hi, ok))
    _scrub(
        table,
        rank,
        seq,
        n_words,
        shard_words,
        hop1_off,
        slot_words,
        hop2_off,
        hop2_words,
        EPW,
        WORLD,
        TWO_SHOT,
        BACKEND,
    )
    _finish(ctrl, seq, SOLO)


@triton.jit
def _row_sum_of_squares(rows_ptr, row, part, ss, failed, seq, ctrl, limit,
                        SPLIT: tl.constexpr, BACKEND: tl.constexpr):
    """Sum of squares of a whole row whose ``SPLIT`` parts are held by ``SPLIT`` programs of
    this launch (``part`` is ours, ``ss`` its partial). Each program publishes two LL8 words
    at ``rows_ptr`` (words ``[row][part][2]``: the partial, then whether its exchange failed),
    each with bit 31 of the data set as a "written" mark, then waits for all of the row's words
    and adds the partials in part order -- the same order on every rank and in every program,
    so the result is bitwise identical everywhere. A word must never survive from an earlier
    call with a matching 32-bit flag: the fused norm's words live in a scratch that the
    launch's last program zeroes after every call (``_clear_rows``); the fused linear's
    direct handoff puts them in our own hop-1 slot after the payload (a slot no peer writes),
    where they carry the call's flag and ``_scrub(OWN=True)`` refreshes the slot's unused tail
    every 2^31 calls. Returns (ss, failed).

    GPU only: programs wait on programs of the same launch, which must therefore all get to
    run (a launch of at most _MAX_SPLIT_PROGRAMS programs, far below the SM count; the fused
    linear's tickets order a row's parts). The Triton interpreter, which runs programs one
    after another, always gets ``SPLIT == 1``."""
    flag = seq & ll.LOW32
    mark = tl.full([], 0x80000000, tl.int64)
    two = tl.arange(0, 2)
    ss_bits = ss.to(tl.int32, bitcast=True).to(tl.int64) & 0x7FFFFFFF  # ss >= 0: the sign is ours
    mine = tl.where(two == 0, ss_bits, failed.to(tl.int64)) | mark
    base = rows_ptr + row * (2 * SPLIT)
    ll.store(base + 2 * part + two, ll.pack(mine, flag), two < 2, BACKEND)
    j = tl.arange(0, 2 * SPLIT)
    w = ll.load(base + j, j < 2 * SPLIT, BACKEND)
    ready = (ll.flag_of(w) == flag) & ((ll.data_of(w) & mark) != 0)
    pending = ll.all_warps_max(tl.sum((ready == 0).to(tl.int32), 0))
    spins = 0
    while (pending > 0) & (spins < limit):
        w = tl.where(ready, w, ll.load(base + j, ready == 0, BACKEND))
        ready = (ll.flag_of(w) == flag) & ((ll.data_of(w) & mark) != 0)
        pending = ll.all_warps_max(tl.sum((ready == 0).to(tl.int32), 0))
        spins += 1
    if pending > 0:  # a sibling program never published: it is stuck on a peer (recorded)
        tl.atomic_max(ctrl + CTRL_STATUS, tl.full([], 1, tl.int64))
        tl.atomic_or(ctrl + CTRL_WHERE, 4)
        tl.atomic_max(ctrl + CTRL_FAIL_SEQ, seq)
    d = ll.data_of(w) & 0x7FFFFFFF
    parts = tl.where((j % 2) == 0, d.to(tl.int32).to(tl.float32, bitcast=True), 0.0)
    total = tl.sum(parts, 0)
    bad = tl.sum(tl.where((j % 2) == 1, d, 0), 0) + pending
    return total, (bad != 0).to(tl.int32)


@triton.jit
def _clear_rows(rows_ptr, n, BACKEND: tl.constexpr):
    """Zeroes ``n`` words of the row scratch (the last program of a launch, when every
    program has read it)."""
    off = tl.arange(0, 256)
    t = 0
    while t < n:
        ll.store(rows_ptr + t + off, off.to(tl.int64) * 0, t + off < n, BACKEND)
        t += 256


@triton.jit(do_not_specialize=("cols", "wpr", "chunk", "eps", "shard_words") + _COMMON)
def add_rms_norm_kernel(
    x_ptr,
    res_ptr,
    weight_ptr,
    out_ptr,
    res_out_ptr,
    rows_ptr,
    cols,
    wpr,
    chunk,
    eps,
    shard_words,
    table,
    ctrl,
    rank,
    h0,
    h1,
    h2,
    h3,
    hop1_off,
    slot_words,
    hop2_off,
    hop2_words,
    limit,
    DTYPE: tl.constexpr,
    EPW: tl.constexpr,
    WORLD: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLIT: tl.constexpr,
    TWO_SHOT: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_RES_OUT: tl.constexpr,
    GEMMA: tl.constexpr,
    SOLO: tl.constexpr,
    BACKEND: tl.constexpr,
    SPANS: tl.constexpr = False,
    POLL_DELAY: tl.constexpr = 0,
    PDL: tl.constexpr = False,
    ROWWIDE: tl.constexpr = False,
):
    """Program (row, part) of a (rows, SPLIT) grid holds payload words [part*chunk,
    (part+1)*chunk) of one row of ``cols`` elements. Payload rows are padded to ``wpr`` words
    (``ceil(cols / elements per word)``) so no word straddles two rows. r = sum_r x_r (+
    residual), res_out = r, out = r * rsqrt(mean(r^2) + eps) * (weight (+1 for GEMMA)); fp32
    math, no intermediate rounding. Outputs may alias x / residual (a program reads its part of
    a row before it writes it). ``SPLIT == 1``: one program per row, no intra-launch waits
    (the interpreter's case); ``SPLIT > 1``: the parts' sums of squares meet in ``rows_ptr``
    (``_row_sum_of_squares``).

    ``ROWWIDE`` (``SPLIT > 1``, one-shot; ``BLOCK >= wpr``): each program pushes its chunk
    but reads and reduces the whole row itself, so no sum-of-squares exchange follows the
    peers' arrival. Outputs may alias the inputs, and a program writes only its chunk, so it
    first waits for a "done reading" word of every sibling, published right after the
    siblings' pushes (``_exchange``'s ``SIBS``): it is there long before the peers' words.
    Those words live in our own hop-1 slot after the rows (no peer writes it; they carry the
    call's flag, and ``_scrub(OWN=True)`` refreshes the slot's tail every 2^31 calls)."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    ll.await_prior_kernel(PDL, BACKEND)
    seq = _load_seq(ctrl, BACKEND)
    lane = tl.arange(0, BLOCK)
    n_words = tl.num_programs(0) * wpr
    if ROWWIDE:
        wr = lane  # the whole row; we push (and write) our chunk of it
        w = row * wpr + wr
        wmask = wr < wpr
        mine = wmask & (wr >= part * chunk) & (wr < part * chunk + chunk)
    else:
        wr = part * chunk + lane  # payload word within the row
        w = row * wpr + wr
        wmask = (lane < chunk) & (wr < wpr)
        mine = wmask
    if DTYPE == 0:
        c_lo = wr
        c_hi = wr
        m_lo = wmask & (c_lo < cols)
        m_hi = lane < 0
    else:
        c_lo = 2 * wr
        c_hi = 2 * wr + 1
        m_lo = wmask & (c_lo < cols)
        m_hi = wmask & (c_hi < cols)
    base = row.to(tl.int64) * cols
    data, own_lo, own_hi = _load_pair(x_ptr + base, c_lo, m_lo, c_hi, m_hi, DTYPE)
    # Residual and weight are loaded before the exchange: their memory latency then overlaps
    # the wait for the peers instead of following it.
    if HAS_RES:
        _, r_lo, r_hi = _load_pair(res_ptr + base, c_lo, m_lo, c_hi, m_hi, DTYPE)
    if ROWWIDE:
        o_lo = m_lo & mine  # the lanes this program writes
        o_hi = m_hi & mine
        sib_words = _ptr(table, rank) + hop1_off + ((seq & 1) * WORLD + rank) * slot_words
        sib_words += PAYLOAD_OFFSET + n_words + row * SPLIT
        deps = own_lo + own_hi  # what the "done reading" word waits for
        if HAS_RES:
            deps = deps + r_lo + r_hi
    else:
        o_lo = m_lo
        o_hi = m_hi
        sib_words = table
        deps = own_lo
    _, w_lo, w_hi = _load_pair(weight_ptr, c_lo, o_lo, c_hi, o_hi, DTYPE)
    acc_lo, acc_hi, failed = _exchange(
        w,
        wmask,
        mine,
        data,
        own_lo,
        own_hi,
        (row == 0) & (part == 0),
        table,
        ctrl,
        rank,
        seq,
        h0,
        h1,
        h2,
        h3,
        n_words,
        shard_words,
        hop1_off,
        slot_words,
        hop2_off,
        hop2_words,
        limit,
        DTYPE,
        EPW,
        WORLD,
        TWO_SHOT,
        BACKEND,
        SPANS,
        POLL_DELAY,
        SPLIT if ROWWIDE else 0,
        sib_words,
        part,
        deps,
    )
    if HAS_RES:
        acc_lo = acc_lo + r_lo
        acc_hi = acc_hi + r_hi
    ss = tl.sum(tl.where(m_lo, acc_lo * acc_lo, 0.0), 0)
    if DTYPE != 0:
        ss = ss + tl.sum(tl.where(m_hi, acc_hi * acc_hi, 0.0), 0)
    if (SPLIT > 1) and (not ROWWIDE):
        ss, failed = _row_sum_of_squares(
            rows_ptr, row, part, ss, failed, seq, ctrl, limit, SPLIT, BACKEND
        )
    inv = tl.math.rsqrt(ss / cols + eps)
    if GEMMA:
        w_lo = w_lo + 1.0
        w_hi = w_hi + 1.0
    ok = failed == 0
    # (residual_out is stored here, after the siblings' wait: storing it before that wait
    # measured slower on 2x H200, session 5: 1x4096 4.49 vs 4.21 us, 8x7168 6.04 vs 5.38)
    if HAS_RES_OUT:
        tl.store(res_out_ptr + base + c_lo, ll.from_f32(acc_lo, DTYPE), mask=ll.both(o_lo, ok))
        if DTYPE != 0:
            tl.store(res_out_ptr + base + c_hi, ll.from_f32(acc_hi, DTYPE), mask=ll.both(o_hi, ok))
    tl.store(
        out_ptr + base + c_lo, ll.from_f32((acc_lo * inv) * w_lo, DTYPE), mask=ll.both(o_lo, ok)
    )
    if DTYPE != 0:
        tl.store(
            out_ptr + base + c_hi, ll.from_f32((acc_hi * inv) * w_hi, DTYPE), mask=ll.both(o_hi, ok)
        )
    _scrub(
        table,
        rank,
        seq,
        n_words,
        shard_words,
        hop1_off,
        slot_words,
        hop2_off,
        hop2_words,
        EPW,
        WORLD,
        TWO_SHOT,
        BACKEND,
        OWN=ROWWIDE,
        own_used=n_words + tl.num_programs(0) * SPLIT,
    )
    last = _finish(ctrl, seq, SOLO)
    if (SPLIT > 1) and (not ROWWIDE):
        if last:
            _clear_rows(rows_ptr, tl.num_programs(0) * (2 * SPLIT), BACKEND)


@triton.jit(
    do_not_specialize=("q_stride", "k_stride", "qo_stride", "ko_stride", "q_cols", "k_cols", "eps")
    + _COMMON
)
def qk_rms_norm_kernel(
    q_ptr,
    q_stride,
    k_ptr,
    k_stride,
    qw_ptr,
    kw_ptr,
    qo_ptr,
    qo_stride,
    ko_ptr,
    ko_stride,
    q_cols,
    k_cols,
    eps,
    table,
    ctrl,
    rank,
    h0,
    h1,
    h2,
    h3,
    hop1_off,
    slot_words,
    hop2_off,
    hop2_words,
    limit,
    DTYPE: tl.constexpr,
    WORLD: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    SOLO: tl.constexpr,
    BACKEND: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One program per token t: local sums of squares (ss_q, ss_k) of its q and k shards
    are all-reduced as fp32 payload words 2t, 2t+1 (one-shot), then q_out = q * rsqrt(ss_q /
    (q_cols * WORLD) + eps) * q_weight (k likewise). Rows may be strided; outputs may alias."""
    t = tl.program_id(0)
    ll.await_prior_kernel(PDL, BACKEND)
    seq = _load_seq(ctrl, BACKEND)
    cq = tl.arange(0, BQ)
    ck = tl.arange(0, BK)
    mq = cq < q_cols
    mk = ck < k_cols
    qv = _load_f32(q_ptr + t.to(tl.int64) * q_stride + cq, mq, DTYPE)
    kv = _load_f32(k_ptr + t.to(tl.int64) * k_stride + ck, mk, DTYPE)
    ssq = tl.sum(qv * qv, 0)
    ssk = tl.sum(kv * kv, 0)
    lane = tl.arange(0, 2)
    vals = tl.where(lane == 0, ssq, ssk)
    acc, _, failed = _exchange(
        2 * t + lane,
        lane < 2,
        lane < 2,
        ll.elem_bits(vals, 0),
        vals,
        vals * 0.0,
        t == 0,
        table,
        ctrl,
        rank,
        seq,
        h0,
        h1,
        h2,
        h3,
        2 * tl.num_programs(0),
        0,
        hop1_off,
        slot_words,
        hop2_off,
        hop2_words,
        limit,
        0,
        1,
        WORLD,
        False,
        BACKEND,
    )
    sq = tl.sum(tl.where(lane == 0, acc, 0.0), 0)
    sk = tl.sum(tl.where(lane == 1, acc, 0.0), 0)
    iq = tl.math.rsqrt(sq / (q_cols * WORLD) + eps)
    ik = tl.math.rsqrt(sk / (k_cols * WORLD) + eps)
    qwv = _load_f32(qw_ptr + cq, mq, DTYPE)
    kwv = _load_f32(kw_ptr + ck, mk, DTYPE)
    ok = failed == 0
    tl.store(
        qo_ptr + t.to(tl.int64) * qo_stride + cq,
        ll.from_f32((qv * iq) * qwv, DTYPE),
        mask=ll.both(mq, ok),
    )
    tl.store(
        ko_ptr + t.to(tl.int64) * ko_stride + ck,
        ll.from_f32((kv * ik) * kwv, DTYPE),
        mask=ll.both(mk, ok),
    )
    _scrub(
        table,
        rank,
        seq,
        2 * tl.num_programs(0),
        0,
        hop1_off,
        slot_words,
        hop2_off,
        hop2_words,
        1,
        WORLD,
        False,
        BACKEND,
    )
    _finish(ctrl, seq, SOLO)


@triton.jit
def fill_kernel(table, index, n_words, value, BLOCK: tl.constexpr):
    """Writes ``value`` into ``n_words`` int64 words of the region ``table[index]`` (used to
    clear a freshly allocated region before its handle leaves this process)."""
    base = _ptr(table, index)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(base + offs, tl.full([BLOCK], 0, tl.int64) + value, mask=offs < n_words)


ll.interpreter_fast_calls(
    globals(),
    keep=("all_reduce_kernel", "add_rms_norm_kernel", "qk_rms_norm_kernel", "fill_kernel"),
)
