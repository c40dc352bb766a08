"""Qwen2/Qwen2.5, Qwen3 dense and LLaMA-3.x through convert, reshard, expand, train, export.

Tiny random models made with transformers' own config classes (fp32), one per family:
  qwen2   q/k/v biases, tied embeddings, rope_theta 1e6, a Qwen-style tokenizer.json (no BOS)
  qwen3   per-head q/k RMSNorm, head_dim 32 != hidden / heads (16), untied
  llama3  rope_scaling llama3 (factor 32), rope_theta 500000, tied (as LLaMA-3.2 1B/3B)
Multi-process checks are grouped into one two-rank run; the training check is one pretrain process.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_llamapro.arch import ArchError, LlamaArch

FAMILIES = ("qwen2", "qwen3", "llama3")
HF_CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama3": "LlamaForCausalLM"}
LLAMA3_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=None)


def family_config(family: str, vocab: int = 300, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    kwargs = dict(COMMON, vocab_size=vocab, eos_token_id=1, max_position_embeddings=256)
    if family == "qwen2":
        return Qwen2Config(**{**kwargs, "tie_word_embeddings": True, "rope_theta": 1e6, **overrides})
    if family == "qwen3":
        return Qwen3Config(**{**kwargs, "head_dim": 32, "rope_theta": 1e6, **overrides})
    return LlamaConfig(**{**kwargs, "max_position_embeddings": 131072, "tie_word_embeddings": True,
                          "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_ROPE), **overrides})


def qwen_tokenizer(out: Path) -> Path:
    """A byte-level BPE tokenizer.json configured as Qwen's: no BOS, eos and pad <|end_of_text|>."""
    from megatron_llamapro.data.synthetic import domain_corpus, general_corpus, train_hf_bpe

    train_hf_bpe(general_corpus(200) + domain_corpus(200), 400, out)
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def make_family_hf(out: Path, family: str, vocab: int = 300, tokenizer: Path | None = None, seed: int = 0) -> Path:
    import shutil

    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, vocab))
    with torch.no_grad():  # init leaves norms at 1 and biases at 0: perturb so mapping errors show
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        for file in tokenizer.iterdir():
            shutil.copy(file, out / file.name)
    return out


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def convert(src: Path, out: Path, fmt: str = "torch", tp: int = 1, pp: int = 1, vpp: int | None = None):
    from megatron_llamapro.checkpoint.convert import write_checkpoint
    from megatron_llamapro.checkpoint.layout import Layout
    from megatron_llamapro.checkpoint.open import open_checkpoint

    write_checkpoint(functools.partial(open_checkpoint, Path(src)), out, fmt,
                     Layout(tp, pp, vpp) if fmt != "hf" else Layout())
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def hf_dirs(root) -> dict[str, Path]:
    tokenizer = qwen_tokenizer(root / "qwen_tokenizer")
    vocab = json.loads((tokenizer / "tokenizer.json").read_text())
    qwen_vocab = len(vocab["model"]["vocab"]) + len([t for t in vocab["added_tokens"]
                                                    if t["content"] not in vocab["model"]["vocab"]])
    return {"qwen2": make_family_hf(root / "hf-qwen2", "qwen2", qwen_vocab, tokenizer),
            "qwen3": make_family_hf(root / "hf-qwen3", "qwen3", seed=1),
            "llama3": make_family_hf(root / "hf-llama3", "llama3", seed=2)}


# ---- reading families -------------------------------------------------------------------------

def test_family_configs_read_and_write_back(hf_dirs):
    from megatron_llamapro.checkpoint.weight_map import canonical_names, hf_model_shapes
    from safetensors import safe_open

    expected = {"qwen2": dict(qkv_bias=True, qk_layernorm=False, head_dim=16, tie_word_embeddings=True,
                              rope_theta=1e6, rope_scaling=None),
                "qwen3": dict(qkv_bias=False, qk_layernorm=True, head_dim=32, tie_word_embeddings=False),
                "llama3": dict(qkv_bias=False, qk_layernorm=False, head_dim=16, tie_word_embeddings=True,
                               rope_theta=500000.0)}
    for family, hf in hf_dirs.items():
        arch = LlamaArch.from_hf_dir(hf)
        for field, value in expected[family].items():
            assert getattr(arch, field) == value, (family, field)
        assert LlamaArch.from_hf_config(arch.to_hf_config()) == arch, family
        assert arch.to_hf_config()["architectures"] == [HF_CLASSES[family]]
        with safe_open(str(hf / "model.safetensors"), "pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        assert hf_model_shapes(arch) == stored, family
        config = arch.megatron_fields("config")
        args = arch.megatron_fields("args")
        assert config["add_qkv_bias"] == args["add_qkv_bias"] == arch.qkv_bias
        assert config["qk_layernorm"] == args["qk_layernorm"] == arch.qk_layernorm
        assert config["kv_channels"] == arch.head_dim and config["add_bias_linear"] is False
        layer0 = [n for n in canonical_names(arch) if n.startswith("decoder.layers.0.")]
        assert ("decoder.layers.0.self_attention.linear_qkv.bias" in layer0) == arch.qkv_bias
        assert ("decoder.layers.0.self_attention.q_layernorm.weight" in layer0) == arch.qk_layernorm
    assert LlamaArch.from_hf_dir(hf_dirs["llama3"]).rope_scaling_factor == 32.0


def test_qkv_bias_fused_per_query_group():
    from megatron_llamapro.checkpoint.layout import Split, split_tp
    from megatron_llamapro.checkpoint.weight_map import fuse_qkv, split_rule, unfuse_qkv

    arch = LlamaArch.from_hf_config(family_config("qwen2").to_dict())
    d = arch.head_dim
    q, k, v = torch.arange(4 * d) + 0.0, 1000 + torch.arange(2 * d) + 0.0, 2000 + torch.arange(2 * d) + 0.0
    fused = fuse_qkv(q, k, v, arch)
    group0 = torch.cat([q[: 2 * d], k[:d], v[:d]])
    assert torch.equal(fused[: 4 * d], group0)  # [q heads of group 0; k_0; v_0], then group 1
    assert split_rule("decoder.layers.3.self_attention.linear_qkv.bias") is Split.COLUMN
    rank0 = split_tp(fused, Split.COLUMN, 2)[0]
    assert torch.equal(rank0, group0)  # TP rank 0 holds query group 0's bias, like the weight's rows
    assert all(torch.equal(a, b) for a, b in zip(unfuse_qkv(fused, arch), (q, k, v)))


@pytest.mark.parametrize("config,field", [
    ("qwen3_moe", "experts="), ("mixtral", "num_local_experts="), ("deepseek_v3", "experts="),
    ("gemma", "gemma"), ("phi", "partial_rotary_factor"), ("phi3", "phi3"),
    ("llama_attention_bias", "attention_bias"), ("qwen3_attention_bias", "attention_bias"),
    ("llama3_low_freq", "low_freq_factor"),
])
def test_unsupported_families_one_line_naming_the_field(config, field):
    import transformers

    configs = {
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig().to_dict(),
        "mixtral": lambda: transformers.MixtralConfig().to_dict(),
        "deepseek_v3": lambda: transformers.DeepseekV3Config().to_dict(),
        "gemma": lambda: transformers.GemmaConfig().to_dict(),
        "phi": lambda: transformers.PhiConfig().to_dict(),
        "phi3": lambda: transformers.Phi3Config().to_dict(),
        "llama_attention_bias": lambda: transformers.LlamaConfig(attention_bias=True).to_dict(),
        "qwen3_attention_bias": lambda: family_config("qwen3", attention_bias=True).to_dict(),
        "llama3_low_freq": lambda: family_config(
            "llama3", rope_scaling={**LLAMA3_ROPE, "low_freq_factor": 2.0}).to_dict(),
    }
    with pytest.raises(ArchError) as err:
        LlamaArch.from_hf_config(configs[config](), source="m/config.json")
    message = str(err.value)
    assert "\n" not in message and message.startswith("m/config.json: ") and field in message, message


def test_qwen_sliding_window_only_where_it_applies():
    def window(**overrides):
        return LlamaArch.from_hf_config(family_config("qwen2", **overrides).to_dict()).sliding_window

    assert window() is None                                                      # use_sliding_window false
    assert window(use_sliding_window=True, sliding_window=64, max_window_layers=4) is None  # no layer windowed
    assert window(use_sliding_window=True, sliding_window=64, max_window_layers=2) == 64
    arch = LlamaArch.from_hf_config(family_config("qwen2", use_sliding_window=True, sliding_window=64,
                                                  max_window_layers=2).to_dict())
    written = arch.to_hf_config()
    assert (written["use_sliding_window"], written["sliding_window"], written["max_window_layers"]) == (True, 64, 2)


# ---- conversion --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_bit_exact_tp2_pp2_and_vpp(hf_dirs, root, family):
    hf = hf_dirs[family]
    original = hf_tensors(hf)
    layouts = [("torch", 2, 2, None), ("torch", 1, 2, 2)] + ([("torch_dist", 2, 1, None)] if family == "qwen2" else [])
    for fmt, tp, pp, vpp in layouts:
        meg = convert(hf, root / f"rt-{family}-{fmt}-{tp}{pp}{vpp}", fmt, tp, pp, vpp)
        back = hf_tensors(convert(meg, root / f"rt-{family}-{fmt}-{tp}{pp}{vpp}-hf", "hf"))
        assert back.keys() == original.keys(), (family, fmt, sorted(back.keys() ^ original.keys()))
        assert all(torch.equal(back[k], original[k]) for k in original), (family, fmt, tp, pp, vpp)


def _rank_logits(cases: list[tuple[str, int, int, int | None]]):
    """Rank function: (logits, rotary inv_freq) per (checkpoint, tp, pp, vpp) case."""
    from megatron.core import parallel_state

    from tests.parity_lib import loaded_model, sample_logits

    results = []
    for ckpt, tp, pp, vpp in cases:
        with loaded_model(ckpt, tp, pp, vpp) as (source, chunks):
            logits = sample_logits(chunks, source.arch.vocab_size)
            inv_freq = chunks[0].rotary_pos_emb.inv_freq.detach().cpu().clone()
        results.append((logits, inv_freq))
        parallel_state.destroy_model_parallel()
    return results


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_megatron_logits_match_transformers(hf_dirs, root, scratch):
    from transformers import AutoModelForCausalLM

    from megatron_llamapro.checkpoint.verify import hf_logits
    from megatron_llamapro.expansion.apply import sample_tokens
    from megatron_llamapro.runtime.multiproc import run_distributed

    cases, labels = [], []
    for family in FAMILIES:
        cases.append((str(convert(hf_dirs[family], root / f"par-{family}-tp2", tp=2)), 2, 1, None))
        labels.append((family, "tp2"))
    cases.append((str(convert(hf_dirs["qwen2"], root / "par-qwen2-pp2", pp=2)), 1, 2, 2))
    labels.append(("qwen2", "pp2 vpp2"))
    ranks = run_distributed(_rank_logits, 2, cases, timeout=300, scratch=scratch / "families")
    for i, (family, layout) in enumerate(labels):
        hf = hf_dirs[family]
        reference = hf_logits(hf, sample_tokens(LlamaArch.from_hf_dir(hf).vocab_size))
        got = [r[i][0] for r in ranks if r[i][0] is not None]
        assert got, (family, layout)
        for logits in got:
            diff = float((logits - reference).abs().max())
            assert diff <= 1e-5, f"{family} {layout}: max |logit diff| {diff}"
        hf_inv_freq = AutoModelForCausalLM.from_pretrained(hf).model.rotary_emb.inv_freq
        assert torch.equal(ranks[0][i][1], hf_inv_freq.float()), f"{family}: RoPE frequencies differ"


# ---- expansion, export, transformers -----------------------------------------------------------

HF_CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
original = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
expanded = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()
sources = {int(k): v for k, v in json.loads(sys.argv[3]).items()}
ids = torch.randint(0, original.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    a, b = original(input_ids=ids).logits, expanded(input_ids=ids).logits
    generated = expanded.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
layers = expanded.model.layers
copied = all(torch.equal(p, dict(original.model.layers[s].named_parameters())[n])
             for i, s in sources.items() for n, p in layers[i].named_parameters()
             if not n.endswith(("o_proj.weight", "down_proj.weight")))
zeroed = all(not layers[i].self_attn.o_proj.weight.any() and not layers[i].mlp.down_proj.weight.any() for i in sources)
names = sorted({n for i in sources for n, _ in layers[i].named_parameters()})
print("REPORT" + json.dumps({"class": type(expanded).__name__, "layers": len(layers), "equal": torch.equal(a, b),
                             "copied": copied, "zeroed": zeroed, "generated": list(generated.shape),
                             "names": names}))
"""


@pytest.mark.timeout(400)
def test_expansion_identity_in_transformers_after_export(hf_dirs, root):
    from megatron_llamapro.expansion.apply import expand_checkpoint
    from megatron_llamapro.expansion.plan import plan_expansion

    procs = {}
    for family in FAMILIES:
        meg = convert(hf_dirs[family], root / f"exp-{family}-in", tp=2, pp=2)
        plan = plan_expansion(4, 4, "interleaved")
        expanded = root / f"exp-{family}"
        expand_checkpoint(meg, expanded, plan)
        exported = convert(expanded, root / f"exp-{family}-hf", "hf")
        procs[family] = (plan, subprocess.Popen(
            [sys.executable, "-c", HF_CHECK, str(hf_dirs[family]), str(exported), json.dumps(plan.sources)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for family, (plan, proc) in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        report = json.loads(out.split("REPORT", 1)[1])
        assert report["class"] == HF_CLASSES[family] and report["layers"] == 8
        assert report["equal"] and report["copied"] and report["zeroed"], (family, report)
        assert report["generated"] == [1, 8]
        has = {"qwen2": "self_attn.q_proj.bias", "qwen3": "self_attn.q_norm.weight"}.get(family)
        if has:
            assert has in report["names"], (family, report["names"])


# ---- tokenizer from the checkpoint, frozen training of an expanded Qwen2 ------------------------

@pytest.mark.slow
@pytest.mark.timeout(400)
def test_qwen2_tokenizer_preprocess_and_frozen_training(hf_dirs, root):
    from megatron_llamapro.data.synthetic import domain_corpus, write_jsonl
    from megatron_llamapro.data.tokenizer import build_tokenizer
    from megatron_llamapro.expansion.apply import expand_checkpoint
    from megatron_llamapro.expansion.plan import plan_expansion
    from tests.training_lib import COMMON as TRAIN_COMMON, compare_checkpoints, train
    from tests.lib import child_env, run_tool

    hf = hf_dirs["qwen2"]
    tokenizer = build_tokenizer("huggingface", hf)
    assert tokenizer.bos_id is None and tokenizer.eos_id == tokenizer.vocab["<|end_of_text|>"]
    assert tokenizer.vocab_size == LlamaArch.from_hf_dir(hf).vocab_size
    expanded = root / "train-qwen2"
    plan = plan_expansion(4, 2, "interleaved")
    expand_checkpoint(convert(hf, root / "train-qwen2-base"), expanded, plan)
    write_jsonl(domain_corpus(200), root / "domain.jsonl")
    preprocess = ["--input", str(root / "domain.jsonl"), "--json-key", "text", "--append-eod"]
    runs = [preprocess + ["--tokenizer-type", "huggingface", "--tokenizer-model", str(hf), "--output-prefix",
                          str(root / "from_hf")],
            preprocess + ["--tokenizer-model", str(expanded), "--output-prefix", str(root / "from_ckpt")]]
    for args in runs:
        proc = run_tool("megatron_llamapro.cli.preprocess_data", *args, timeout=120, env=child_env())
        assert proc.returncode == 0, proc.stderr
    assert (root / "from_hf_text_document.bin").read_bytes() == (root / "from_ckpt_text_document.bin").read_bytes()
    common = [str(root / "from_hf_text_document") if a == "domain_text_document" else a for a in TRAIN_COMMON]
    trained = root / "train-qwen2-out"
    train(["--load", str(expanded), "--save", str(trained), "--train-iters", "2",
           "--data-cache-dir", str(root / "cache"), *common], timeout=300)
    diffs = compare_checkpoints(str(expanded), str(trained))
    new = set(plan.new_layers)
    frozen = {n: d for n, d in diffs.items() if not any(f"layers.{i}." in n for i in new)}
    assert frozen and all(d == 0.0 for d in frozen.values()), {n: d for n, d in frozen.items() if d}
    bias = [n for n in diffs if n.endswith("linear_qkv.bias") and any(f"layers.{i}." in n for i in new)]
    assert bias and any(diffs[n] > 0 for n in bias), "the new blocks' QKV biases did not train"
