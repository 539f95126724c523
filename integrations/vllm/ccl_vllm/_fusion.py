"""All-reduce + residual add + RMSNorm fusion, by rewiring a loaded vLLM model.

In a Llama-shaped decoder stack every row-parallel output is all-reduced and then consumed
by exactly one RMSNorm in its residual form ``norm(x, residual) -> (normed, residual)``:

    layers[i].self_attn.o_proj  ->  layers[i].post_attention_layernorm
    layers[i].mlp.down_proj     ->  layers[i+1].input_layernorm   (last layer: model.norm)

and in a Mixtral-shaped MoE stack the expert block takes the MLP's place::

    layers[i].block_sparse_moe.experts  ->  layers[i+1].input_layernorm   (or model.norm)

:func:`fuse_model` sets ``reduce_results = False`` on each of those ``RowParallelLinear``\\ s
and ``moe_config.skip_final_all_reduce = True`` on each fused-MoE runner (vLLM's own switch
for a consumer that fuses the TP all-reduce), so they return their partial sum, and swaps the
paired ``RMSNorm``'s class for a subclass whose ``forward(x, residual)`` calls
``ccl::all_reduce_add_rms_norm_``: one collective that all-reduces the partials and applies
the residual add and the norm. That covers 2L of the
2L + 1 all-reduces of a forward step; the embedding's all-reduce (consumed by
``layers[0].input_layernorm`` without a residual, and also used as the first residual) stays
a plain ``ccl::all_reduce_``. It works on the model instance after weight loading, copies no
vLLM forward code, and survives vLLM's CPU compile (Dynamo reads ``reduce_results`` and
traces the swapped ``forward``; the op is a registered torch op).

Which models: those whose model and decoder-layer ``forward`` are in :data:`MODEL_FORWARDS`
and :data:`LAYER_FORWARDS` (vLLM 0.32: Llama, Mistral, Qwen2, Qwen3, Mixtral, MiniMax-M2 and
everything vLLM maps onto them) — read from the source: they pass the row-parallel / expert
outputs straight to those norms. MoE blocks qualify when the runner would all-reduce its combined
output itself at the end (tensor parallel only: no expert / data / sequence parallelism, no
all2all kernels, no shared experts, no kernel that reduces in place).
Anything else is left alone (the all-reduce routing still applies). Also left alone: LoRA,
speculative decoding (EAGLE-3 reads un-normalised hidden states between layers), pipeline
parallelism, ``GemmaRMSNorm`` and norms with ``var_hidden_size``.

Fused GEMV (opt-in, ``CCL_VLLM_FUSE_GEMV=1``): for pairs whose linear is unquantized, has no
bias and takes its input already split (``input_is_parallel``), the linear also moves into the
norm: the linear passes its input through, and the norm calls
``ccl::linear_all_reduce_add_rms_norm`` (``ccl.linear_all_reduce_add_rms_norm``: GEMV + fp32
all-reduce + add + RMSNorm in one call). vLLM's CPU weight dispatch drops ``layer.weight``
after repacking it, so the plugin keeps a reference to the unpacked weight of every
row-parallel layer at load time (``_plugin._keep_row_parallel_weights``): those layers' weights
are held twice (vLLM's packed copy stays unused).
"""

import logging
from typing import NamedTuple

import torch

from ccl_vllm import _ops

logger = logging.getLogger("vllm.ccl_vllm")

__all__ = ["LAYER_FORWARDS", "MODEL_FORWARDS", "FusedPair", "fuse_model",
           "fuse_qk_norms"]

_MODELS = "vllm.model_executor.models"
#: ``forward``\\ s (module.qualname) of models whose layers run in ``model.layers`` order and end
#: with ``hidden_states, _ = self.norm(hidden_states, residual)``.
MODEL_FORWARDS = {
    f"{_MODELS}.llama.LlamaModel.forward",
    f"{_MODELS}.mistral.MistralModel.forward",
    f"{_MODELS}.qwen2.Qwen2Model.forward",  # Qwen3Model inherits it
    f"{_MODELS}.mixtral.MixtralModel.forward",
    # (its layer loop also hands hidden states to EAGLE-3, which stays unfused anyway)
    f"{_MODELS}.minimax_m2.MiniMaxM2Model.forward",
}
#: Decoder-layer ``forward``\\ s of the form: ``input_layernorm(h, residual)``; self_attn (ends
#: in o_proj); ``post_attention_layernorm(h, residual)``; mlp (ends in down_proj) or the
#: expert block (``block_sparse_moe``: gate, then the fused-MoE runner ``experts``).
LAYER_FORWARDS = {
    f"{_MODELS}.llama.LlamaDecoderLayer.forward",
    f"{_MODELS}.mistral.MistralDecoderLayer.forward",
    f"{_MODELS}.qwen2.Qwen2DecoderLayer.forward",
    f"{_MODELS}.qwen3.Qwen3DecoderLayer.forward",
    f"{_MODELS}.mixtral.MixtralDecoderLayer.forward",
    f"{_MODELS}.minimax_m2.MiniMaxM2DecoderLayer.forward",
}


class FusedPair(NamedTuple):
    """A row-parallel linear (or a fused-MoE runner) whose all-reduce moves into the RMSNorm
    that consumes it."""

    linear: torch.nn.Module
    norm: torch.nn.Module
    linear_name: str
    norm_name: str


def _vllm_types() -> tuple[type, type]:
    """(RowParallelLinear, RMSNorm); a function so that tests can substitute fakes."""
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import RowParallelLinear

    return RowParallelLinear, RMSNorm


def _forward_name(obj) -> str:
    f = getattr(type(obj), "forward", None)
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', '?')}"


def _pairs(model) -> tuple[list[FusedPair], str | None]:
    """Structural pairing and every check; (pairs, None) or ([], why not)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    final_norm = getattr(inner, "norm", None)
    if layers is None or final_norm is None:
        return [], f"{type(model).__name__} has no model.layers / model.norm"
    if _forward_name(inner) not in MODEL_FORWARDS:
        return [], f"model forward {_forward_name(inner)} is not a known Llama-shaped forward"
    n = len(layers)
    if n == 0 or getattr(inner, "start_layer", 0) != 0 or getattr(inner, "end_layer", n) != n:
        return [], "this rank does not hold every layer (pipeline parallelism)"
    linear_cls, norm_cls = _vllm_types()
    pairs: list[FusedPair] = []
    for i, layer in enumerate(layers):
        if _forward_name(layer) not in LAYER_FORWARDS:
            return [], f"layer {i}: {_forward_name(layer)} is not a known Llama-shaped forward"
        o_proj = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        if hasattr(layer, "block_sparse_moe"):
            down_proj, down_name = layer.block_sparse_moe.experts, "block_sparse_moe.experts"
        else:
            down_proj, down_name = getattr(getattr(layer, "mlp", None), "down_proj", None), \
                "mlp.down_proj"
        post_norm = getattr(layer, "post_attention_layernorm", None)
        if i + 1 < n:
            next_norm, next_name = getattr(layers[i + 1], "input_layernorm", None), \
                f"model.layers.{i + 1}.input_layernorm"
        else:
            next_norm, next_name = final_norm, "model.norm"
        pairs.append(FusedPair(o_proj, post_norm, f"model.layers.{i}.self_attn.o_proj",
                               f"model.layers.{i}.post_attention_layernorm"))
        pairs.append(FusedPair(down_proj, next_norm, f"model.layers.{i}.{down_name}", next_name))
    seen: set[int] = set()
    for p in pairs:
        lin, norm = p.linear, p.norm
        if _is_moe(lin):
            why = _moe_reason(lin)
            if why is not None:
                return [], f"{p.linear_name} {why}"
        elif not isinstance(lin, linear_cls):
            return [], f"{p.linear_name} is {type(lin).__name__}, not {linear_cls.__name__}"
        elif not getattr(lin, "reduce_results", False):
            return [], f"{p.linear_name} does not all-reduce its output (already fused?)"
        elif getattr(lin, "skip_bias_add", False):
            return [], f"{p.linear_name} leaves its bias to the caller (skip_bias_add)"
        elif getattr(lin, "tp_size", 1) <= 1:
            return [], f"{p.linear_name} is not tensor-parallel"
        if type(norm) is not norm_cls:
            return [], f"{p.norm_name} is {type(norm).__name__}, not {norm_cls.__name__}"
        if getattr(norm, "variance_size_override", None) is not None:
            return [], f"{p.norm_name} normalises over a partial width (var_hidden_size)"
        if id(norm) in seen:
            return [], f"{p.norm_name} consumes two row-parallel outputs"
        seen.add(id(norm))
    return pairs, None


def _is_moe(module) -> bool:
    """A fused-MoE runner: carries vLLM's ``moe_config`` with the all-reduce switch."""
    return hasattr(getattr(module, "moe_config", None), "skip_final_all_reduce")


def _moe_reason(runner) -> str | None:
    """Why a fused-MoE runner's final all-reduce cannot move into the next norm, or None."""
    cfg = runner.moe_config
    par = getattr(cfg, "moe_parallel_config", None)
    if cfg.skip_final_all_reduce:
        return "does not all-reduce its output (already fused?)"
    if getattr(cfg, "tp_size", 1) <= 1:
        return "is not tensor-parallel"
    for what in ("dp_size", "ep_size", "pcp_size"):
        if getattr(cfg, what, 1) != 1:
            return f"runs with {what} = {getattr(cfg, what)} (reduced by a combine, not an " \
                   "all-reduce)"
    if getattr(cfg, "is_sequence_parallel", False) or getattr(par, "use_all2all_kernels", False):
        return "is sequence-parallel / uses all2all kernels"
    if getattr(runner, "_shared_experts", None) is not None:
        return "has shared experts (reduced on their own)"
    if getattr(runner, "_fused_output_is_reduced", False):
        return "runs a kernel that reduces its output itself"
    return None


def _fused_layers(model) -> list[FusedPair]:
    """_fused_layers(model) -> [FusedPair(linear, norm, linear_name, norm_name), ...]

    The (row-parallel linear, consuming RMSNorm) pairs of a Llama-shaped vLLM model that pass
    every check (see the module docstring), in forward order; [] when the model does not
    qualify. Local; changes nothing. The hook for fused all-reduce epilogues: this plugin
    moves each linear's all-reduce into its norm; a fused GEMV can take the same pairs.
    """
    return _pairs(model)[0]


def _config_reason(vllm_config) -> str | None:
    if vllm_config is None:
        return None
    if getattr(vllm_config, "lora_config", None) is not None:
        return "LoRA is enabled (LoRA wraps the row-parallel layers and all-reduces itself)"
    if getattr(vllm_config, "speculative_config", None) is not None:
        return "speculative decoding is enabled (EAGLE-3 reads hidden states between layers)"
    pc = getattr(vllm_config, "parallel_config", None)
    if pc is not None and getattr(pc, "pipeline_parallel_size", 1) != 1:
        return "pipeline parallelism is enabled"
    return None


_fused_classes: dict[type, type] = {}


def _fused_norm_cls(base: type) -> type:
    """``base`` (vLLM's RMSNorm) with ``forward(x, residual)`` = the fused ccl op."""
    cls = _fused_classes.get(base)
    if cls is not None:
        return cls

    def forward(self, x, residual=None):
        handle, weight, eps = self._ccl_handle, self.weight.data, self.variance_epsilon
        linear_w = getattr(self, "_ccl_gemv_weight", None)
        if linear_w is not None and residual is not None:  # x is the linear's input
            if torch.compiler.is_compiling():
                out = torch.ops.ccl.linear_all_reduce_add_rms_norm(
                    x, linear_w, residual, weight, eps, handle)
            else:
                out = _ops.linear_all_reduce_add_rms_norm(x, linear_w, residual, weight, eps,
                                                          handle)
            return out, residual
        if residual is None:
            # Not the call form this norm was paired for: (the linear's GEMV,) all-reduce,
            # then the plain norm.
            if linear_w is not None:
                x = torch.nn.functional.linear(x, linear_w)
            if torch.compiler.is_compiling():
                torch.ops.ccl.all_reduce_(x, handle)
            else:
                _ops.all_reduce_(x, handle)
            return base.forward(self, x)
        if torch.compiler.is_compiling():
            torch.ops.ccl.all_reduce_add_rms_norm_(x, residual, weight, eps, handle)
        else:  # eager: skip the dispatcher
            _ops.all_reduce_add_rms_norm_(x, residual, weight, eps, handle)
        return x, residual

    name = f"CclFused{base.__name__}"
    cls = type(name, (base,), {
        "forward": forward,
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"{base.__name__} whose (x, residual) form all-reduces x first, fused (ccl).",
    })
    _fused_classes[base] = cls
    return cls


def _gemv_weight(linear) -> torch.Tensor | None:
    """The kept ``[N, K]`` weight when the linear's GEMV can move into its norm, else None."""
    w = getattr(linear, "_ccl_weight", None)
    if (
        w is None
        or w.dim() != 2
        or w.dtype not in (torch.float32, torch.bfloat16, torch.float16)
        or getattr(linear, "bias", None) is not None
        or not getattr(linear, "input_is_parallel", False)
        or type(getattr(linear, "quant_method", None)).__name__ != "UnquantizedLinearMethod"
    ):
        return None
    return w


_pass_classes: dict[type, type] = {}


def _pass_through_cls(base: type) -> type:
    """``base`` (RowParallelLinear) whose forward hands its input to the paired norm."""
    cls = _pass_classes.get(base)
    if cls is None:
        def forward(self, input_):
            return (input_, None) if self.return_bias else input_

        name = f"CclPassThrough{base.__name__}"
        cls = _pass_classes[base] = type(name, (base,), {
            "forward": forward, "__module__": __name__, "__qualname__": name,
            "__doc__": f"{base.__name__} whose GEMV runs in the paired norm (ccl)."})
    return cls


def _qk_norm_layers(model) -> list:
    """The attention modules of ``model`` whose Q/K norms are MiniMax-M2's tensor-parallel
    ``MiniMaxText01RMSNormTP`` pair (vLLM applies them through the class's static
    ``forward_qkv``), in layer order; [] for other models."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    out = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if all(type(n).__name__ == "MiniMaxText01RMSNormTP" for n in (qn, kn)):
            out.append(attn)
    return out


def _hook_minimax_qk(norm_cls: type) -> None:
    """Routes ``norm_cls.forward_qkv`` (MiniMaxText01RMSNormTP's static method: one call
    per attention layer, q / k normalised over the whole tensor-parallel width) to
    ``ccl::qk_rms_norm`` for the norms :func:`fuse_model` marked with a ccl handle; every
    other call, and every call before marking, runs vLLM's own method. Once per process."""
    original = norm_cls.__dict__["forward_qkv"].__func__
    if getattr(original, "_ccl_hook", False):
        return

    def forward_qkv(q_norm, k_norm, qkv, q_size, kv_size):
        handle = getattr(q_norm, "_ccl_qk_handle", None)
        if (handle is None or qkv.dim() != 2
                or q_norm.variance_epsilon != k_norm.variance_epsilon):
            return original(q_norm, k_norm, qkv, q_size, kv_size)
        q, k = torch.ops.ccl.qk_rms_norm(qkv, q_norm.weight, k_norm.weight, q_size, kv_size,
                                         q_norm.tp_world, q_norm.variance_epsilon, handle)
        return q, k, qkv[:, q_size + kv_size:q_size + 2 * kv_size]  # (vLLM's split's v)

    forward_qkv._ccl_hook = True
    norm_cls.forward_qkv = staticmethod(forward_qkv)


def fuse_qk_norms(model, handle: int, vllm_config=None) -> int:
    """fuse_qk_norms(model, handle, vllm_config=None) -> number of attention layers

    MiniMax-M2: each attention layer's tensor-parallel Q/K RMSNorm (vLLM: a variance kernel,
    an all-reduce of ``[T, 2]``, an apply kernel) becomes one ``ccl::qk_rms_norm`` on TP
    group ``handle``. Other models: 0, nothing changed. Local."""
    attns = _qk_norm_layers(model) if _config_reason(vllm_config) is None else []
    if not attns or getattr(attns[0].q_norm, "tp_world", 1) <= 1:
        return 0
    _hook_minimax_qk(type(attns[0].q_norm))
    for attn in attns:
        attn.q_norm._ccl_qk_handle = handle
    _ops._counts["qk_layers"] += len(attns)
    logger.info("ccl_vllm: tensor-parallel Q/K RMSNorm through ccl.qk_rms_norm for %d "
                "attention layers of %s", len(attns), type(model).__name__)
    return len(attns)


def fuse_model(model, handle: int, vllm_config=None, gemv: bool = False) -> int:
    """fuse_model(model, handle, vllm_config=None) -> number of fused pairs

    Rewires ``model`` in place (module docstring) so that each pair's all-reduce runs as
    ``ccl::all_reduce_add_rms_norm_`` on TP group ``handle``. Validates every pair before it
    changes anything; returns 0 and logs why when the model or config does not qualify.
    Local (every rank loads the same model, so every rank makes the same choice).
    """
    reason = _config_reason(vllm_config)
    pairs: list[FusedPair] = []
    if reason is None:
        pairs, reason = _pairs(model)
    if reason is not None:
        logger.warning(
            "ccl_vllm: all-reduce + RMSNorm fusion off for %s: %s (the all-reduce still goes "
            "through ccl; set CCL_VLLM_FUSE=0 to silence)", type(model).__name__, reason,
        )
        return 0
    n_gemv = 0
    for p in pairs:
        if _is_moe(p.linear):
            p.linear.moe_config.skip_final_all_reduce = True
        else:
            p.linear.reduce_results = False
        p.norm._ccl_handle = handle
        p.norm._ccl_gemv_weight = _gemv_weight(p.linear) if gemv and not _is_moe(p.linear) \
            else None
        if p.norm._ccl_gemv_weight is not None:
            p.linear.__class__ = _pass_through_cls(type(p.linear))
            n_gemv += 1
        p.norm.__class__ = _fused_norm_cls(type(p.norm))
    _ops._counts["rewired_pairs"] += len(pairs)
    _ops._counts["gemv_pairs"] += n_gemv
    n_moe = sum(_is_moe(p.linear) for p in pairs)
    _ops._counts["moe_pairs"] += n_moe
    if gemv and n_gemv < len(pairs) - n_moe:  # (expert blocks have no single GEMV)
        logger.warning("ccl_vllm: GEMV fusion for %d of %d linear pairs (the others: "
                       "quantized, bias, or no kept weight)", n_gemv, len(pairs) - n_moe)
    logger.info(
        "ccl_vllm: fused all-reduce + add + RMSNorm for %d pairs of %s (o_proj -> "
        "post_attention_layernorm, down_proj or the expert block (%d) -> next "
        "input_layernorm / model.norm)", len(pairs), type(model).__name__, n_moe,
    )
    return len(pairs)
