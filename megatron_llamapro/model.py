"""GPTModel from an architecture and the current parallel state; freezing by global layer number."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from megatron_llamapro.arch import LlamaArch
from megatron_llamapro.checkpoint.layout import Layout, StagePlacement, real_vocab_rows
from megatron_llamapro.errors import UserError
from megatron_llamapro.runtime import cpu_compat


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def use_transformer_engine() -> bool:
    """TE spec when TE imports and a GPU is usable; the local spec otherwise."""
    return te_available() and cpu_compat.cuda_usable() and not cpu_compat.is_applied()


def layer_spec(use_te: bool, arch: LlamaArch):
    """The transformer layer spec: q/k norms where the architecture has them (Qwen3); the QKV bias
    needs no spec option (TransformerConfig.add_qkv_bias, from arch.MEGATRON_FIELDS)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    return get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=arch.qk_layernorm)


@dataclass(frozen=True)
class ModelOptions:
    params_dtype: str = "fp32"  # fp32 | bf16 | fp16
    padded_vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 128
    sequence_parallel: bool = False
    use_te: bool | None = None  # None: decide from the machine
    max_sequence_length: int | None = None
    config_overrides: tuple = ()  # (key, value) pairs passed to TransformerConfig
    # Global 0-based layers whose weights are built by TE's quantized (FP8) model init: cast once and
    # stored FP8 with no BF16 copy. Meant for frozen layers; needs the TE spec and fp8 in the config.
    fp8_storage_layers: frozenset[int] = frozenset()
    attention_backend: str | None = None  # megatron-core AttnBackend name; None: its default (auto)


def build_model(arch: LlamaArch, options: ModelOptions = ModelOptions()) -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline chunk on this rank (a list of one without VPP).

    Parallel sizes come from megatron-core's initialized parallel state.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    layout = Layout.from_parallel_state()
    use_te = use_transformer_engine() if options.use_te is None else options.use_te
    on_gpu = cpu_compat.cuda_usable() and not cpu_compat.is_applied()
    overrides = dict(options.config_overrides)
    if options.attention_backend is not None:
        from megatron.core.transformer.enums import AttnBackend

        overrides["attention_backend"] = AttnBackend[options.attention_backend]
    config = arch.transformer_config(
        tp=layout.tp, pp=layout.pp, vpp=layout.vpp, params_dtype=options.params_dtype,
        sequence_parallel=options.sequence_parallel, on_gpu=on_gpu, **overrides,
    )
    padded_vocab = options.padded_vocab_size or arch.padded_vocab_size(
        layout.tp, options.make_vocab_size_divisible_by)
    spec = layer_spec(use_te, arch)
    if options.fp8_storage_layers:
        spec = fp8_storage_spec(spec, options.fp8_storage_layers, use_te, config)
    placement = StagePlacement(arch.num_layers, layout)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    chunks = []
    for vp_stage in range(layout.chunks_per_stage):
        pre = placement.is_first(stage, vp_stage)
        post = placement.is_last(stage, vp_stage)
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab,
            max_sequence_length=options.max_sequence_length or arch.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            rotary_percent=1.0,
            rope_scaling=arch.rope_scaling_factor is not None,
            rope_scaling_factor=arch.rope_scaling_factor or 8.0,
            vp_stage=vp_stage if layout.vpp else None,
        )
        if on_gpu:
            model.cuda(torch.cuda.current_device())
        if post and padded_vocab > arch.vocab_size:
            mask_padded_vocab_logits(model.output_layer, arch.vocab_size)
        chunks.append(model)
    return chunks


def fp8_storage_spec(spec, layers: frozenset[int], use_te: bool, config):
    """`spec` with its layer class swapped for one that builds the given global layers under TE's
    quantized model init (the other layers as before)."""
    from dataclasses import replace

    if not use_te:
        raise UserError("FP8 storage of frozen layers needs Transformer Engine on a GPU (the TE spec)")
    if not config.fp8:
        raise UserError("FP8 storage of frozen layers needs --fp8 (weights stored FP8 are used in FP8 GEMMs)")
    if config.fp8_param:
        raise UserError("FP8 storage of frozen layers and megatron-core's fp8_param exclude each other")
    return replace(spec, module=_fp8_storage_layer_class(),
                   params={**spec.params, "fp8_storage_layers": frozenset(layers)})


def quantized_model_init(config):
    """TE's context that makes TE modules create their weights quantized (FP8) with the run's recipe,
    keeping no high-precision copy. `quantized_model_init` from TE 2.8, `fp8_model_init` before."""
    import inspect

    import transformer_engine.pytorch as te
    from megatron.core.fp8_utils import get_fp8_recipe

    init = getattr(te, "quantized_model_init", None) or te.fp8_model_init
    accepted = inspect.signature(init).parameters
    kwargs = {"enabled": True}
    if "recipe" in accepted:
        kwargs["recipe"] = get_fp8_recipe(config)
    if "preserve_high_precision_init_val" in accepted:
        kwargs["preserve_high_precision_init_val"] = False
    return init(**kwargs)


_FP8_STORAGE_LAYER = None


def _fp8_storage_layer_class():
    """A TransformerLayer subclass (so freezing and checkpoint code see an ordinary layer) whose
    construction runs under quantized_model_init when its global layer index is listed."""
    global _FP8_STORAGE_LAYER
    if _FP8_STORAGE_LAYER is not None:
        return _FP8_STORAGE_LAYER
    from contextlib import nullcontext

    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

    class FP8StorageTransformerLayer(TransformerLayer):
        def __init__(self, config, submodules, layer_number: int = 1, *args,
                     fp8_storage_layers: frozenset = frozenset(), vp_stage=None, **kwargs):
            offset = get_transformer_layer_offset(
                config, vp_stage, parallel_state.get_pipeline_model_parallel_rank())
            index = layer_number + offset - 1
            with quantized_model_init(config) if index in fp8_storage_layers else nullcontext():
                super().__init__(config, submodules, layer_number, *args, vp_stage=vp_stage, **kwargs)

    _FP8_STORAGE_LAYER = FP8StorageTransformerLayer
    return _FP8_STORAGE_LAYER


def mask_padded_vocab_logits(output_layer: torch.nn.Module, vocab_size: int) -> None:
    """Give the padding rows of the vocabulary a logit of -inf.

    Megatron-LM leaves them at 0 (zero rows), which puts probability mass on tokens that do not
    exist: the reported loss then exceeds the true one (by ~0.01 nats for a 400 -> 512 padding) and
    differs from the HF model's. With -inf the loss and its gradients are those of the real vocab.
    """
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()

    def hook(module, inputs, output):
        logits, bias = output
        local = logits.shape[-1]
        real = real_vocab_rows(vocab_size, rank, local)
        if real == local:
            return output
        padding = torch.arange(local, device=logits.device) >= real
        return logits.masked_fill(padding, float("-inf")), bias

    output_layer.register_forward_hook(hook)


def transformer_layers(model: torch.nn.Module) -> Iterable:
    """(global 0-based layer index, layer) for each transformer layer of a model chunk.

    Uses `TransformerLayer.layer_number` (global, 1-based), never parameter names, whose layer
    index is local to the pipeline stage.
    """
    from megatron.core.transformer.transformer_layer import TransformerLayer

    for module in model.modules():
        if isinstance(module, TransformerLayer):
            yield module.layer_number - 1, module


@dataclass(frozen=True)
class TrainablePlan:
    layers: frozenset[int]  # global 0-based indices
    embeddings: bool = False
    final_norm: bool = False
    output_layer: bool = False
    all: bool = False

    def describe(self) -> str:
        if self.all:
            return "all parameters"
        parts = [f"layers {sorted(self.layers)}"]
        parts += [name for name, on in (("embeddings", self.embeddings), ("final norm", self.final_norm),
                                         ("output layer", self.output_layer)) if on]
        return ", ".join(parts)


def apply_trainable_plan(chunks: list[torch.nn.Module], plan: TrainablePlan) -> dict[str, int]:
    """Set requires_grad from the plan; returns counts of trainable and frozen parameters on this rank."""
    counts = {"trainable": 0, "frozen": 0}
    for chunk in chunks:
        for param in chunk.parameters():
            param.requires_grad_(plan.all)
        if not plan.all:
            for index, layer in transformer_layers(chunk):
                if index in plan.layers:
                    for param in layer.parameters():
                        param.requires_grad_(True)
            decoder = chunk.decoder
            if plan.final_norm and getattr(decoder, "final_layernorm", None) is not None:
                for param in decoder.final_layernorm.parameters():
                    param.requires_grad_(True)
            if plan.embeddings and getattr(chunk, "embedding", None) is not None:
                for param in chunk.embedding.parameters():
                    param.requires_grad_(True)
            if (plan.output_layer or (plan.embeddings and chunk.share_embeddings_and_output_weights)) \
                    and getattr(chunk, "output_layer", None) is not None and chunk.output_layer.weight is not None:
                chunk.output_layer.weight.requires_grad_(True)
        for param in chunk.parameters():
            counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    return counts
