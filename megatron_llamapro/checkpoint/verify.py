"""Logit parity between an HF checkpoint (transformers) and a Megatron checkpoint (megatron-core).

Both models run in fp32 on the same token ids; the Megatron side is built at TP=PP=1 in this
process (the checkpoint readers merge TP/PP shards), so any layout verifies without launching
ranks. When a conversion changed the dtype (e.g. fp32 HF -> bf16 Megatron), pass the output dtype
as `round_to`: both models' weights are rounded through it (a no-op on the side already in it), so
the comparison measures the conversion, not the rounding.
Memory: one fp32 copy of the model at a time (the HF model is freed before Megatron's is built).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_llamapro.checkpoint.source import CheckpointError
from megatron_llamapro.errors import VerifyError

# Relative: max |logit difference| / max |reference logit|. Measured with
# tools/verify_sensitivity.py on random LLaMA shapes (max |logit| 26-97): fp32 rounding alone gives
# 5e-7 (hidden 256), 9e-7 (hidden 1024) and 1.5e-6 (hidden 2048, 8 layers; 1.5e-4 absolute, which
# the old absolute bound of 1e-4 failed); a swapped q/k head or transposed gate/up gives 6e-2 or
# more. Trained models have larger activations than random ones, so the margin is kept wide.
DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class VerifyResult:
    max_abs_diff: float
    reference_max_abs: float
    tolerance: float  # relative, see DEFAULT_TOLERANCE
    tokens_shape: tuple[int, ...]
    vocab_size: int
    top1_agreement: float  # share of positions whose argmax token agrees

    @property
    def relative_diff(self) -> float:
        if self.max_abs_diff != self.max_abs_diff or self.max_abs_diff == float("inf"):
            return float("inf")
        return self.max_abs_diff / max(self.reference_max_abs, 1e-30)

    @property
    def ok(self) -> bool:
        return self.relative_diff <= self.tolerance

    def describe(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"verify: max |logit diff| {self.max_abs_diff:.2e} = {self.relative_diff:.2e} of max |logit| "
                f"{self.reference_max_abs:.3g} (tolerance {self.tolerance:.0e} relative) over tokens "
                f"{list(self.tokens_shape)} x vocab {self.vocab_size}, argmax agrees at "
                f"{self.top1_agreement:.1%} of positions: {verdict}")


def sample_tokens(vocab_size: int, batch: int = 2, seq: int = 32, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen)


def _round_parameters(model: torch.nn.Module, dtype: str | None) -> None:
    """Round fp32 parameters through `dtype` (identity for values already representable in it)."""
    from megatron_llamapro.arch import torch_dtype

    if dtype in (None, "fp32"):
        return
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch_dtype(dtype)).to(param.dtype))


def load_hf_model(hf_dir: Path) -> torch.nn.Module:
    """The HF checkpoint as a transformers model in fp32 on the CPU.

    Built with `from_config` and filled with `load_state_dict` rather than `from_pretrained`: once
    the CPU compatibility layer has patched torch's tensor factories in this process (any earlier
    megatron-core use), `from_pretrained`'s meta-device loading leaves RoPE's non-persistent
    `inv_freq` buffers uninitialized, which silently corrupts the reference logits.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_llamapro.checkpoint.hf import SafetensorsFile

    hf_dir = Path(hf_dir)
    config = AutoConfig.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        st = SafetensorsFile(file)
        state.update({name: st.get(name) for name in st.keys()})
    if not state:
        for file in sorted(hf_dir.glob("pytorch_model*.bin")):
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - allowed or unexpected:
        raise CheckpointError(f"{hf_dir}: weights do not match the transformers model "
                              f"(missing {sorted(set(missing) - allowed)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if "lm_head.weight" in missing:
        model.tie_weights()
    return model.eval()


def hf_logits(hf_dir: Path, tokens: torch.Tensor, round_to: str | None = None) -> torch.Tensor:
    """Logits [batch, seq, vocab] of the HF checkpoint run by transformers in fp32 on the CPU."""
    model = load_hf_model(hf_dir)
    _round_parameters(model, round_to)
    with torch.no_grad():
        logits = model(input_ids=tokens, use_cache=False).logits.float().clone()
    del model
    gc.collect()
    return logits


def megatron_logits(source, tokens: torch.Tensor, round_to: str | None = None) -> torch.Tensor:
    """Logits [batch, seq, vocab] of a checkpoint source loaded into a TP=PP=1 fp32 GPTModel."""
    from megatron_llamapro.checkpoint.load import load_source_into_model
    from megatron_llamapro.model import ModelOptions, build_model
    from megatron_llamapro.runtime.distributed import device, single_process_megatron
    from megatron_llamapro.pipeline import forward_only_logits

    arch = source.arch
    padded = arch.padded_vocab_size(1, source.manifest.make_vocab_size_divisible_by)
    with single_process_megatron():
        chunks = build_model(arch, ModelOptions(params_dtype="fp32", padded_vocab_size=padded,
                                                config_overrides=(("perform_initialization", False),)))
        load_source_into_model(chunks, source, padded)
        for chunk in chunks:
            chunk.eval()
            _round_parameters(chunk, round_to)
        logits = forward_only_logits(chunks, tokens.to(device()))
        logits = logits[..., : arch.vocab_size].float().cpu().clone()
        del chunks
    gc.collect()
    return logits


def compare(hf_dir: Path, megatron_source, tolerance: float = DEFAULT_TOLERANCE,
            tokens: torch.Tensor | None = None, round_to: str | None = None) -> VerifyResult:
    """Run both models on the same tokens; the result says whether they agree within `tolerance`."""
    from megatron_llamapro.arch import LlamaArch

    arch = megatron_source.arch
    hf_arch = LlamaArch.from_hf_dir(hf_dir)
    if (hf_arch.vocab_size, hf_arch.num_layers, hf_arch.hidden_size) != \
            (arch.vocab_size, arch.num_layers, arch.hidden_size):
        raise CheckpointError(f"verify: {hf_dir} and the Megatron checkpoint describe different models")
    if tokens is None:
        tokens = sample_tokens(arch.vocab_size, seq=min(32, arch.max_position_embeddings))
    reference = hf_logits(hf_dir, tokens, round_to)
    ours = megatron_logits(megatron_source, tokens, round_to)
    diff = (reference - ours).abs().max().item()
    if diff != diff:  # NaN anywhere is a failure, never a pass
        diff = float("inf")
    top1 = (reference.argmax(-1) == ours.argmax(-1)).float().mean().item()
    return VerifyResult(diff, reference.abs().max().item(), tolerance, tuple(tokens.shape),
                        arch.vocab_size, top1)


def verify_pair(hf_dir: Path, megatron_dir: Path, tolerance: float = DEFAULT_TOLERANCE,
                round_to: str | None = None, tokenizer: Path | None = None) -> VerifyResult:
    """Compare an HF directory with a Megatron checkpoint directory (any format or layout).

    Raises VerifyError (one line) when the logits differ by more than `tolerance`.
    """
    from megatron_llamapro.checkpoint.open import open_checkpoint
    with open_checkpoint(Path(megatron_dir), tokenizer=tokenizer) as source:
        result = compare(Path(hf_dir), source, tolerance, round_to=round_to)
    if not result.ok:
        raise VerifyError(result.describe())
    return result


def verify_written(hf_dir: Path, megatron_dir: Path, out: Path, tolerance: float,
                   round_to: str | None, tokenizer: Path | None = None) -> str:
    """verify_pair for a tool that has just written `out`: the failure names the kept output."""
    try:
        return verify_pair(hf_dir, megatron_dir, tolerance, round_to=round_to, tokenizer=tokenizer).describe()
    except VerifyError as exc:
        raise VerifyError(f"{exc} (output kept at {out} for inspection)") from None
