"""Block expansion: plans, expanded checkpoints in every format, exact logits, shard-local writing, CLI.

Tiny 8-layer models (hidden 64) are made at test time. Most checks load the expanded checkpoint
into a TP=1/PP=1 model in this process (the readers merge shards); three 2-process runs cover
PP=2, PP=2 with VPP=2, and TP=2 execution.
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_llamapro.checkpoint.convert import write_checkpoint
from megatron_llamapro.checkpoint.layout import Layout
from megatron_llamapro.checkpoint.manifest import Expansion, Manifest
from megatron_llamapro.checkpoint.open import open_checkpoint
from megatron_llamapro.checkpoint.weight_map import IDENTITY_ZEROED, canonical_names, layer_of, with_layer
from megatron_llamapro.expansion import ExpansionPlan, PlanError, plan_expansion, plan_from_positions
from megatron_llamapro.expansion.apply import (
    ExpandedSource, expand_checkpoint, expanded_manifest, model_logits, sample_tokens,
)
from tests import fixtures
from tests.lib import PYTHON, load_tool, run_tool


# --------------------------------------------------------------------------- plan (pure)

def test_plan_paper_32_layers_8_blocks():
    plan = plan_expansion(32, 8)
    assert plan.num_layers == 40 and plan.placement == "interleaved"
    assert plan.new_layers == [4, 9, 14, 19, 24, 29, 34, 39]
    assert plan.sources == {4: 3, 9: 7, 14: 11, 19: 15, 24: 19, 29: 23, 34: 27, 39: 31}
    # original layers keep their order, renumbered around the new blocks
    assert plan.renumbering[:8] == [0, 1, 2, 3, 5, 6, 7, 8] and plan.renumbering[-1] == 38
    for pp in (1, 2, 4, 8):
        assert plan_expansion(32, 8, pp=pp).shard_local(pp)
    assert plan_expansion(32, 8, pp=2, vpp=2).shard_local(2, 2)


def test_plan_uneven_groups_spread_evenly():
    # group g holds originals floor(g*L/P) .. floor((g+1)*L/P)-1: L=10, P=4 -> sizes 2, 3, 2, 3
    plan = plan_expansion(10, 4)
    assert plan.new_layers == [2, 6, 9, 13]
    assert plan.sources == {2: 1, 6: 4, 9: 6, 13: 9}
    plan = plan_expansion(10, 3)  # sizes 3, 3, 4
    assert plan.sources == {3: 2, 7: 5, 12: 9}
    # evenly spread groups balance L=30, P=4 over PP=2 (2 new blocks per stage)
    assert plan_expansion(30, 4, pp=2).new_layers == [7, 16, 24, 33]
    for L in range(1, 25):
        for P in range(1, L + 1):
            plan = plan_expansion(L, P)
            sizes = [b - a - 1 for a, b in zip([-1] + plan.new_layers, plan.new_layers)]
            assert sum(sizes) == L and max(sizes) - min(sizes) <= 1 and plan.new_layers[-1] == L + P - 1
            assert all(plan.sources[i] == plan.origins[i - 1] for i in plan.new_layers)
            # balance over C chunks exactly when C divides both L and P; then shard-local
            for pp, vpp in ((2, None), (3, None), (4, None), (2, 2)):
                c = pp * (vpp or 1)
                balanced = plan.balance_problem(pp, vpp) is None
                assert balanced == (L % c == 0 and P % c == 0), (L, P, pp, vpp)
                if balanced:
                    assert plan.shard_local(pp, vpp)


def test_plan_top_bottom_explicit():
    top = plan_expansion(8, 3, placement="top")
    assert top.new_layers == [8, 9, 10] and top.sources == {8: 7, 9: 7, 10: 7}
    bottom = plan_expansion(8, 2, placement="bottom")
    assert bottom.new_layers == [0, 1] and bottom.sources == {0: 0, 1: 0}
    assert bottom.renumbering == list(range(2, 10))
    explicit = plan_expansion(8, positions=[5, 0, 6, 11], pp=4)
    assert explicit.placement == "explicit" and explicit.new_layers == [0, 5, 6, 11]
    assert explicit.sources == {0: 0, 5: 3, 6: 3, 11: 7}
    # top/bottom only need equal layer counts per stage
    assert plan_expansion(8, 4, placement="top", pp=4).num_layers == 12
    # the interleaved plan is the explicit plan at its positions (one source rule for all placements)
    interleaved = plan_expansion(8, 2)
    assert plan_from_positions(8, [4, 9]) == ExpansionPlan(8, interleaved.origins, interleaved.new, "explicit")


def test_plan_refusals_list_what_works():
    with pytest.raises(PlanError) as err:
        plan_expansion(32, 6, pp=4)
    msg = str(err.value)
    assert "\n" not in msg and "32 layers + 6 new blocks" in msg and "PP=4" in msg
    assert "with 6 new blocks use PP in {1, 2}" in msg
    assert "with PP=4 use a number of new blocks in {4, 8, 12, 16, 20, 24, 28, 32}" in msg
    with pytest.raises(PlanError, match=r"VPP=2.*use PP in \{2, 4\} \(at VPP=2\)"):
        plan_expansion(32, 8, pp=8, vpp=2)
    with pytest.raises(PlanError, match=r"PP must divide 11; with 3 new blocks use PP in \{1, 11\}"):
        plan_expansion(8, 3, placement="top", pp=2)
    with pytest.raises(PlanError, match="at most one new block per original layer"):
        plan_expansion(4, 5)
    with pytest.raises(PlanError, match="out of range"):
        plan_expansion(8, positions=[0, 10])
    with pytest.raises(PlanError, match="repeat"):
        plan_expansion(8, positions=[3, 3])
    with pytest.raises(PlanError, match="but 2 positions"):
        plan_expansion(8, 3, positions=[1, 2])


def test_manifest_accumulates_and_renumbers():
    arch = fixtures_arch(8)
    base = Manifest(arch=arch, padded_vocab_size=384)
    first = expanded_manifest(base, plan_expansion(8, 2))                # 8 -> 10, new 4, 9
    assert first.arch.num_layers == 10 and first.trainable_layers == [4, 9]
    second = expanded_manifest(first, plan_expansion(10, 2, placement="bottom"))  # 10 -> 12, new 0, 1
    assert second.arch.num_layers == 12
    assert second.expansions == [
        Expansion(8, [6, 11], {6: 3, 11: 7}, "interleaved"),   # renumbered into the 12-layer model
        Expansion(10, [0, 1], {0: 0, 1: 0}, "bottom"),
    ]
    assert second.trainable_layers == [0, 1]
    assert Manifest.from_dict(json.loads(json.dumps(second.to_dict()))) == second
    with pytest.raises(ValueError, match="expands 8 layers"):
        expanded_manifest(second, plan_expansion(8, 2))


def test_plan_chunks_match_stage_placement():
    from megatron_llamapro.checkpoint.layout import StagePlacement

    plan = plan_expansion(32, 8)
    for pp, vpp in ((1, None), (2, None), (4, None), (2, 2), (4, 5), (2, 10)):
        placement = StagePlacement(40, Layout(1, pp, vpp))
        assert [(s, k, layers) for s, k, layers in plan.chunks(pp, vpp)] == \
            [(s, k, placement.layers(s, k)) for s, k in placement.units()]


def test_plan_shard_locality_follows_stage_placement():
    # top: 8 -> 10 layers over PP=2; expanded stage 0 (layers 0-4) needs original layer 4, on stage 1
    top = plan_expansion(8, 2, placement="top", pp=2)
    assert not top.shard_local(2) and top.shard_local(1)
    assert not plan_expansion(8, 1, placement="top").shard_local(3)  # PP=3 divides neither 8 nor 9
    with pytest.raises(PlanError, match="PP=3 does not divide 10 layers"):
        plan_expansion(8, 2).chunks(3)
    assert plan_expansion(8, 4, pp=2, vpp=2).chunks(2, 2)[1] == (0, 1, [6, 7, 8])


def test_per_layer_config_lists_expand():
    from dataclasses import replace

    arch = replace(fixtures_arch(4), extra_hf={"per_layer": ["a", "b", "c", "d"], "other": [1, 2]})
    manifest = expanded_manifest(Manifest(arch=arch, padded_vocab_size=384), plan_expansion(4, 2))
    assert manifest.arch.extra_hf == {"per_layer": ["a", "b", "b", "c", "d", "d"], "other": [1, 2]}


def test_expand_checkpoint_refuses_unbalanced_layout(hf8, root):
    plan = plan_expansion(8, 4)  # 12 layers; over PP=3 the chunks would hold 1, 1 and 2 new blocks
    with pytest.raises(PlanError, match="cannot balance 8 layers \\+ 4 new blocks .* over PP=3"):
        expand_checkpoint(hf8, root / "unbalanced", plan, fmt="torch", layout=Layout(1, 3))
    assert not (root / "unbalanced").exists()


def fixtures_arch(num_layers: int):
    from megatron_llamapro.arch import LlamaArch

    return LlamaArch(num_layers=num_layers, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     num_kv_heads=2, vocab_size=fixtures.TINY_VOCAB)


# --------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("expansion")


@pytest.fixture(scope="module")
def hf8(root) -> Path:
    return fixtures.make_tiny_hf(root / "hf8", num_layers=8, num_heads=4, num_kv_heads=2, tie=False, seed=3)


@pytest.fixture(scope="module")
def hf8_tied(root) -> Path:
    return fixtures.make_tiny_hf(root / "hf8_tied", num_layers=8, num_heads=4, num_kv_heads=4, tie=True, seed=4)


def convert(src: Path, out: Path, fmt: str, layout: Layout = Layout()) -> Path:
    write_checkpoint(functools.partial(open_checkpoint, str(src)), out, fmt, layout)
    return out


@pytest.fixture(scope="module")
def legacy_tp2_pp2(hf8, root) -> Path:
    return convert(hf8, root / "legacy_tp2_pp2", "torch", Layout(2, 2))


@pytest.fixture(scope="module")
def legacy_pp2(hf8, root) -> Path:
    return convert(hf8, root / "legacy_pp2", "torch", Layout(1, 2))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return sample_tokens(fixtures.TINY_VOCAB)


@pytest.fixture(scope="module")
def reference(hf8, tokens) -> torch.Tensor:
    """Logits of the original 8-layer model (TP=1, PP=1, this process)."""
    with open_checkpoint(hf8) as source:
        return model_logits(source, tokens)


def logits_of(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    with open_checkpoint(ckpt) as source:
        return model_logits(source, tokens)


def check_weights(original: Path, expanded: Path, plan: ExpansionPlan) -> None:
    """New blocks: output projections zero, everything else equal to the source layer;
    original layers and non-layer tensors unchanged."""
    with open_checkpoint(original) as a, open_checkpoint(expanded) as b:
        assert b.arch.num_layers == plan.num_layers
        for name in canonical_names(b.arch):
            layer = layer_of(name)
            got = b.full(name)
            if layer is None:
                want = a.full(name)
                assert torch.equal(got[: want.shape[0]], want), name
                continue
            want = a.full(with_layer(name, plan.origins[layer]))
            if plan.new[layer] and name.endswith(IDENTITY_ZEROED):
                assert got.shape == want.shape and not got.any(), name
                assert want.any()
            else:
                assert torch.equal(got, want), name


def test_shard_local_legacy_tp2_pp2(legacy_tp2_pp2, hf8, root, tokens, reference):
    plan = plan_expansion(8, 2, pp=2)  # 8 -> 10: each stage gets 4 originals + 1 new
    summary = expand_checkpoint(legacy_tp2_pp2, root / "exp_tp2_pp2", plan, workers=2)
    assert summary["layout"] == "TP=2 PP=2"
    assert len(summary["files"]) == 4
    for out_file, opened in summary["files"].items():
        rank_dir = Path(out_file).parent.name
        assert [Path(f).parent.name for f in opened] == [rank_dir], (out_file, opened)
        assert all(Path(f).is_relative_to(legacy_tp2_pp2) for f in opened)
    manifest = Manifest.read(root / "exp_tp2_pp2")
    assert manifest.arch.num_layers == 10 and manifest.layout == Layout(2, 2)
    assert manifest.expansions == [Expansion(8, [4, 9], {4: 3, 9: 7}, "interleaved")]
    assert manifest.trainable_layers == [4, 9]
    check_weights(hf8, root / "exp_tp2_pp2", plan)
    assert torch.equal(logits_of(root / "exp_tp2_pp2", tokens), reference)


def test_other_layouts_restage(legacy_pp2, root, tokens, reference):
    # top placement at PP=2: output stage 0 holds originals 0-4, so it reads both input stages
    plan = plan_expansion(8, 2, placement="top", pp=2)
    summary = expand_checkpoint(legacy_pp2, root / "exp_top_pp2", plan)
    opened = {Path(k).parent.name: sorted(Path(f).parent.name for f in v) for k, v in summary["files"].items()}
    assert opened == {"mp_rank_00_000": ["mp_rank_00_000", "mp_rank_00_001"], "mp_rank_00_001": ["mp_rank_00_001"]}
    assert torch.equal(logits_of(root / "exp_top_pp2", tokens), reference)
    # and the interleaved plan restaged to another PP (input PP=2 -> output TP=2 PP=1)
    summary = expand_checkpoint(legacy_pp2, root / "exp_tp2", plan_expansion(8, 4), layout=Layout(2, 1))
    assert summary["layout"] == "TP=2 PP=1"
    assert torch.equal(logits_of(root / "exp_tp2", tokens), reference)


@pytest.mark.parametrize("placement,kwargs", [
    ("top", dict(num_new=4, placement="top")),
    ("bottom", dict(num_new=4, placement="bottom")),
    ("explicit", dict(positions=[0, 5, 6, 11])),
])
def test_placements_hf_to_legacy_pp4(placement, kwargs, hf8, root, tokens, reference):
    plan = plan_expansion(8, pp=4, **kwargs)
    out = root / f"exp_{placement}_pp4"
    summary = expand_checkpoint(hf8, out, plan, fmt="torch", layout=Layout(1, 4))
    assert summary["layout"] == "TP=1 PP=4" and len(summary["files"]) == 4
    manifest = Manifest.read(out)
    assert manifest.expansions == [Expansion(8, plan.new_layers, plan.sources, placement)]
    check_weights(hf8, out, plan)
    assert torch.equal(logits_of(out, tokens), reference)


def test_torch_dist_in_and_out(hf8, root, tokens, reference):
    dist = convert(hf8, root / "dist", "torch_dist")
    plan = plan_expansion(8, 2, placement="bottom")
    summary = expand_checkpoint(dist, root / "exp_dist", plan)
    assert summary["manifest"].format == "torch_dist"
    with open_checkpoint(root / "exp_dist") as source:
        assert type(source).__name__ == "DistSource"
        assert source.manifest.expansions == [Expansion(8, [0, 1], {0: 0, 1: 0}, "bottom")]
    check_weights(hf8, root / "exp_dist", plan)
    assert torch.equal(logits_of(root / "exp_dist", tokens), reference)


def test_expand_twice_then_reshard(legacy_pp2, hf8, root, tokens, reference):
    first = root / "twice_1"
    expand_checkpoint(legacy_pp2, first, plan_expansion(8, 2, pp=2))         # 8 -> 10, new 4, 9
    summary = expand_checkpoint(first, root / "twice_2", plan_expansion(10, 2, pp=2))  # 10 -> 12
    opened = {Path(k).parent.name: [Path(f).parent.name for f in v] for k, v in summary["files"].items()}
    assert opened == {"mp_rank_00_000": ["mp_rank_00_000"], "mp_rank_00_001": ["mp_rank_00_001"]}
    manifest = Manifest.read(root / "twice_2")
    # second plan: groups of 5 -> new at 5 (copy of 4) and 11 (copy of 9); 9 moves to 10
    assert manifest.expansions == [Expansion(8, [4, 10], {4: 3, 10: 7}, "interleaved"),
                                   Expansion(10, [5, 11], {5: 4, 11: 9}, "interleaved")]
    assert manifest.trainable_layers == [5, 11]
    assert torch.equal(logits_of(root / "twice_2", tokens), reference)
    # reshard the expanded checkpoint (weights and expansion history unchanged)
    write_checkpoint(functools.partial(open_checkpoint, str(root / "twice_2")), root / "twice_tp2_pp4",
                     "torch", Layout(2, 4))
    resharded = Manifest.read(root / "twice_tp2_pp4")
    assert resharded.layout == Layout(2, 4) and resharded.expansions == manifest.expansions
    assert torch.equal(logits_of(root / "twice_tp2_pp4", tokens), reference)
    with open_checkpoint(root / "twice_tp2_pp4") as source:
        for layer in (4, 5, 10, 11):  # every identity block of both expansions
            for suffix in IDENTITY_ZEROED:
                assert not source.full(f"decoder.layers.{layer}.{suffix}").any()


def test_expanded_source_in_memory_matches(hf8, tokens, reference):
    plan = plan_expansion(8, 8)  # one copy after every layer
    with ExpandedSource(open_checkpoint(hf8), plan) as source:
        assert source.names()[-2:] == ["decoder.final_layernorm.weight", "output_layer.weight"]
        assert torch.equal(model_logits(source, tokens), reference)


# --------------------------------------------------------------------------- multi-process runs

def rank_logits(ckpts: list[str], tp: int, pp: int, vpp: int | None) -> list:
    """On each rank: logits of every checkpoint at TP/PP/VPP (None on non-last stages)."""
    from tests.parity_lib import megatron_logits

    return [megatron_logits(c, tp, pp, vpp) for c in ckpts]


def run_two_ranks(ckpts: list[Path], tp: int, pp: int, vpp: int | None, scratch: Path) -> list[torch.Tensor]:
    from megatron_llamapro.runtime.multiproc import run_distributed

    results = run_distributed(rank_logits, 2, [str(c) for c in ckpts], tp, pp, vpp, timeout=240,
                              scratch=scratch)
    last = results[-1]
    assert all(x is not None for x in last)
    return last


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pp2_interleaved_logits_exact(legacy_pp2, root, reference):
    out = root / "mp_pp2"
    expand_checkpoint(legacy_pp2, out, plan_expansion(8, 2, pp=2))
    original, expanded = run_two_ranks([legacy_pp2, out], 1, 2, None, root / "mp1")
    assert torch.equal(expanded, original)
    assert torch.allclose(original, reference, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pp2_vpp2_logits_exact(hf8, root):
    legacy = convert(hf8, root / "legacy_pp2_vpp2", "torch", Layout(1, 2, 2))
    plan = plan_expansion(8, 4, pp=2, vpp=2)  # 8 -> 12: every chunk 2 originals + 1 new
    summary = expand_checkpoint(legacy, root / "mp_vpp", plan)
    assert summary["layout"] == "TP=1 PP=2 VPP=2"
    for out_file, opened in summary["files"].items():
        assert [Path(f).parent.name for f in opened] == [Path(out_file).parent.name]
    assert Manifest.read(root / "mp_vpp").trainable_layers == [2, 5, 8, 11]
    original, expanded = run_two_ranks([legacy, root / "mp_vpp"], 1, 2, 2, root / "mp2")
    assert torch.equal(expanded, original)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tp2_tied_bottom_logits_exact(hf8_tied, root):
    out = root / "mp_tp2_tied"
    expand_checkpoint(hf8_tied, out, plan_expansion(8, 2, placement="bottom"), fmt="torch", layout=Layout(2, 1))
    original, expanded = run_two_ranks([hf8_tied, out], 2, 1, None, root / "mp3")
    assert torch.equal(expanded, original)


# --------------------------------------------------------------------------- CLI

# Run in a fresh interpreter: once megatron-core's CPU layer is applied in a process, transformers'
# meta-device loading can leave the rotary inv_freq buffers uninitialised (see report on cpu_compat).
HF_CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
original_dir, expanded_dir = sys.argv[1:3]
new_layers, sources = json.loads(sys.argv[3]), json.loads(sys.argv[4])
original = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32).eval()
expanded = AutoModelForCausalLM.from_pretrained(expanded_dir, dtype=torch.float32).eval()
report = {"layers": len(expanded.model.layers), "config_layers": expanded.config.num_hidden_layers}
report["zeroed"] = all(not expanded.model.layers[i].self_attn.o_proj.weight.any()
                       and not expanded.model.layers[i].mlp.down_proj.weight.any() for i in new_layers)
report["copied"] = all(torch.equal(expanded.model.layers[int(i)].self_attn.q_proj.weight,
                                   original.model.layers[s].self_attn.q_proj.weight)
                       and torch.equal(expanded.model.layers[int(i)].mlp.gate_proj.weight,
                                       original.model.layers[s].mlp.gate_proj.weight)
                       for i, s in sources.items())
ids = torch.randint(0, original.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    a, b = original(input_ids=ids).logits, expanded(input_ids=ids).logits
report["equal"] = torch.equal(a, b)
report["max_diff"] = float((a - b).abs().max())
print("REPORT" + json.dumps(report))
"""


@pytest.mark.timeout(300)
def test_cli_hf_expansion_loads_in_transformers(hf8, root):
    out = root / "cli_hf"
    proc = run_tool("expand_blocks", "--in", hf8, "--out", out, "--num-new-blocks", 4, "--verify")
    assert proc.returncode == 0, proc.stderr
    assert "verify: logits of the expanded model equal the original's exactly" in proc.stdout
    assert "new blocks (interleaved): 2 (copy of 1), 5 (copy of 3), 8 (copy of 5), 11 (copy of 7)" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 12
    expansion = Expansion(8, [2, 5, 8, 11], {2: 1, 5: 3, 8: 5, 11: 7}, "interleaved")
    assert json.loads((out / "llamapro_expansion.json").read_text()) == {"expansions": [expansion.to_dict()]}
    check = subprocess.run([PYTHON, "-c", HF_CHECK, str(hf8), str(out), json.dumps(expansion.new_layers),
                            json.dumps(expansion.sources)], capture_output=True, text=True, timeout=240)
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout.split("REPORT", 1)[1])
    assert report == {"layers": 12, "config_layers": 12, "zeroed": True, "copied": True, "equal": True,
                      "max_diff": 0.0}


@pytest.mark.timeout(120)
def test_cli_refuses_unbalanced_plan(legacy_tp2_pp2, root):
    out = root / "cli_refused"
    proc = run_tool("expand_blocks", "--in", legacy_tp2_pp2, "--out", out, "--num-new-blocks", 3)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot balance 8 layers + 3 new blocks"), proc.stderr
    assert "with PP=2 use a number of new blocks in {2, 4, 6, 8}" in lines[0]
    assert not out.exists()


def test_cli_dry_run_and_bad_arguments(legacy_tp2_pp2, root, capsys):
    cli = load_tool("expand_blocks")
    out = root / "cli_dry"
    assert cli.main(["--in", str(legacy_tp2_pp2), "--out", str(out), "--num-new-blocks", "2", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "8 -> 10 layers, 2 new blocks (interleaved), pipeline PP=2" in text
    assert "stage 0: layers 0-4; original layers 0-3; new: 4 (copy of 3)" in text
    assert "stage 1: layers 5-9; original layers 4-7; new: 9 (copy of 7)" in text
    assert "shard-local" in text and not out.exists()
    # VPP target from flags: 8 -> 12 over PP=2 VPP=2
    assert cli.main(["--in", str(legacy_tp2_pp2), "--new-block-positions", "2,5,8,11", "--pp", "2",
                     "--vpp", "2", "--dry-run"]) == 0
    assert "stage 1 chunk 1: layers 9-11; original layers 6-7; new: 11 (copy of 7)" in capsys.readouterr().out
    for argv, message in [
        (["--new-block-positions", "0,99"], "error: new block positions 99 out of range"),
        (["--new-block-positions", "a,b"], "error: --new-block-positions 'a,b'"),
        (["--num-new-blocks", "2", "--tp", "3"], "error: --tp 3 does not divide"),
        (["--num-new-blocks", "2", "--placement", "top", "--pp", "4"], "error: cannot balance 8 layers + 2"),
    ]:
        assert cli.main(["--in", str(legacy_tp2_pp2), "--out", str(out)] + argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), (argv, err)
    assert not out.exists()
