"""LLaMA-family architecture: the single source of model truth.

Read from / written to a Hugging Face `config.json`; turned into megatron-core's TransformerConfig
and Megatron-LM's args through one table (MEGATRON_FIELDS).
Supports LLaMA-2/3.x and Mistral-style (GQA) decoders (RMSNorm, SwiGLU, RoPE, no biases), and the
two Qwen variations of them: Qwen2/2.5 (bias on q/k/v) and Qwen3 dense (per-head RMSNorm on q and k).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

from megatron_llamapro.errors import UserError



class Family(NamedTuple):
    hf_class: str        # transformers' *ForCausalLM class the export names in `architectures`
    qkv_bias: bool       # bias on q/k/v only (o_proj and the MLP have none)
    qk_layernorm: bool   # RMSNorm over each head of q and of k, before RoPE
    bias_flags: bool     # the config carries attention_bias / mlp_bias flags (refused when true)
    windowed_layers: bool  # sliding windows described by use_sliding_window + max_window_layers


FAMILIES = {
    "llama": Family("LlamaForCausalLM", qkv_bias=False, qk_layernorm=False, bias_flags=True, windowed_layers=False),
    "mistral": Family("MistralForCausalLM", qkv_bias=False, qk_layernorm=False, bias_flags=True,
                      windowed_layers=False),
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True, qk_layernorm=False, bias_flags=False, windowed_layers=True),
    "qwen3": Family("Qwen3ForCausalLM", qkv_bias=False, qk_layernorm=True, bias_flags=True, windowed_layers=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

# Config fields that make a model something these dense decoder blocks cannot represent, checked
# before the model type so the one line names the field (MoE, multi-latent attention, partial RoPE).
UNSUPPORTED_FIELDS = (
    ("num_local_experts", "a mixture-of-experts model (only dense decoders are supported)"),
    ("num_experts", "a mixture-of-experts model (only dense decoders are supported)"),
    ("n_routed_experts", "a mixture-of-experts model (only dense decoders are supported)"),
    ("kv_lora_rank", "multi-latent attention (MLA is not supported)"),
    ("q_lora_rank", "multi-latent attention (MLA is not supported)"),
    ("partial_rotary_factor", "partial rotary embeddings (RoPE over whole heads only)"),
)
# Families close enough to be mistaken for supported ones: what differs, by config field.
UNSUPPORTED_MODEL_TYPES = {
    "gemma": "model_type 'gemma' scales embeddings by sqrt(hidden) and norms by (1 + weight) (GeGLU)",
    "gemma2": "model_type 'gemma2' has attn_logit_softcapping and alternating sliding windows",
    "gemma3": "model_type 'gemma3' has alternating local/global attention and (1 + weight) norms",
    "phi": "model_type 'phi' has partial_rotary_factor, biases everywhere and LayerNorm",
    "phi3": "model_type 'phi3' fuses qkv_proj and gate_up_proj with its own rope_scaling types",
}


def _field_is_set(value) -> bool:
    """Whether an UNSUPPORTED_FIELDS value turns its feature on (experts or a rank above 1, a rotary
    fraction below 1); absent, null, 0 and 1 leave a dense full-RoPE model."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1)


def torch_dtype(precision: str):
    """torch dtype of a precision name: fp32 | bf16 | fp16."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class ArchError(UserError):
    """A config that this tool cannot represent; the message is one line naming the rule."""


@dataclass(frozen=True)
class LlamaArch:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    model_type: str = "llama"
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None
    qkv_bias: bool = False
    qk_layernorm: bool = False
    # HF config keys we don't interpret but must write back unchanged on export.
    extra_hf: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_kv_heads", "vocab_size", "head_dim"):
            if getattr(self, name) <= 0:
                raise ArchError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ArchError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ArchError(f"rope_scaling type {kind!r} is not supported (llama3 only)")
            # megatron-core hard-codes LLaMA-3.1's constants; anything else would change the model.
            fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}
            for key, value in fixed.items():
                if kind == "llama3" and float(self.rope_scaling.get(key, value)) != value:
                    raise ArchError(f"rope_scaling {key}={self.rope_scaling[key]} is not supported "
                                    f"(megatron-core implements {value})")

    def check_parallel(self, tp: int, pp: int = 1, vpp: int | None = None) -> None:
        """Refuse TP/PP/VPP sizes this architecture cannot be split into, one line each."""
        if tp < 1 or pp < 1 or (vpp is not None and vpp < 1):
            raise ArchError(f"parallel sizes must be >= 1 (tp={tp}, pp={pp}, vpp={vpp})")
        if self.num_attention_heads % tp:
            raise ArchError(f"--tp {tp} does not divide num_attention_heads {self.num_attention_heads}")
        if self.num_kv_heads % tp:
            raise ArchError(f"--tp {tp} does not divide num_key_value_heads {self.num_kv_heads}")
        if self.ffn_hidden_size % tp:
            raise ArchError(f"--tp {tp} does not divide intermediate_size {self.ffn_hidden_size}")
        chunks = pp * (vpp or 1)
        if self.num_layers % chunks:
            what = f"PP x VPP = {pp} x {vpp}" if vpp else f"--pp {pp}"
            raise ArchError(f"{what} does not divide num_hidden_layers {self.num_layers}")
        if vpp is not None and vpp > 1 and pp < 2:
            raise ArchError(f"--vpp {vpp} needs --pp of at least 2")

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def query_groups(self) -> int:
        return self.num_kv_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    @property
    def gqa(self) -> bool:
        return self.num_kv_heads != self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1, divisible_by: int = 128) -> int:
        """Megatron-LM's rule: pad to a multiple of make_vocab_size_divisible_by * TP."""
        multiple = divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self, padded_vocab: int | None = None) -> dict[str, int]:
        vocab = padded_vocab or self.vocab_size
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        qkv = h * d * (self.num_attention_heads + 2 * self.num_kv_heads)
        per_layer = qkv + self.num_attention_heads * d * h + 3 * h * f + 2 * h
        if self.qkv_bias:
            per_layer += d * (self.num_attention_heads + 2 * self.num_kv_heads)
        if self.qk_layernorm:
            per_layer += 2 * d
        embedding = vocab * h
        output = 0 if self.tie_word_embeddings else vocab * h
        return {"per_layer": per_layer, "embedding": embedding, "output": output, "final_norm": h,
                "total": per_layer * self.num_layers + embedding + output + h}

    def with_layers(self, num_layers: int) -> "LlamaArch":
        return replace(self, num_layers=num_layers)

    # ---- HF config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> "LlamaArch":
        model_type = config.get("model_type")
        for key, what in UNSUPPORTED_FIELDS:
            if _field_is_set(config.get(key)):
                raise ArchError(f"{source}: {key}={config[key]} makes model_type {model_type!r} {what}")
        if model_type in UNSUPPORTED_MODEL_TYPES:
            raise ArchError(f"{source}: {UNSUPPORTED_MODEL_TYPES[model_type]}; not supported "
                            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if model_type not in FAMILIES:
            raise ArchError(f"{source}: model_type {model_type!r} is not a LLaMA-family decoder "
                            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        family = FAMILIES[model_type]
        for key in ("attention_bias", "mlp_bias") if family.bias_flags else ("mlp_bias",):
            if config.get(key):
                raise ArchError(f"{source}: {key}=true is not supported ({model_type} blocks with it have "
                                f"biases on o_proj or the MLP)")
        layer_types = config.get("layer_types")
        allowed_layer_types = {"full_attention", "sliding_attention"} if family.windowed_layers else {"full_attention"}
        if layer_types and any(t not in allowed_layer_types for t in layer_types):
            raise ArchError(f"{source}: layer_types other than {' / '.join(sorted(allowed_layer_types))} are "
                            f"not supported (found {sorted(set(layer_types))})")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ArchError(f"{source}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
        required = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                    "vocab_size")
        missing = [k for k in required if k not in config]
        if missing:
            raise ArchError(f"{source}: missing required keys {', '.join(missing)}")
        known = {
            "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "head_dim", "rope_theta", "rms_norm_eps",
            "max_position_embeddings", "tie_word_embeddings", "initializer_range", "model_type",
            "rope_scaling", "sliding_window", "bos_token_id", "eos_token_id", "pad_token_id",
            "architectures", "attention_bias", "mlp_bias", "hidden_act", "torch_dtype", "dtype",
            "transformers_version", "use_cache", "rope_parameters",
        }
        extra_hf = {k: v for k, v in config.items() if k not in known}
        sliding_window = config.get("sliding_window")
        if family.windowed_layers:
            # Qwen: the window applies only with use_sliding_window, and only to layers from
            # max_window_layers up (or those layer_types marks); the config is written back as read.
            extra_hf["sliding_window"] = sliding_window
            sliding_window = _effective_window(config)
        rope_theta = config.get("rope_theta")
        rope_scaling = config.get("rope_scaling")
        rope_params = config.get("rope_parameters")  # transformers >= 5 folds rope settings here
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        try:
            return cls(
                num_layers=int(config["num_hidden_layers"]),
                hidden_size=int(config["hidden_size"]),
                ffn_hidden_size=int(config["intermediate_size"]),
                num_attention_heads=int(config["num_attention_heads"]),
                num_kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                vocab_size=int(config["vocab_size"]),
                head_dim=config.get("head_dim"),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                initializer_range=float(config.get("initializer_range", 0.02)),
                model_type=model_type,
                rope_scaling=rope_scaling,
                sliding_window=sliding_window,
                bos_token_id=config.get("bos_token_id"),
                eos_token_id=config.get("eos_token_id"),
                pad_token_id=config.get("pad_token_id"),
                qkv_bias=family.qkv_bias,
                qk_layernorm=family.qk_layernorm,
                extra_hf=extra_hf,
            )
        except ArchError as exc:
            raise ArchError(f"{source}: {exc}") from None

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> "LlamaArch":
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise ArchError(f"{path}: missing (an HF checkpoint directory needs config.json)")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ArchError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_hf_config(config, source=str(path))

    def to_hf_config(self, dtype: str = "bfloat16") -> dict[str, Any]:
        family = FAMILIES[self.model_type]
        config = {
            "architectures": [family.hf_class],
            "model_type": self.model_type,
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "use_cache": True,
        }
        if not family.bias_flags:
            del config["attention_bias"], config["mlp_bias"]
        if self.rope_scaling is not None:
            config["rope_scaling"] = self.rope_scaling
        if self.model_type == "mistral":
            config["sliding_window"] = self.sliding_window
        config.update(self.extra_hf)
        return config

    # ---- stored form (checkpoint manifests) -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LlamaArch":
        return cls(**data)

    # ---- megatron-core and Megatron-LM ------------------------------------------------------
    def megatron_fields(self, target: str) -> dict[str, Any]:
        """The architecture as `target`'s fields, from MEGATRON_FIELDS: target "config" for
        megatron-core's TransformerConfig, "args" for Megatron-LM's argparse args."""
        return {getattr(row, target): row.value(self) for row in MEGATRON_FIELDS if getattr(row, target)}

    def transformer_config(self, tp: int = 1, pp: int = 1, vpp: int | None = None,
                           params_dtype: str = "fp32", sequence_parallel: bool = False,
                           on_gpu: bool = False, **overrides):
        """megatron-core TransformerConfig for this architecture and parallel layout."""
        from megatron.core.transformer import TransformerConfig

        self.check_parallel(tp, pp, vpp)
        dtype = torch_dtype(params_dtype)
        kwargs = self.megatron_fields("config")
        kwargs.update(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp if (vpp or 1) > 1 else None,
            sequence_parallel=sequence_parallel and tp > 1,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=params_dtype == "bf16",
            fp16=params_dtype == "fp16",
            use_cpu_initialization=not on_gpu,
            bias_activation_fusion=on_gpu,
            masked_softmax_fusion=on_gpu,
            persist_layer_norm=on_gpu,
            bias_dropout_fusion=on_gpu,
            apply_rope_fusion=on_gpu,
            gradient_accumulation_fusion=False,
            attention_softmax_in_fp32=True,
        )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)

    @classmethod
    def from_megatron_args(cls, args: Any, vocab_size: int, source: str,
                           bos_token_id: int | None = 1, eos_token_id: int | None = 2) -> "LlamaArch":
        """The architecture a Megatron-LM checkpoint's stored `args` describe (field names as in
        Megatron-LM's arguments.py). Megatron-LM stores only the padded vocabulary, so the real
        size comes from the caller. Refuses, in one line, what a LLaMA block cannot be."""
        def arg(name, default=None):
            return getattr(args, name, default)

        refused = {
            "normalization": (arg("normalization", "LayerNorm") != "RMSNorm", "must be RMSNorm"),
            "swiglu": (not arg("swiglu", False), "must be true (SwiGLU MLP)"),
            "position_embedding_type": (arg("position_embedding_type", "learned_absolute") != "rope"
                                        and not arg("use_rotary_position_embeddings", False), "must be rope"),
            "rotary_percent": (float(arg("rotary_percent", 1.0)) != 1.0, "must be 1.0"),
            "add_bias_linear": (bool(arg("add_bias_linear", not arg("disable_bias_linear", False))),
                                "must be false (--disable-bias-linear)"),
            "apply_layernorm_1p": (bool(arg("apply_layernorm_1p", False)), "must be false"),
            "squared_relu": (bool(arg("squared_relu", False)), "must be false"),
            "num_experts": (arg("num_experts") not in (None, 0, 1), "mixture of experts is not supported"),
        }
        for name, (bad, rule) in refused.items():
            if bad:
                raise ArchError(f"{source}: args.{name}={arg(name)!r} {rule} for a LLaMA-family model")
        missing = [n for n in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                               "max_position_embeddings") if arg(n) is None]
        if missing:
            raise ArchError(f"{source}: args lack {', '.join(missing)} (needed to rebuild the model)")
        heads = int(args.num_attention_heads)
        rope_scaling = None
        if arg("use_rope_scaling", False):  # megatron-core's fixed LLaMA-3.1 constants
            rope_scaling = {"rope_type": "llama3", "factor": float(arg("rope_scaling_factor", 8.0)),
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}
        # Megatron-LM's field is norm_epsilon; layernorm_epsilon is the older name (and megatron-core's).
        epsilon = arg("norm_epsilon", arg("layernorm_epsilon", 1e-5))
        qkv_bias, qk_layernorm = bool(arg("add_qkv_bias", False)), bool(arg("qk_layernorm", False))
        if qkv_bias and qk_layernorm:
            raise ArchError(f"{source}: args.add_qkv_bias and args.qk_layernorm together match no supported "
                            "family (Qwen2 has the bias, Qwen3 the q/k norms)")
        model_type = "qwen2" if qkv_bias else "qwen3" if qk_layernorm else "llama"
        try:
            return cls(
                num_layers=int(args.num_layers), hidden_size=int(args.hidden_size),
                ffn_hidden_size=int(args.ffn_hidden_size), num_attention_heads=heads,
                num_kv_heads=int(arg("num_query_groups") or heads) if arg("group_query_attention") else heads,
                vocab_size=int(vocab_size), head_dim=arg("kv_channels"),
                rope_theta=float(arg("rotary_base", 10000)), rms_norm_eps=float(epsilon),
                max_position_embeddings=int(args.max_position_embeddings),
                tie_word_embeddings=not arg("untie_embeddings_and_output_weights", False),
                initializer_range=float(arg("init_method_std", 0.02)), rope_scaling=rope_scaling,
                bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                model_type=model_type, qkv_bias=qkv_bias, qk_layernorm=qk_layernorm,
            )
        except ArchError as exc:
            raise ArchError(f"{source}: {exc}") from None

    @property
    def rope_scaling_factor(self) -> float | None:
        if self.rope_scaling and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) == "llama3":
            return float(self.rope_scaling.get("factor", 8.0))
        return None


def _effective_window(config: dict[str, Any]) -> int | None:
    """A Qwen config's sliding window where some layer uses it, else None."""
    window = config.get("sliding_window")
    if not config.get("use_sliding_window") or window is None:
        return None
    layer_types = config.get("layer_types")
    if layer_types:
        windowed = "sliding_attention" in layer_types
    else:
        windowed = int(config.get("max_window_layers", 0)) < int(config["num_hidden_layers"])
    return int(window) if windowed else None


def _silu(arch: LlamaArch):
    import torch.nn.functional as F

    return F.silu


class MegatronField(NamedTuple):
    config: str | None  # megatron-core TransformerConfig field (None: not a config field)
    args: str | None    # Megatron-LM args field (None: not an args field)
    value: Callable[[LlamaArch], Any]


# The architecture as megatron-core's TransformerConfig and Megatron-LM's args see it, a row a field.
MEGATRON_FIELDS = tuple(MegatronField(*row) for row in (
    ("num_layers", "num_layers", lambda a: a.num_layers),
    ("hidden_size", "hidden_size", lambda a: a.hidden_size),
    ("ffn_hidden_size", "ffn_hidden_size", lambda a: a.ffn_hidden_size),
    ("num_attention_heads", "num_attention_heads", lambda a: a.num_attention_heads),
    (None, "group_query_attention", lambda a: a.gqa),
    ("num_query_groups", "num_query_groups", lambda a: a.num_kv_heads),
    ("kv_channels", "kv_channels", lambda a: a.head_dim),
    (None, "max_position_embeddings", lambda a: a.max_position_embeddings),
    (None, "vocab_size", lambda a: a.vocab_size),
    ("normalization", "normalization", lambda a: "RMSNorm"),
    ("layernorm_epsilon", "norm_epsilon", lambda a: a.rms_norm_eps),
    ("gated_linear_unit", "swiglu", lambda a: True),
    ("activation_func", None, _silu),
    (None, "position_embedding_type", lambda a: "rope"),
    # Megatron-LM's own LLaMA converter stores these two (its LLaMA-2 launch line passes
    # --use-rotary-position-embeddings --no-position-embedding, and check_checkpoint_args compares
    # add_position_embedding with the run's value).
    (None, "add_position_embedding", lambda a: False),
    (None, "use_rotary_position_embeddings", lambda a: True),
    (None, "rotary_base", lambda a: int(a.rope_theta)),
    (None, "rotary_percent", lambda a: 1.0),
    (None, "rotary_interleaved", lambda a: False),
    (None, "use_rope_scaling", lambda a: a.rope_scaling_factor is not None),
    (None, "rope_scaling_factor", lambda a: a.rope_scaling_factor or 8.0),  # 8.0: Megatron-LM's default
    (None, "untie_embeddings_and_output_weights", lambda a: not a.tie_word_embeddings),
    ("add_bias_linear", "add_bias_linear", lambda a: False),
    ("add_qkv_bias", "add_qkv_bias", lambda a: a.qkv_bias),
    ("qk_layernorm", "qk_layernorm", lambda a: a.qk_layernorm),
    (None, "squared_relu", lambda a: False),
    (None, "apply_layernorm_1p", lambda a: False),
    (None, "apply_query_key_layer_scaling", lambda a: False),  # saver_base reads it as a plain attribute
    ("hidden_dropout", "hidden_dropout", lambda a: 0.0),
    ("attention_dropout", "attention_dropout", lambda a: 0.0),
    ("init_method_std", "init_method_std", lambda a: a.initializer_range),
))
