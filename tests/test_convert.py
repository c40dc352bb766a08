"""HF <-> Megatron conversion, resharding, verification and refusals of bad input.

Most checks call the library / the tools' `main(argv)` in this process (fast); a few run the tools
as `python tools/X.py` subprocesses, started together so their interpreter start-ups overlap.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.lib import finish, load_tool, run_tool_inprocess, start_tool


# ---- helpers ---------------------------------------------------------------------------------

def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from megatron_llamapro.checkpoint.hf import SafetensorsFile

    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        st = SafetensorsFile(file)
        for key in st.keys():
            assert key not in tensors, f"{key} stored twice"
            tensors[key] = st.get(key)
    return tensors


def hf_config(directory: Path) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(directory)).to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    return config


def assert_hf_equal(original: Path, exported: Path, dtype: torch.dtype | None = None) -> None:
    from megatron_llamapro.arch import LlamaArch

    a, b = hf_tensors(original), hf_tensors(exported)
    assert sorted(a) == sorted(b)
    for name in a:
        expected = a[name] if dtype is None else a[name].to(dtype)
        assert b[name].dtype == expected.dtype, name
        assert torch.equal(expected, b[name]), f"{name} differs"
    assert hf_config(original) == hf_config(exported)
    assert LlamaArch.from_hf_dir(original) == LlamaArch.from_hf_dir(exported)


def assert_same_weights(a, b, padded: int) -> None:
    """Two TensorSources hold identical canonical tensors (vocab tensors compared at one padding)."""
    assert a.arch == b.arch
    names = a.names()
    assert names == b.names()
    for name in names:
        x, y = a.get(name, 0, 1, padded), b.get(name, 0, 1, padded)
        assert x.dtype == y.dtype and torch.equal(x, y), name


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in Path(parent).iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def write_fake_hf(out: Path, config: dict, extra: dict[str, torch.Tensor] | None = None,
                  skip: tuple[str, ...] = ()) -> Path:
    """An HF directory with zero weights shaped for `config` (no transformers needed)."""
    from megatron_llamapro.arch import LlamaArch
    from megatron_llamapro.checkpoint.hf import write_safetensors
    from megatron_llamapro.checkpoint.weight_map import hf_model_shapes

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    safe = {k: v for k, v in config.items() if k not in ("attention_bias", "mlp_bias")}
    shapes = hf_model_shapes(LlamaArch.from_hf_config(safe))
    tensors = {k: torch.zeros(v) for k, v in shapes.items() if k not in skip}
    tensors.update(extra or {})
    write_safetensors(out / "model.safetensors", tensors)
    return out


FAKE_CONFIG = dict(model_type="llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=4, vocab_size=300)


def convert(hf_dir: Path, out: Path, tp=1, pp=1, vpp=None, fmt="torch", dtype=None, workers=1, **kw):
    from megatron_llamapro.checkpoint.convert import write_checkpoint
    from megatron_llamapro.checkpoint.hf import HFSource
    from megatron_llamapro.checkpoint.layout import Layout

    return write_checkpoint(functools.partial(HFSource, Path(hf_dir)), out, fmt, Layout(tp, pp, vpp),
                            dtype=dtype, workers=workers, **kw)


def export(megatron_dir: Path, out: Path, dtype=None, **kw):
    from megatron_llamapro.checkpoint.convert import write_checkpoint
    from megatron_llamapro.checkpoint.layout import Layout
    from megatron_llamapro.checkpoint.open import open_checkpoint

    return write_checkpoint(functools.partial(open_checkpoint, Path(megatron_dir)), out, "hf", Layout(),
                            dtype=dtype, **kw)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


# ---- HF -> Megatron -> HF, bit-exact ----------------------------------------------------------

ROUND_TRIPS = [
    # variant, tp, pp, vpp, format, workers
    ("mha", 1, 1, None, "torch", 1),
    ("gqa", 2, 1, None, "torch", 1),
    ("mha_tied", 1, 2, None, "torch", 1),
    ("gqa_tied", 2, 2, None, "torch", 1),
    ("mha", 4, 1, None, "torch", 1),
    ("gqa", 1, 4, None, "torch", 1),
    ("mha_tied", 2, 2, 2, "torch", 1),
    ("gqa", 2, 2, 2, "torch", 2),       # shard files written by 2 worker processes
    ("gqa_tied", 1, 1, None, "torch_dist", 1),
    ("mha", 2, 1, None, "torch_dist", 1),
]


@pytest.mark.parametrize("variant,tp,pp,vpp,fmt,workers", ROUND_TRIPS,
                         ids=[f"{v}-tp{t}-pp{p}" + (f"-vpp{w}" if w else "") + f"-{f}" + (f"-w{n}" if n > 1 else "")
                              for v, t, p, w, f, n in ROUND_TRIPS])
def test_round_trip_bit_exact(tiny_hf_dirs, work, variant, tp, pp, vpp, fmt, workers):
    from megatron_llamapro.checkpoint.manifest import Manifest

    hf = tiny_hf_dirs[variant]
    name = f"{variant}-{tp}-{pp}-{vpp}-{fmt}-{workers}"
    meg, back = work / f"meg-{name}", work / f"back-{name}"
    summary = convert(hf, meg, tp, pp, vpp, fmt, workers=workers)
    manifest = Manifest.read(meg)
    assert manifest == summary["manifest"]
    assert manifest.padded_vocab_size == -(-300 // (128 * tp)) * 128 * tp
    if fmt == "torch":
        files = sorted(p.relative_to(meg).as_posix() for p in meg.rglob("model_optim_rng.pt"))
        expected = sorted(f"release/mp_rank_{t:02d}" + (f"_{s:03d}" if pp > 1 else "") + "/model_optim_rng.pt"
                          for t in range(tp) for s in range(pp))
        assert files == expected
    assert (meg / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    export(meg, back)
    assert_hf_equal(hf, back)
    assert leftovers(work) == []


def test_legacy_file_contents(tiny_hf_dirs, work):
    """What Megatron-LM reads: stage-local layer names, TP shards, padded vocab, args, versions."""
    from megatron_llamapro.checkpoint.hf import HFSource
    from megatron_llamapro.checkpoint.layout import split_tp
    from megatron_llamapro.checkpoint.weight_map import Split

    hf = tiny_hf_dirs["gqa_tied"]  # 8 heads, 2 kv heads, tied: the embedding copy on the last stage
    meg = work / "legacy-contents"
    convert(hf, meg, tp=2, pp=2)
    source = HFSource(hf)
    last = torch.load(meg / "release/mp_rank_01_001/model_optim_rng.pt", weights_only=True)
    first = torch.load(meg / "release/mp_rank_01_000/model_optim_rng.pt", weights_only=True)
    assert last["checkpoint_version"] == 3.0
    args = last["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert args.padded_vocab_size == 512 and args.num_query_groups == 2 and args.group_query_attention
    assert not args.untie_embeddings_and_output_weights
    model = last["model"]
    # stage 1 holds global layers 2, 3 as local 0, 1
    assert {k.split(".")[2] for k in model if k.startswith("decoder.layers.")} == {"0", "1"}
    qkv = source.full("decoder.layers.3.self_attention.linear_qkv.weight")
    assert torch.equal(model["decoder.layers.1.self_attention.linear_qkv.weight"],
                       split_tp(qkv, Split.COLUMN, 2)[1])
    emb = source.full("embedding.word_embeddings.weight")
    padded = torch.cat([emb, torch.zeros(512 - 300, emb.shape[1])])
    assert torch.equal(model["output_layer.weight"], padded[256:])
    assert torch.equal(first["model"]["embedding.word_embeddings.weight"], padded[256:])
    assert "decoder.final_layernorm.weight" in model and "embedding.word_embeddings.weight" not in model
    # torch.save writes whole storages: every stored tensor owns exactly its own bytes
    for state in (first["model"], last["model"]):
        for key, value in state.items():
            if value is not None:
                assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), key
    fc1 = source.full("decoder.layers.0.mlp.linear_fc1.weight")
    gate, up = fc1.chunk(2)
    assert torch.equal(first["model"]["decoder.layers.0.mlp.linear_fc1.weight"],
                       torch.cat([gate[64:], up[64:]]))


def test_stage_placement_of_embedding_norm_and_output():
    """One rule for where embedding / final norm / output layer (or its tied copy) are stored."""
    from megatron_llamapro.checkpoint.layout import Layout, StagePlacement, tied_source
    from megatron_llamapro.checkpoint.weight_map import EMBEDDING, FINAL_NORM, OUTPUT_LAYER

    for layout, last in ((Layout(), (0, 0)), (Layout(2, 4), (3, 0)), (Layout(1, 2, 2), (1, 1))):
        placement = StagePlacement(8, layout)
        assert placement.unit_of(EMBEDDING) == (0, 0)
        assert placement.unit_of(FINAL_NORM) == placement.unit_of(OUTPUT_LAYER) == last
        for tied in (False, True):
            stored = {name: unit for unit in placement.units()
                      for name in placement.canonical_names(*unit, tied) if "layers" not in name}
            expected = {EMBEDDING: (0, 0), FINAL_NORM: last}
            if not tied or layout.pp > 1:  # the tied copy exists only when the embedding is elsewhere
                expected[OUTPUT_LAYER] = last
            assert stored == expected, (layout, tied)
            assert placement.stores_output_layer(tied) == (OUTPUT_LAYER in expected)
    vpp = StagePlacement(8, Layout(1, 2, 2))  # chunk k of stage s: layers 4k + 2s, 4k + 2s + 1
    assert [vpp.unit_of(f"decoder.layers.{i}.mlp.linear_fc2.weight") for i in (0, 2, 5, 7)] == \
        [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert tied_source(OUTPUT_LAYER, True) == EMBEDDING and tied_source(OUTPUT_LAYER, False) == OUTPUT_LAYER
    assert tied_source(FINAL_NORM, True) == FINAL_NORM


def test_chunk_keys_iteration_and_rank_folders(tmp_path):
    from megatron_llamapro.checkpoint.layout import chunk_key, vpp_of_chunk_keys
    from megatron_llamapro.checkpoint.tracker import (
        iteration_dirs, iteration_name, mp_rank_dir, parse_iteration_dir, parse_mp_rank_dir,
    )

    assert chunk_key(0, None) == "model"
    assert [chunk_key(i, 2) for i in range(2)] == ["model0", "model1"]
    assert chunk_key(0, 1) == "model0"  # a layout that says VPP=1 keeps the key it always had
    assert vpp_of_chunk_keys(["model", "args", "iteration"]) is None
    assert vpp_of_chunk_keys(["model0", "model1", "model2", "args"]) == 3
    for iteration in (0, 100, 12345678, "release"):
        assert parse_iteration_dir(iteration_name(iteration)) == iteration
    for name in ("iter_", "iter_12a", "iter_1_0", "iter_-1", ".tmp_iter_0000010", "release2", "latest"):
        assert parse_iteration_dir(name) is None, name
    for name in ("iter_0000020", "iter_0000003", "iter_10000000", "release", ".tmp_iter_0000030", "iter_x"):
        (tmp_path / name).mkdir()
    (tmp_path / "iter_0000040").write_text("a file, not a folder")
    assert iteration_dirs(tmp_path) == [(3, tmp_path / "iter_0000003"), (20, tmp_path / "iter_0000020"),
                                        (10000000, tmp_path / "iter_10000000")]
    assert iteration_dirs(tmp_path / "absent") == []
    for tp_rank, pp_rank, pp in ((0, 0, 1), (3, 0, 1), (1, 2, 4)):
        assert parse_mp_rank_dir(mp_rank_dir(tp_rank, pp_rank, pp)) == (tp_rank, pp_rank)
    assert parse_mp_rank_dir("mp_rank_1") is None and parse_mp_rank_dir("distrib_optim.pt") is None


def test_hf_names_and_shapes_from_the_weight_map():
    from megatron_llamapro.arch import LlamaArch
    from megatron_llamapro.checkpoint.weight_map import (
        canonical_names, hf_model_shapes, hf_shapes, hf_to_megatron, megatron_to_hf,
    )

    arch = LlamaArch.from_hf_config(dict(FAKE_CONFIG, num_key_value_heads=2, head_dim=8))
    shapes = hf_model_shapes(arch)
    assert list(shapes)[:2] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]
    assert list(shapes)[-2:] == ["model.norm.weight", "lm_head.weight"] and len(shapes) == 2 * 9 + 3
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (32, 64)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (16, 64)
    assert shapes["model.layers.1.self_attn.o_proj.weight"] == (64, 32)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (64, 128)
    assert shapes["lm_head.weight"] == (300, 64)
    assert "lm_head.weight" not in hf_model_shapes(LlamaArch.from_hf_config(dict(FAKE_CONFIG, tie_word_embeddings=True)))
    # the planned shapes are those of the tensors export writes back from a fused Megatron tensor
    hf = {name: torch.randn(shape) for name, shape in shapes.items()}
    for name in canonical_names(arch):
        written = megatron_to_hf(name, hf_to_megatron(name, hf.__getitem__, arch), arch)
        assert {k: tuple(v.shape) for k, v in written.items()} == hf_shapes(name, arch), name
        assert all(torch.equal(hf[k], v) for k, v in written.items()), name


def test_dtype_conversion_and_sharded_export(tiny_hf_dirs, work):
    from megatron_llamapro.checkpoint.manifest import Manifest

    hf = tiny_hf_dirs["gqa"]
    meg, back = work / "bf16-meg", work / "bf16-back"
    convert(hf, meg, tp=2, pp=1, dtype="bf16")
    assert Manifest.read(meg).dtype == "bf16"
    export(meg, back, max_shard_bytes=60_000)
    assert_hf_equal(hf, back, dtype=torch.bfloat16)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in back.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    # HF's convention: total_size counts tensor bytes (headers excluded)
    from megatron_llamapro.checkpoint.hf import SafetensorsFile

    tensor_bytes = sum(e["data_offsets"][1] - e["data_offsets"][0]
                       for s in shards for e in SafetensorsFile(back / s).entries.values())
    assert index["metadata"]["total_size"] == tensor_bytes
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((back / "generation_config.json").read_text())["eos_token_id"] == 2
    # transformers itself loads the sharded export
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(back), dtype=torch.bfloat16)
    assert torch.equal(model.lm_head.weight, hf_tensors(back)["lm_head.weight"])


def test_tokenizer_files_travel(tiny_hf_dirs, work):
    hf = work / "with-tokenizer"
    shutil.copytree(tiny_hf_dirs["mha"], hf)
    (hf / "tokenizer.json").write_text('{"fake": true}\n')
    (hf / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    meg, back = work / "tok-meg", work / "tok-back"
    convert(hf, meg, tp=2)
    assert (meg / "tokenizer" / "tokenizer.json").read_text() == '{"fake": true}\n'
    export(meg, back)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (back / name).read_bytes() == (hf / name).read_bytes(), name


def test_failure_mid_write_leaves_nothing(tiny_hf_dirs, work):
    """An error while shards are being written removes the temporary output; --out stays as it was."""
    from megatron_llamapro.checkpoint.convert import write_checkpoint
    from megatron_llamapro.checkpoint.layout import Layout

    out = work / "mid-write"
    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(functools.partial(FailingSource, tiny_hf_dirs["mha"]), out, "torch", Layout(2, 2))
    assert not out.exists() and leftovers(work) == []
    # an existing checkpoint is kept intact when an --overwrite run fails
    convert(tiny_hf_dirs["mha"], out, tp=1)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(functools.partial(FailingSource, tiny_hf_dirs["mha"]), out, "torch", Layout(2, 2),
                         overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert leftovers(work) == []


def FailingSource(path):
    """An HFSource whose 10th tensor read fails."""
    from megatron_llamapro.checkpoint.hf import HFSource

    class Failing(HFSource):
        calls = 0

        def full(self, name):
            self.calls += 1
            if self.calls == 10:
                raise RuntimeError("disk full (simulated)")
            return super().full(name)

    return Failing(path)


# ---- resharding --------------------------------------------------------------------------------

def test_reshard_legacy_and_dist(tiny_hf_dirs, work, capsys):
    from megatron_llamapro.checkpoint.hf import HFSource
    from megatron_llamapro.checkpoint.open import open_checkpoint

    hf = tiny_hf_dirs["gqa_tied"]
    src = work / "rs-tp2pp2"
    convert(hf, src, tp=2, pp=2)
    steps = [  # (from, to, extra args)
        (src, work / "rs-tp1pp1", ["--tp", 1, "--pp", 1]),
        (src, work / "rs-dist", ["--format", "torch_dist", "--tp", 2]),
        (work / "rs-dist", work / "rs-tp1pp2vpp2", ["--tp", 1, "--pp", 2, "--vpp", 2]),
        (work / "rs-tp1pp2vpp2", work / "rs-tp2pp1", ["--tp", 2]),
    ]
    for a, b, extra in steps:
        code, out, err = run_tool_inprocess("reshard", ["--in", a, "--out", b, *extra], capsys)
        assert code == 0, err
        assert "resharded" in out and "files" in out and " s " in out
    reference = HFSource(hf)
    for _, b, _ in steps:
        with open_checkpoint(b) as resharded:
            assert_same_weights(reference, resharded, padded=512)
    with open_checkpoint(work / "rs-tp1pp1") as tp1:
        assert tp1.manifest.layout.describe() == "TP=1 PP=1" and tp1.manifest.padded_vocab_size == 384
        emb = tp1.get("embedding.word_embeddings.weight")
        assert emb.shape[0] == 384 and not emb[300:].any()
    with open_checkpoint(work / "rs-tp1pp2vpp2") as vpp:
        assert vpp.manifest.layout.vpp == 2
    # legacy -> torch_dist -> legacy at the original layout reproduces the original files' tensors
    code, _, err = run_tool_inprocess("reshard", ["--in", work / "rs-dist", "--out", work / "rs-back",
                                                  "--tp", 2, "--pp", 2], capsys)
    assert code == 0, err
    for file in sorted(src.rglob("model_optim_rng.pt")):
        a = torch.load(file, weights_only=True)["model"]
        b = torch.load(work / "rs-back" / file.relative_to(src), weights_only=True)["model"]
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert (value is None and b[key] is None) or torch.equal(value, b[key]), key
    # dtype change while resharding
    code, _, err = run_tool_inprocess("reshard", ["--in", src, "--out", work / "rs-bf16", "--dtype", "bf16"],
                                      capsys)
    assert code == 0, err
    with open_checkpoint(work / "rs-bf16") as bf16:
        w = bf16.get("decoder.layers.1.mlp.linear_fc2.weight")
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, reference.get("decoder.layers.1.mlp.linear_fc2.weight").to(torch.bfloat16))
    assert leftovers(work) == []


# ---- verification ------------------------------------------------------------------------------

def test_verify_in_process(tiny_hf_dirs, work):
    from megatron_llamapro.checkpoint.verify import compare, verify_pair
    from megatron_llamapro.checkpoint.open import open_checkpoint
    from megatron_llamapro.errors import VerifyError

    hf = tiny_hf_dirs["gqa"]
    meg = work / "verify-tp2pp2"
    convert(hf, meg, tp=2, pp=2)
    result = verify_pair(hf, meg)
    assert result.ok and result.max_abs_diff < 1e-5, result.describe()
    # bf16 conversion: verification rounds the HF weights the same way
    meg16 = work / "verify-bf16"
    convert(hf, meg16, tp=1, pp=2, dtype="bf16")
    assert verify_pair(hf, meg16, round_to="bf16").max_abs_diff < 1e-5
    # a different model fails: same shapes, other weights
    with pytest.raises(VerifyError, match="FAILED"):
        verify_pair(tiny_hf_dirs["mha"], meg)
    with open_checkpoint(meg) as source:
        assert not compare(tiny_hf_dirs["mha"], source).ok


def test_cli_subprocesses(tiny_hf_dirs, work):
    """The tools as scripts: convert --verify, export (sharded), reshard; run side by side."""
    hf = tiny_hf_dirs["mha_tied"]
    pre = work / "cli-pre"
    convert(hf, pre, tp=2, pp=2)
    procs = {
        "convert": start_tool("convert_hf_to_megatron",
            "--hf-dir", hf, "--out", work / "cli-meg", "--tp", 2, "--pp", 2, "--vpp", 2, "--verify"),
        "export": start_tool("convert_megatron_to_hf",
            "--megatron-dir", pre, "--out", work / "cli-hf", "--max-shard-size", "100KB"),
        "reshard": start_tool("reshard", "--in", pre, "--out", work / "cli-rs", "--tp", 1, "--pp", 4),
    }
    results = {name: finish(proc) for name, proc in procs.items()}
    for name, (code, out, err) in results.items():
        assert code == 0, f"{name}: {err}"
        assert "wrote:" in out and "files" in out and "GB/s" in out, out
    line = [l for l in results["convert"][1].splitlines() if l.startswith("verify:")][0]
    assert line.endswith("OK") and float(line.split("=")[1].split()[0]) < 1e-5, line
    assert_hf_equal(hf, work / "cli-hf")
    assert len(list((work / "cli-hf").glob("model-*.safetensors"))) > 1
    assert len(list((work / "cli-meg").rglob("model_optim_rng.pt"))) == 4
    assert len(list((work / "cli-rs").rglob("model_optim_rng.pt"))) == 4


# ---- logits parity at TP=2 / PP=2 in real megatron-core ranks -----------------------------------

def _rank_logits(cases: list[tuple[str, int, int]], dist_cases: list[tuple[str, int, int]]):
    """Rank function: logits for each (checkpoint, tp, pp) case, one parallel layout after another."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_llamapro.checkpoint.dist import model_sharded_state_dict
    from megatron_llamapro.checkpoint.manifest import Manifest
    from megatron_llamapro.checkpoint.tracker import iteration_dir
    from megatron_llamapro.model import ModelOptions, build_model
    from megatron_llamapro.runtime.distributed import ParallelSizes, init_distributed
    from tests.parity_lib import megatron_logits, sample_logits

    results = []
    for ckpt, tp, pp in cases:
        results.append(megatron_logits(ckpt, tp, pp))
        parallel_state.destroy_model_parallel()
    for ckpt, tp, pp in dist_cases:  # torch_dist loaded natively by megatron-core at this layout
        init_distributed(ParallelSizes(tp, pp))
        manifest = Manifest.read(Path(ckpt))
        chunks = build_model(manifest.arch, ModelOptions(padded_vocab_size=manifest.padded_vocab_size))
        loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), str(iteration_dir(ckpt)))
        chunks[0].load_state_dict(loaded, strict=False)
        results.append(sample_logits(chunks, manifest.arch.vocab_size))
        parallel_state.destroy_model_parallel()
    return results


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_logits_parity_tp2_pp2_multiprocess(tiny_hf_dirs, work, scratch):
    from megatron_llamapro.checkpoint.verify import hf_logits
    from megatron_llamapro.expansion.apply import sample_tokens
    from megatron_llamapro.runtime.multiproc import run_distributed

    # (label, HF variant, conversion kwargs, layout run at); PP=2 checkpoint at TP=2 exercises re-splitting
    cases = [("gqa tp2", "gqa", dict(tp=2), (2, 1)),
             ("mha_tied pp2", "mha_tied", dict(pp=2), (1, 2)),
             ("gqa_tied pp2 ckpt at tp2", "gqa_tied", dict(pp=2), (2, 1))]
    dist_cases = [("torch_dist at tp2", "gqa_tied", (2, 1)), ("torch_dist at pp2", "gqa_tied", (1, 2))]
    legacy_args = []
    for label, variant, kwargs, (tp, pp) in cases:
        ckpt = work / f"par-{label.replace(' ', '-')}"
        convert(tiny_hf_dirs[variant], ckpt, **kwargs)
        legacy_args.append((str(ckpt), tp, pp))
    dist_ckpt = work / "par-dist"
    convert(tiny_hf_dirs["gqa_tied"], dist_ckpt, tp=2, fmt="torch_dist")
    dist_args = [(str(dist_ckpt), tp, pp) for _, _, (tp, pp) in dist_cases]
    ranks = run_distributed(_rank_logits, 2, legacy_args, dist_args, timeout=240, scratch=scratch / "parity")
    variants = [c[1] for c in cases] + [c[1] for c in dist_cases]
    labels = [c[0] for c in cases] + [c[0] for c in dist_cases]
    tokens = sample_tokens(300)
    for i, (label, variant) in enumerate(zip(labels, variants)):
        got = [r[i] for r in ranks if r[i] is not None]
        assert got, f"{label}: no last-stage logits"
        reference = hf_logits(tiny_hf_dirs[variant], tokens)
        for logits in got:  # every TP rank of the last stage holds the gathered logits
            diff = (logits - reference).abs().max().item()
            assert diff < 1e-5, f"{label}: max |logit diff| {diff}"


# ---- bad input: one line, exit 2, nothing left behind ------------------------------------------

def _bad_inputs(root: Path, tiny_hf_dirs) -> dict[str, tuple[str, list, str]]:
    """name -> (tool, argv, expected message fragment); builds the broken inputs under root."""
    root.mkdir(parents=True, exist_ok=True)
    good = tiny_hf_dirs["mha"]
    no_config = root / "no-config"
    shutil.copytree(good, no_config)
    (no_config / "config.json").unlink()
    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(good / "config.json", no_weights / "config.json")
    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate((truncated / "model.safetensors").stat().st_size - 1000)
    missing_tensor = write_fake_hf(root / "missing-tensor", FAKE_CONFIG,
                                   skip=("model.layers.1.mlp.down_proj.weight",))
    gpt2 = write_fake_hf(root / "gpt2", FAKE_CONFIG)
    (gpt2 / "config.json").write_text(json.dumps(dict(FAKE_CONFIG, model_type="gpt2")))
    bias_cfg = write_fake_hf(root / "bias-config", dict(FAKE_CONFIG, attention_bias=True),
                             extra={"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    bias_tensor = write_fake_hf(root / "bias-tensor", FAKE_CONFIG,
                                extra={"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    wrong_shape = write_fake_hf(root / "wrong-shape", dict(FAKE_CONFIG, vocab_size=301))
    (wrong_shape / "config.json").write_text(json.dumps(FAKE_CONFIG))
    odd_ffn = write_fake_hf(root / "odd-ffn", dict(FAKE_CONFIG, num_attention_heads=8,
                                                   num_key_value_heads=8, intermediate_size=100))
    nonempty = root / "nonempty-out"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("precious\n")
    gqa = tiny_hf_dirs["gqa_tied"]  # 8 heads, 2 kv heads, 4 layers
    out = root / "out"
    conv = "convert_hf_to_megatron"
    return {
        "no-config": (conv, ["--hf-dir", no_config, "--out", out], "config.json: missing"),
        "no-weights": (conv, ["--hf-dir", no_weights, "--out", out], "no weights"),
        "missing-tensor": (conv, ["--hf-dir", missing_tensor, "--out", out], "missing weights model.layers.1.mlp.down_proj"),
        "truncated": (conv, ["--hf-dir", truncated, "--out", out], "truncated safetensors"),
        "non-llama": (conv, ["--hf-dir", gpt2, "--out", out], "model_type 'gpt2'"),
        "bias-config": (conv, ["--hf-dir", bias_cfg, "--out", out], "attention_bias=true is not supported"),
        "bias-tensor": (conv, ["--hf-dir", bias_tensor, "--out", out], "bias tensor"),
        "wrong-shape": (conv, ["--hf-dir", wrong_shape, "--out", out], "has shape [301, 64], config.json implies [300, 64]"),
        "tp-heads": (conv, ["--hf-dir", good, "--out", out, "--tp", 3], "--tp 3 does not divide num_attention_heads 4"),
        "tp-kv-heads": (conv, ["--hf-dir", gqa, "--out", out, "--tp", 4], "--tp 4 does not divide num_key_value_heads 2"),
        "tp-ffn": (conv, ["--hf-dir", odd_ffn, "--out", out, "--tp", 8], "--tp 8 does not divide intermediate_size 100"),
        "pp-layers": (conv, ["--hf-dir", good, "--out", out, "--pp", 3], "--pp 3 does not divide num_hidden_layers 4"),
        "pp-vpp-layers": (conv, ["--hf-dir", good, "--out", out, "--pp", 2, "--vpp", 4],
                          "PP x VPP = 2 x 4 does not divide num_hidden_layers 4"),
        "nonempty-out": (conv, ["--hf-dir", good, "--out", nonempty], "not empty (pass --overwrite"),
        "export-not-megatron": ("convert_megatron_to_hf", ["--megatron-dir", nonempty, "--out", out],
                                "neither an HF checkpoint"),
        "export-from-hf": ("convert_megatron_to_hf", ["--megatron-dir", good, "--out", out], "is an HF checkpoint"),
        "reshard-same-dir": ("reshard", ["--in", nonempty, "--out", nonempty], "must differ from --in"),
        "reshard-missing-shard": ("reshard", ["--in", root / "broken-meg", "--out", out], "missing shard"),
        "bad-size": ("convert_megatron_to_hf", ["--megatron-dir", root / "broken-meg", "--out", out,
                                                "--overwrite", "--max-shard-size", "lots"], None),
    }


@pytest.fixture(scope="module")
def bad_inputs(tiny_hf_dirs, work):
    root = work / "bad"
    cases = _bad_inputs(root, tiny_hf_dirs)
    broken = root / "broken-meg"
    convert(tiny_hf_dirs["mha"], broken, tp=2)
    (broken / "release" / "mp_rank_01" / "model_optim_rng.pt").unlink()
    return root, cases


def _snapshot(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


SUBPROCESS_CASES = ("no-config", "truncated", "tp-heads", "nonempty-out")


def test_bad_input_in_process(bad_inputs, capsys):
    root, cases = bad_inputs
    before = _snapshot(root)
    for name, (tool, argv, fragment) in cases.items():
        if fragment is None:  # argparse rejects it: usage + exit 2
            with pytest.raises(SystemExit) as exc:
                load_tool(tool).main([str(a) for a in argv])
            assert exc.value.code == 2
            continue
        code, out, err = run_tool_inprocess(tool, argv, capsys)
        lines = err.splitlines()
        assert code == 2, f"{name}: exit {code}\n{err}"
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {err!r}"
        assert fragment in lines[0], f"{name}: {lines[0]}"
        assert _snapshot(root) == before, f"{name} left output behind"
    assert (root / "nonempty-out" / "keep.txt").read_text() == "precious\n"


def test_bad_input_subprocess(bad_inputs):
    root, cases = bad_inputs
    before = _snapshot(root)
    procs = {name: start_tool(cases[name][0], *cases[name][1]) for name in SUBPROCESS_CASES}
    for name, proc in procs.items():
        code, out, err = finish(proc, timeout=120)
        assert code == 2, f"{name}: exit {code}\n{err}"
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {err!r}"
        assert cases[name][2] in lines[0]
        assert "Traceback" not in err and out == ""
    assert _snapshot(root) == before


def test_verify_failure_exit_code(tiny_hf_dirs, work, capsys, monkeypatch):
    """--verify above tolerance: exit 1 and one `error:` line naming the difference."""
    code, out, err = run_tool_inprocess("convert_hf_to_megatron", [
        "--hf-dir", tiny_hf_dirs["mha"], "--out", work / "verify-fail", "--verify",
        "--verify-tolerance", "1e-12"], capsys)
    # fp32 logits of two implementations are not bit-identical, so 1e-12 fails
    assert code == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: verify: max |logit diff|") and "FAILED" in lines[0]


def test_cli_helpers():
    from megatron_llamapro import cli

    assert cli.parse_dtype("bfloat16") == "bf16" and cli.parse_dtype("torch.float32") == "fp32"
    assert cli.parse_dtype(None) is None
    with pytest.raises(ValueError):
        cli.parse_dtype("int8")
    assert cli.parse_size("5GB") == 5 * 10**9 and cli.parse_size("2GiB") == 2 * 2**30
    assert cli.parse_size("500MB") == 500 * 10**6 and cli.parse_size("1024") == 1024
    with pytest.raises(ValueError):
        cli.parse_size("lots")
    from megatron_llamapro.errors import one_line

    assert one_line("a\nb  c") == "a b c"
