"""HF <-> Megatron weight names, written once as data and used by every tool.

Megatron names here are the *canonical* ones: megatron-core GPTModel with the Transformer Engine
spec, with GLOBAL 0-based layer indices and full (unsharded) tensors. `layout.py` turns them into
stage-local names and TP shards. Two rules are not plain renames:
  fused QKV   rows grouped per query group: [q heads of group g; k_g; v_g] for g = 0..G-1
              (Qwen2's q/k/v biases are fused the same way, so TP splits them with the weight)
  fused fc1   [gate; up] (TP splits each half separately, see layout.SplitRule.GATED)
HF LLaMA weights need no q/k permutation for megatron-core's RoPE (both rotate halves).
Rows with a `when` exist only in the architectures it accepts (QKV bias, Qwen3's q/k norms).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch

from megatron_llamapro.arch import LlamaArch


class Split(Enum):
    """How a tensor is split across tensor-parallel ranks."""

    REPLICATED = "replicated"
    COLUMN = "column"  # dim 0, contiguous chunks (QKV: whole query groups per rank)
    GATED = "gated"    # dim 0, gate and up halves chunked separately: rank r holds [gate_r; up_r]
    ROW = "row"        # dim 1
    VOCAB = "vocab"    # dim 0 after padding the vocabulary


@dataclass(frozen=True)
class Mapping:
    megatron: str               # canonical name; "{L}" is the global layer index
    hf: tuple[str, ...]         # HF names; more than one for the fused rules
    split: Split
    hf_dims: tuple[tuple[str, ...], ...]  # each HF tensor's shape in HF_DIMS names
    fuse: str | None = None     # None | "qkv" | "gate_up"
    when: Callable[[LlamaArch], bool] | None = None  # None: every architecture has this tensor

    @property
    def per_layer(self) -> bool:
        return "{L}" in self.megatron


# The sizes HF tensor shapes are written in (Mapping.hf_dims).
HF_DIMS = {
    "hidden": lambda arch: arch.hidden_size,
    "ffn": lambda arch: arch.ffn_hidden_size,
    "vocab": lambda arch: arch.vocab_size,
    "q": lambda arch: arch.num_attention_heads * arch.head_dim,
    "kv": lambda arch: arch.num_kv_heads * arch.head_dim,
    "head": lambda arch: arch.head_dim,
}

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
ATTN = "decoder.layers.{L}.self_attention"
MLP = "decoder.layers.{L}.mlp"
HF_LAYER = "model.layers.{L}"

WEIGHT_MAP: tuple[Mapping, ...] = (
    Mapping(EMBEDDING, ("model.embed_tokens.weight",), Split.VOCAB, (("vocab", "hidden"),)),
    Mapping(f"{ATTN}.linear_qkv.layer_norm_weight", (f"{HF_LAYER}.input_layernorm.weight",), Split.REPLICATED,
            (("hidden",),)),
    Mapping(f"{ATTN}.linear_qkv.weight",
            (f"{HF_LAYER}.self_attn.q_proj.weight", f"{HF_LAYER}.self_attn.k_proj.weight",
             f"{HF_LAYER}.self_attn.v_proj.weight"), Split.COLUMN,
            (("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")), fuse="qkv"),
    Mapping(f"{ATTN}.linear_qkv.bias",
            (f"{HF_LAYER}.self_attn.q_proj.bias", f"{HF_LAYER}.self_attn.k_proj.bias",
             f"{HF_LAYER}.self_attn.v_proj.bias"), Split.COLUMN,
            (("q",), ("kv",), ("kv",)), fuse="qkv", when=lambda arch: arch.qkv_bias),
    Mapping(f"{ATTN}.q_layernorm.weight", (f"{HF_LAYER}.self_attn.q_norm.weight",), Split.REPLICATED,
            (("head",),), when=lambda arch: arch.qk_layernorm),
    Mapping(f"{ATTN}.k_layernorm.weight", (f"{HF_LAYER}.self_attn.k_norm.weight",), Split.REPLICATED,
            (("head",),), when=lambda arch: arch.qk_layernorm),
    Mapping(f"{ATTN}.linear_proj.weight", (f"{HF_LAYER}.self_attn.o_proj.weight",), Split.ROW, (("hidden", "q"),)),
    Mapping(f"{MLP}.linear_fc1.layer_norm_weight", (f"{HF_LAYER}.post_attention_layernorm.weight",),
            Split.REPLICATED, (("hidden",),)),
    Mapping(f"{MLP}.linear_fc1.weight",
            (f"{HF_LAYER}.mlp.gate_proj.weight", f"{HF_LAYER}.mlp.up_proj.weight"), Split.GATED,
            (("ffn", "hidden"), ("ffn", "hidden")), fuse="gate_up"),
    Mapping(f"{MLP}.linear_fc2.weight", (f"{HF_LAYER}.mlp.down_proj.weight",), Split.ROW, (("hidden", "ffn"),)),
    Mapping(FINAL_NORM, ("model.norm.weight",), Split.REPLICATED, (("hidden",),)),
    Mapping(OUTPUT_LAYER, ("lm_head.weight",), Split.VOCAB, (("vocab", "hidden"),)),
)
LAYER_MAPPINGS = tuple(m for m in WEIGHT_MAP if m.per_layer)

# The two residual-output projections an identity block zeroes (METHOD.md).
IDENTITY_ZEROED = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")

# Transformer Engine modules carry an `_extra_state` entry (FP8 metadata) in their state dict.
TE_EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.linear_proj",
                  "self_attention.core_attention", "mlp.linear_fc1", "mlp.linear_fc2")
# Local-spec names of the norms TE fuses into the following linear layer.
LOCAL_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}



def te_spec_name(key: str) -> str:
    """A module state key in TE-spec naming (local-spec norm names renamed; others unchanged)."""
    for te, local in LOCAL_NORM_NAMES.items():
        if key.endswith(local):
            return key[: -len(local)] + te
    return key


def local_spec_name(key: str) -> str:
    """A TE-spec state key as the local spec names it."""
    for te, local in LOCAL_NORM_NAMES.items():
        if key.endswith(te):
            return key[: -len(te)] + local
    return key


_LAYER_RE = re.compile(r"^(decoder\.layers\.|model\.layers\.)(\d+)\.(.*)$")


def layer_of(name: str) -> int | None:
    """Layer index in a Megatron or HF name, None for non-layer tensors."""
    match = _LAYER_RE.match(name)
    return int(match.group(2)) if match else None


def with_layer(name: str, layer: int) -> str:
    """The same name with its layer index replaced."""
    match = _LAYER_RE.match(name)
    if not match:
        raise ValueError(f"{name} is not a per-layer tensor name")
    return f"{match.group(1)}{layer}.{match.group(3)}"


def layer_suffix(name: str) -> str:
    """'self_attention.linear_qkv.weight' for 'decoder.layers.7.self_attention.linear_qkv.weight'."""
    match = _LAYER_RE.match(name)
    if not match:
        raise ValueError(f"{name} is not a per-layer tensor name")
    return match.group(3)


def layer_names(layer: int, arch: LlamaArch | None) -> list[str]:
    """The canonical names of one transformer layer's tensors in this architecture (None: the
    tensors every architecture has)."""
    return [m.megatron.format(L=layer) for m in LAYER_MAPPINGS
            if m.when is None or (arch is not None and m.when(arch))]


def canonical_names(arch: LlamaArch) -> list[str]:
    """Every canonical tensor of a model, in a stable order (embedding, layers, final norm, output).

    A tied model has no output layer of its own (see layout.StagePlacement for the copy Megatron
    keeps on the last pipeline stage)."""
    names = [EMBEDDING]
    for layer in range(arch.num_layers):
        names += layer_names(layer, arch)
    names.append(FINAL_NORM)
    if not arch.tie_word_embeddings:
        names.append(OUTPUT_LAYER)
    return names


def mapping_for(megatron_name: str) -> tuple[Mapping, int | None]:
    layer = layer_of(megatron_name)
    template = with_layer(megatron_name, 0).replace("layers.0.", "layers.{L}.") if layer is not None \
        else megatron_name
    for mapping in WEIGHT_MAP:
        if mapping.megatron == template:
            return mapping, layer
    raise KeyError(f"no HF mapping for Megatron tensor {megatron_name}")


def split_rule(megatron_name: str) -> Split:
    return mapping_for(megatron_name)[0].split


def hf_names_for(megatron_name: str) -> tuple[str, ...]:
    mapping, layer = mapping_for(megatron_name)
    return tuple(n.format(L=layer) for n in mapping.hf)


# ---- the two fused rules ---------------------------------------------------------------------

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: LlamaArch) -> torch.Tensor:
    """Weights [rows, hidden] or biases [rows]: the rows regrouped per query group."""
    groups, per_group, d = arch.query_groups, arch.heads_per_group, arch.head_dim
    rest = tuple(q.shape[1:])
    q = q.reshape(groups, per_group * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest).contiguous()


def unfuse_qkv(qkv: torch.Tensor, arch: LlamaArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, per_group, d = arch.query_groups, arch.heads_per_group, arch.head_dim
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


def hf_to_megatron(megatron_name: str, read_hf: Callable[[str], torch.Tensor],
                   arch: LlamaArch) -> torch.Tensor:
    """The canonical Megatron tensor `megatron_name`, built from HF tensors fetched by `read_hf`."""
    mapping, _ = mapping_for(megatron_name)
    tensors = [read_hf(n) for n in hf_names_for(megatron_name)]
    if mapping.fuse == "qkv":
        return fuse_qkv(*tensors, arch)
    if mapping.fuse == "gate_up":
        return torch.cat(tensors, dim=0).contiguous()
    return tensors[0]


def megatron_to_hf(megatron_name: str, tensor: torch.Tensor, arch: LlamaArch) -> dict[str, torch.Tensor]:
    """HF tensors for one canonical Megatron tensor (vocab rows trimmed to the HF vocab size)."""
    mapping, _ = mapping_for(megatron_name)
    names = hf_names_for(megatron_name)
    if mapping.fuse == "qkv":
        return dict(zip(names, unfuse_qkv(tensor, arch)))
    if mapping.fuse == "gate_up":
        gate, up = torch.chunk(tensor, 2, dim=0)
        return {names[0]: gate.contiguous(), names[1]: up.contiguous()}
    if mapping.split is Split.VOCAB:
        tensor = tensor[: arch.vocab_size]
    return {names[0]: tensor}


def hf_shapes(megatron_name: str, arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    """Shapes of the HF tensors `megatron_to_hf` returns for a canonical tensor, in that order."""
    mapping, _ = mapping_for(megatron_name)
    return {name: tuple(HF_DIMS[dim](arch) for dim in dims)
            for name, dims in zip(hf_names_for(megatron_name), mapping.hf_dims)}


def hf_model_shapes(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the model and its shape, in canonical order (no lm_head when tied)."""
    return {hf_name: shape for name in canonical_names(arch) for hf_name, shape in hf_shapes(name, arch).items()}
