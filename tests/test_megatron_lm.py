"""Drop-in beside Megatron-LM: its checkpoints read, and ours readable by it.

* Checkpoints laid out as Megatron-LM writes them (legacy `torch` with iter_0000010, mp_rank_XX_YYY,
  model0..modelN, TE-spec keys with `_extra_state`, optimizer/rng keys; and `torch_dist` by
  megatron-core's dist_checkpointing with args in common.pt), no llamapro.json: exported to HF
  (logits equal the megatron-core model's), expanded, trained.
* Our legacy shards: the stored args carry every field Megatron-LM's readers take, load under a
  weights_only torch.load with megatron-core's allow-list only, and their keys are exactly those of
  megatron-core 0.16.1's TE-spec GPTModel (derived from the spec itself; TE is not installed here).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_llamapro.arch import LlamaArch
from megatron_llamapro.checkpoint.verify import hf_logits
from megatron_llamapro.expansion.apply import sample_tokens
from tests.training_lib import VOCAB, assets, train, train_args  # noqa: F401  (assets is a fixture)

LAYERS, HIDDEN, FFN, HEADS, GROUPS, PADDED = 6, 64, 128, 4, 2, 512
ITERATION = 10
# PP=2 x VPP=3: chunk k of stage s holds global layer 2k + s (megatron-core's interleaved placement)
PP, VPP = 2, 3


def megatron_lm_args(ckpt_format: str, tokenizer_model: str | None) -> argparse.Namespace:
    """args as Megatron-LM's pretrain_gpt.py stores them (field names from its arguments.py,
    after validate_args): a LLaMA-2-style GQA model at TP1 PP2 VPP3, bf16."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
        kv_channels=HIDDEN // HEADS, group_query_attention=True, num_query_groups=GROUPS,
        seq_length=128, max_position_embeddings=256, position_embedding_type="rope",
        add_position_embedding=False, use_rotary_position_embeddings=True, rotary_base=10000,
        rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=False, rope_scaling_factor=8.0,
        normalization="RMSNorm", norm_epsilon=1e-5, apply_layernorm_1p=False, swiglu=True,
        squared_relu=False, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        untie_embeddings_and_output_weights=True, attention_dropout=0.0, hidden_dropout=0.0,
        apply_query_key_layer_scaling=False, init_method_std=0.02, num_experts=None,
        vocab_size=None, padded_vocab_size=PADDED, make_vocab_size_divisible_by=128,
        tokenizer_type="Llama2Tokenizer", tokenizer_model=tokenizer_model,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=PP,
        virtual_pipeline_model_parallel_size=VPP, num_layers_per_virtual_pipeline_stage=1,
        expert_model_parallel_size=1, context_parallel_size=1, sequence_parallel=False,
        bf16=False, fp16=False, params_dtype=torch.float32, transformer_impl="transformer_engine",
        attention_backend=AttnBackend.auto, ckpt_format=ckpt_format, use_dist_ckpt=ckpt_format != "torch",
        micro_batch_size=1, global_batch_size=8, train_iters=100, iteration=ITERATION,
        consumed_train_samples=80, skipped_train_samples=0, consumed_valid_samples=0,
        world_size=2, data_parallel_size=1, rank=0, use_mcore_models=True,
    )


# ---- the TE spec's state-dict keys, from megatron-core's spec without Transformer Engine ---------

# State entries of each TE module class for an RMSNorm model without biases (TE 2.x: LayerNormLinear
# registers layer_norm_bias only for LayerNorm; use_bias=False leaves bias a plain attribute;
# TransformerEngineBaseModule and the TE-ops RMSNorm override get_extra_state; research14 section 2).
TE_MODULE_STATE = {
    "TELayerNormColumnParallelLinear": ("weight", "layer_norm_weight", "_extra_state"),
    "TEColumnParallelLinear": ("weight", "_extra_state"),
    "TERowParallelLinear": ("weight", "_extra_state"),
    "TELinear": ("weight", "_extra_state"),
    "TEDotProductAttention": ("_extra_state",),
    "TENorm": ("weight", "_extra_state"),
}


def te_spec_layer_keys(monkeypatch) -> set[str]:
    """Per-layer state keys of megatron-core's get_gpt_layer_with_transformer_engine_spec(): its own
    spec walked with stand-ins for the TE classes (same names) that TESpecProvider returns."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.spec_utils import ModuleSpec

    stand_in = {name: type(name, (), {}) for name in TE_MODULE_STATE}

    class Provider:  # TESpecProvider's interface (megatron/core/extensions/transformer_engine_spec_provider.py)
        def linear(self): return stand_in["TELinear"]
        def column_parallel_linear(self): return stand_in["TEColumnParallelLinear"]
        def row_parallel_linear(self): return stand_in["TERowParallelLinear"]
        def fuse_layernorm_and_linear(self): return True
        def column_parallel_layer_norm_linear(self): return stand_in["TELayerNormColumnParallelLinear"]
        def layer_norm(self, rms_norm=False, for_qk=False): return stand_in["TENorm"]
        def core_attention(self): return stand_in["TEDotProductAttention"]
        def activation_func(self): raise AssertionError("not used by the LLaMA spec")

    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", Provider, raising=False)
    spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    keys: set[str] = set()
    seen_classes: set[str] = set()

    def walk(submodules, prefix):
        for field in dataclasses.fields(submodules):
            value = getattr(submodules, field.name)
            if isinstance(value, ModuleSpec):
                if value.submodules is not None:
                    walk(value.submodules, f"{prefix}{field.name}.")
            elif isinstance(value, type) and value.__name__ in TE_MODULE_STATE and value in stand_in.values():
                seen_classes.add(value.__name__)
                keys.update(f"{prefix}{field.name}.{entry}" for entry in TE_MODULE_STATE[value.__name__])

    walk(spec.submodules, "")
    assert {"TELayerNormColumnParallelLinear", "TERowParallelLinear", "TEDotProductAttention"} <= seen_classes
    return keys


def te_spec_keys(layer_keys: set[str], layers: int, first: bool, last: bool, tied: bool) -> set[str]:
    """A stage (or VPP chunk) of a TE-spec GPTModel: its layers (local 0-based indices), the
    embedding on the first, and on the last the final norm (TENorm, transformer_block.py) and
    output_layer (megatron ColumnParallelLinear: `_extra_state` always, a weight unless tied on a
    single stage)."""
    keys = {f"decoder.layers.{i}.{k}" for i in range(layers) for k in layer_keys}
    if first:
        keys.add("embedding.word_embeddings.weight")
    if last:
        keys |= {"decoder.final_layernorm.weight", "decoder.final_layernorm._extra_state",
                 "output_layer._extra_state"}
        if not (tied and first):
            keys.add("output_layer.weight")
    return keys


# ---- a checkpoint written the way Megatron-LM writes it --------------------------------------------

@dataclasses.dataclass
class MegatronLM:
    legacy: Path
    dist: Path
    tokens: torch.Tensor
    logits: torch.Tensor  # the megatron-core model's, [batch, seq, VOCAB]


def _te_named(state: dict, layer_keys: set[str]) -> dict:
    """A local-spec state dict as Megatron-LM's TE-spec model names it, with TE's `_extra_state`."""
    renames = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    out = {}
    for key, value in state.items():
        if key.endswith("_extra_state"):
            continue
        for local, te in renames.items():
            if key.endswith(local):
                key = key[: -len(local)] + te
        out[key] = value.detach().clone()
    layers = {int(k.split(".")[2]) for k in out if k.startswith("decoder.layers.")}
    for i in layers:
        for key in layer_keys:
            if key.endswith("_extra_state"):
                out[f"decoder.layers.{i}.{key}"] = torch.empty(0, dtype=torch.uint8)
    return out


@pytest.fixture(scope="module")
def megatron_lm(assets, tmp_path_factory):  # noqa: F811
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    from megatron_llamapro.model import ModelOptions, build_model
    from megatron_llamapro.pipeline import forward_only_logits
    from megatron_llamapro.runtime.distributed import single_process_megatron

    root = tmp_path_factory.mktemp("megatron_lm")
    mp = pytest.MonkeyPatch()
    layer_keys = te_spec_layer_keys(mp)
    mp.undo()
    arch = LlamaArch(num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
                     num_kv_heads=GROUPS, vocab_size=VOCAB, max_position_embeddings=256)
    tokens = sample_tokens(VOCAB, seq=12)
    with single_process_megatron():
        torch.manual_seed(0)
        model = build_model(arch, ModelOptions(padded_vocab_size=PADDED, use_te=False))[0]
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "layernorm" in name:
                    param.add_(torch.randn_like(param) * 0.1)  # init leaves them all 1
            for weight in (model.embedding.word_embeddings.weight, model.output_layer.weight):
                weight[VOCAB:] = weight[VOCAB - 1]  # Megatron-LM's savers pad with the last row
        model.eval()
        logits = forward_only_logits([model], tokens)[..., :VOCAB].float().clone()
        full = _te_named(model.state_dict(), layer_keys)

        # legacy: iter_0000010/mp_rank_00_00{s}/model_optim_rng.pt with model0..model2
        it_dir = root / "legacy" / f"iter_{ITERATION:07d}"
        for stage in range(PP):
            payload = {}
            for chunk in range(VPP):
                layer = 2 * chunk + stage
                state = {k.replace(f"decoder.layers.{layer}.", "decoder.layers.0."): v for k, v in full.items()
                         if k.startswith(f"decoder.layers.{layer}.")}
                if stage == 0 and chunk == 0:
                    state["embedding.word_embeddings.weight"] = full["embedding.word_embeddings.weight"]
                if stage == PP - 1 and chunk == VPP - 1:
                    for key in ("decoder.final_layernorm.weight", "output_layer.weight"):
                        state[key] = full[key]
                    state["decoder.final_layernorm._extra_state"] = torch.empty(0, dtype=torch.uint8)
                    state["output_layer._extra_state"] = None
                payload[f"model{chunk}"] = state
            payload.update(
                args=megatron_lm_args("torch", "/cluster/elsewhere/llama2/tokenizer.model"),
                checkpoint_version=3.0, iteration=ITERATION, num_floating_point_operations_so_far=1.0e12,
                optimizer={"optimizer": {"state": {}, "param_groups": []}, "fp32_from_fp16_params": []},
                opt_param_scheduler={"num_steps": 80, "max_lr": 1e-4},
                rng_state=[{"random_rng_state": None, "np_rng_state": None,
                            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": None,
                            "rng_tracker_states": {}}],
            )
            rank_dir = it_dir / f"mp_rank_00_{stage:03d}"
            rank_dir.mkdir(parents=True)
            torch.save(payload, rank_dir / "model_optim_rng.pt")
        (root / "legacy" / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))

        # torch_dist: the TE-keyed sharded state dict; args & co. land in common.pt
        sharded = model.sharded_state_dict()
        for value in sharded.values():
            if isinstance(value, ShardedBase):
                value.key = value.key.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight") \
                    .replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
        dist_dir = root / "dist" / f"iter_{ITERATION:07d}"
        dist_dir.mkdir(parents=True)
        args = megatron_lm_args("torch_dist", str((assets.hf / "tokenizer.model").absolute()))
        dist_checkpointing.save({"model": sharded, "args": args, "checkpoint_version": 3.0,
                                 "iteration": ITERATION, "num_floating_point_operations_so_far": 1.0e12},
                                str(dist_dir))
        (root / "dist" / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    assert (dist_dir / "common.pt").is_file() and (dist_dir / "metadata.json").is_file()
    assert not (root / "legacy" / "llamapro.json").exists()
    return MegatronLM(root / "legacy", root / "dist", tokens, logits)


def test_megatron_lm_legacy_export_expand_train(megatron_lm, assets, tmp_path):  # noqa: F811
    """A legacy checkpoint from Megatron-LM (its args carry a tokenizer path of another machine):
    the model comes from its args, the tokenizer from --tokenizer-model; export, expand, train."""
    from megatron_llamapro.checkpoint.open import open_checkpoint
    from megatron_llamapro.cli import convert_megatron_to_hf, expand_blocks

    tok = assets.hf / "tokenizer.model"
    with pytest.warns(UserWarning, match="padded size 512"):
        with open_checkpoint(megatron_lm.legacy) as source:
            assert source.arch.vocab_size == PADDED and source.tokenizer_dir() is None
    with open_checkpoint(megatron_lm.legacy, tokenizer=tok) as source:
        m = source.manifest
        assert (m.arch.vocab_size, m.padded_vocab_size, m.arch.num_kv_heads, m.arch.tie_word_embeddings) == \
            (VOCAB, PADDED, GROUPS, False)
        assert m.layout.describe() == "TP=1 PP=2 VPP=3" and m.tokenizer_type == "sentencepiece"

    hf_out = tmp_path / "hf"
    assert convert_megatron_to_hf.main(["--megatron-dir", str(megatron_lm.legacy), "--out", str(hf_out),
                                        "--tokenizer-model", str(tok)]) == 0
    assert (hf_out / "tokenizer.model").read_bytes() == tok.read_bytes()
    exported = hf_logits(hf_out, megatron_lm.tokens)
    assert exported.shape[-1] == VOCAB
    assert (exported - megatron_lm.logits).abs().max().item() < 1e-4

    expanded = tmp_path / "expanded"
    assert expand_blocks.main(["--in", str(megatron_lm.legacy), "--out", str(expanded), "--pp", "1",
                               "--num-new-blocks", "2", "--tokenizer-model", str(tok), "--verify"]) == 0
    assert (expanded / "tokenizer" / "tokenizer.model").is_file()
    train(train_args(assets, tmp_path / "run", 2, load=expanded))
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_megatron_lm_torch_dist_export_and_expand(megatron_lm, assets, tmp_path):  # noqa: F811
    """A torch_dist checkpoint from Megatron-LM: args from common.pt, the tokenizer its args name
    (an absolute path that exists here)."""
    from megatron_llamapro.checkpoint.open import open_checkpoint
    from megatron_llamapro.cli import convert_megatron_to_hf, expand_blocks

    with open_checkpoint(megatron_lm.dist) as source:
        assert type(source).__name__ == "DistSource"
        assert source.arch.vocab_size == VOCAB and source.manifest.padded_vocab_size == PADDED
    hf_out = tmp_path / "hf"
    assert convert_megatron_to_hf.main(["--megatron-dir", str(megatron_lm.dist), "--out", str(hf_out)]) == 0
    assert (hf_out / "tokenizer.model").is_file()
    assert (hf_logits(hf_out, megatron_lm.tokens) - megatron_lm.logits).abs().max().item() < 1e-4
    assert expand_blocks.main(["--in", str(megatron_lm.dist), "--out", str(tmp_path / "exp"),
                               "--num-new-blocks", "2", "--verify"]) == 0


def test_megatron_lm_args_refused_when_not_llama():
    from megatron_llamapro.arch import ArchError

    args = megatron_lm_args("torch", None)
    args.normalization = "LayerNorm"
    with pytest.raises(ArchError, match="args.normalization='LayerNorm' must be RMSNorm"):
        LlamaArch.from_megatron_args(args, VOCAB, "ckpt")
    args = megatron_lm_args("torch", None)
    del args.norm_epsilon
    args.layernorm_epsilon = 1e-6
    assert LlamaArch.from_megatron_args(args, VOCAB, "ckpt").rms_norm_eps == 1e-6  # older field name


# ---- our legacy shards, as Megatron-LM's readers see them -------------------------------------------

# Every field of the stored args a Megatron-LM (core_v0.16) code path reads (research14 section 1).
# L: tools/checkpoint loader_base/loader_core; S: saver_base; A: load_args_from_checkpoint (under
# --use-checkpoint-args, and always in L); C: check_checkpoint_args; LC: load_checkpoint.
REQUIRED_ARGS = {
    "num_layers": int,                      # A, C (plain attribute), L check_for_arg, S argv
    "hidden_size": int,                     # A, C (plain attribute), L check_for_arg
    "num_attention_heads": int,             # A, C (plain attribute), L check_for_arg
    "ffn_hidden_size": int,                 # A (else validate_args derives a wrong SwiGLU size)
    "kv_channels": int,                     # A
    "seq_length": int,                      # A, L check_for_arg
    "max_position_embeddings": int,         # A, L check_for_arg, C with --vocab-file
    "group_query_attention": bool,          # A force-copies it
    "num_query_groups": int,                # A force-copies it
    "position_embedding_type": str,         # A, L check_for_arg, S argv
    "add_position_embedding": bool,         # A, C (default True when missing: must match the run)
    "use_rotary_position_embeddings": bool,  # A
    "rotary_base": int,                     # A (argparse type=int)
    "rotary_percent": float,                # A
    "rotary_interleaved": bool,             # A
    "use_rope_scaling": bool,               # S blanket copy (the model build reads it)
    "rope_scaling_factor": float,           # S blanket copy
    "add_bias_linear": bool,                # A, L md.linear_bias, S argv
    "add_qkv_bias": bool,                   # A, L md.qkv_bias
    "squared_relu": bool,                   # A
    "swiglu": bool,                         # A, L check_for_arg / md.swiglu
    "untie_embeddings_and_output_weights": bool,  # A, L md.output_layer
    "apply_layernorm_1p": bool,             # A
    "normalization": str,                   # A, L norm_has_bias
    "norm_epsilon": float,                  # S blanket copy -> TransformerConfig.layernorm_epsilon
    "apply_query_key_layer_scaling": bool,  # S (plain attribute)
    "attention_dropout": float,             # A force-copies it into the run
    "hidden_dropout": float,                # A force-copies it into the run
    "tensor_model_parallel_size": int,      # A mp-args, C with --ckpt-format torch, L
    "pipeline_model_parallel_size": int,    # A mp-args, C, L
    "expert_model_parallel_size": int,      # A mp-args, L schema
    "fp16": bool,                           # L (plain attribute)
    "bf16": bool,                           # L (plain attribute)
    "params_dtype": torch.dtype,            # S blanket copy (as Megatron-LM stores it)
    "sequence_parallel": bool,              # S (plain attribute)
    "context_parallel_size": int,           # S validate_args: must be 1
    "tokenizer_type": str,                  # A, L check_for_arg (exit if None), S argv (choices)
    "padded_vocab_size": int,               # A, model build in L (no tokenizer there)
    "make_vocab_size_divisible_by": int,    # C with --vocab-file, S
    "vocab_size": int,                      # S blanket copy
    "consumed_train_samples": int,          # LC getattr, L asserts equal across TP ranks
    "consumed_valid_samples": int,          # LC getattr, L
    "skipped_train_samples": int,           # LC getattr
    "ckpt_format": str,                     # A, S keep-list
    "iteration": int,                       # (the top-level `iteration` is what A/LC read; kept an int)
}
# Fields that Megatron-LM's own args never hold and whose presence breaks its readers.
FORBIDDEN_ARGS = ("disable_bias_linear",  # A: would override add_bias_linear
                  "batch_size", "warmup", "model_parallel_size", "checkpoint_activations")  # S validate_args
TOKENIZER_TYPES = ("Llama2Tokenizer", "HuggingFaceTokenizer")  # of arguments.py's --tokenizer-type choices


@pytest.fixture(scope="module")
def our_legacy(assets, tmp_path_factory):  # noqa: F811
    from megatron_llamapro.cli import convert_hf_to_megatron

    out = tmp_path_factory.mktemp("ours") / "tp1pp2"
    assert convert_hf_to_megatron.main(["--hf-dir", str(assets.hf), "--out", str(out), "--pp", "2"]) == 0
    return out


def _weights_only_load_with_megatron_allow_list(file: Path) -> dict:
    """torch.load(weights_only=True) with exactly what megatron-core registers (safe_globals.py)."""
    import megatron.core  # noqa: F401
    from megatron.core.safe_globals import register_safe_globals

    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        register_safe_globals()
        return torch.load(file, map_location="cpu", weights_only=True)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def test_our_args_carry_what_megatron_lm_reads(our_legacy):
    files = sorted(our_legacy.glob("release/mp_rank_*/model_optim_rng.pt"))
    assert [f.parent.name for f in files] == ["mp_rank_00_000", "mp_rank_00_001"]
    assert (our_legacy / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    for file in files:
        state = _weights_only_load_with_megatron_allow_list(file)
        assert state["checkpoint_version"] == 3.0 and state["iteration"] == 0
        args = state["args"]
        assert isinstance(args, argparse.Namespace)
        for name, kind in REQUIRED_ARGS.items():
            assert hasattr(args, name), name
            value = getattr(args, name)
            assert isinstance(value, kind) and not (kind is int and isinstance(value, bool)), (name, value)
        for name in FORBIDDEN_ARGS:
            assert not hasattr(args, name), name
        assert args.tokenizer_model is None  # never overrides the user's --tokenizer-model
        assert args.tokenizer_type in TOKENIZER_TYPES
        assert (args.sequence_parallel, args.apply_query_key_layer_scaling, args.add_position_embedding) == \
            (False, False, False)
        assert args.position_embedding_type == "rope" and args.normalization == "RMSNorm" and args.swiglu
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (1, 2)
        assert not (args.fp16 and args.bf16) and args.context_parallel_size == 1


def test_our_legacy_keys_are_the_te_spec_model_keys(our_legacy, monkeypatch):
    """Strict load into megatron-core 0.16.1's TE-spec GPTModel: no missing, no unexpected keys."""
    layer_keys = te_spec_layer_keys(monkeypatch)
    assert layer_keys == {
        "self_attention.linear_qkv.weight", "self_attention.linear_qkv.layer_norm_weight",
        "self_attention.linear_qkv._extra_state", "self_attention.core_attention._extra_state",
        "self_attention.linear_proj.weight", "self_attention.linear_proj._extra_state",
        "mlp.linear_fc1.weight", "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1._extra_state",
        "mlp.linear_fc2.weight", "mlp.linear_fc2._extra_state"}
    layers_per_stage = 3  # the 6-layer fixture at PP=2
    for stage in range(2):
        state = torch.load(our_legacy / "release" / f"mp_rank_00_{stage:03d}" / "model_optim_rng.pt",
                           map_location="cpu", weights_only=True)["model"]
        expected = te_spec_keys(layer_keys, layers_per_stage, first=stage == 0, last=stage == 1, tied=False)
        assert set(state) - expected == set(), "unexpected"
        assert expected - set(state) == set(), "missing"
        for key, value in state.items():
            if key == "output_layer._extra_state":
                assert value is None  # megatron's ColumnParallelLinear.get_extra_state
            elif key.endswith("._extra_state"):  # what TE 2.x writes for a non-FP8 module
                assert isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.numel() == 0, key


def test_tied_single_stage_keys(assets, tmp_path, monkeypatch):  # noqa: F811
    """Tied embeddings on one stage: output_layer has no weight, but its `_extra_state` is there."""
    from megatron_llamapro.cli import convert_hf_to_megatron
    from tests.fixtures import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "hf", num_layers=2, tie=True)
    out = tmp_path / "tied"
    assert convert_hf_to_megatron.main(["--hf-dir", str(hf), "--out", str(out)]) == 0
    state = torch.load(out / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)["model"]
    assert set(state) == te_spec_keys(te_spec_layer_keys(monkeypatch), 2, first=True, last=True, tied=True)
