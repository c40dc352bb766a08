"""Operator checks: mistakes that used to train (or write) without a word.

--seq-length beyond what the checkpoint's RoPE was trained for is refused at plan time (so --check
too) unless llama3 rope_scaling covers it or --allow-long-sequences says so; bf16/fp16 training
from fp32 weights says that every save rounds the frozen layers; an expansion whose new blocks
leave a pipeline stage with nothing to train is flagged when it is written; validation sets
smaller than one evaluation say that their samples are repeated.
"""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_llamapro.runtime.multiproc import run_distributed
from tests import training_lib as tl
from tests.lib import metrics_records
from tests.training_lib import assets  # noqa: F401 - session fixture


def _check_lines(results: dict, name: str) -> tuple[int, list[str], list[str]]:
    code, out, err = results[name]
    return code, [line for line in out.splitlines() if line.strip()], [line for line in err.splitlines() if line.strip()]


# ---- 1. --seq-length against the checkpoint's positions ------------------------------------------

@pytest.mark.timeout(300)
def test_seq_length_beyond_the_trained_positions_is_refused_unless_rope_scaling_covers_it(assets, tmp_path):
    scaled = tmp_path / "hf_llama3"  # the tiny HF model with LLaMA-3.1's rope_scaling
    shutil.copytree(assets.hf, scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (scaled / "config.json").write_text(json.dumps(config))
    base = tl.train_args(assets, tmp_path / "never", 3, "--check")
    hf = tl.train_args(assets, tmp_path / "never", 3, "--check", "--trainable-layers", "5", load=scaled)
    runs = {
        "too_long": base + ["--seq-length", "512"],
        "allowed": base + ["--seq-length", "512", "--allow-long-sequences"],
        "fits": base + ["--seq-length", "256"],
        "scaled": hf + ["--seq-length", "512"],
        "scaled_too_long": hf + ["--seq-length", "70000"],
    }
    results = run_distributed(tl.run_main_captured, 1, runs, timeout=240)[0]

    code, out, err = _check_lines(results, "too_long")
    assert (code, out) == (2, []), results["too_long"]
    assert err == ["error: --seq-length 512 exceeds the checkpoint's max_position_embeddings 256 (RoPE was not "
                   "trained that long; pass --allow-long-sequences to train anyway)"]
    code, out, err = _check_lines(results, "allowed")
    assert code == 0 and err == [], results["allowed"]
    assert out[0] == ("warning: --seq-length 512 exceeds the checkpoint's max_position_embeddings 256 (RoPE was "
                      "not trained that long); training anyway (--allow-long-sequences)")
    assert len(out) == 2 and out[1].startswith("check: ok: "), out
    for name in ("fits", "scaled"):  # within the positions, or within what rope_scaling covers
        code, out, err = _check_lines(results, name)
        assert code == 0 and err == [] and len(out) == 1 and out[0].startswith("check: ok: "), results[name]
    code, out, err = _check_lines(results, "scaled_too_long")
    assert (code, out) == (2, []), results["scaled_too_long"]
    assert err == ["error: --seq-length 70000 exceeds the checkpoint's max_position_embeddings 256 and its llama3 "
                   "rope_scaling's 8 x 8192 = 65536 (RoPE was not trained that long; pass --allow-long-sequences "
                   "to train anyway)"]
    assert not (tmp_path / "never").exists()


# ---- 2. frozen weights rounded to --precision in every save --------------------------------------

def _rounding_warning(load, precision: str = "bf16", stored: str = "fp32") -> str:
    return (f"warning: --load {load} holds {stored} weights and --precision {precision} stores the frozen layers "
            f"rounded to {precision} in every saved checkpoint (they stay exactly the base's only with --fp32 or "
            f"--save-trainable-only; or rewrite the base in {precision} first: tools/reshard.py --in {load} "
            f"--out {load}-{precision} --dtype {precision})")


@pytest.mark.timeout(400)
def test_bf16_training_from_fp32_weights_warns_that_saves_round_the_frozen_layers(assets, tmp_path):
    rounded = tl.train(tl.train_args(assets, tmp_path / "from_fp32", 1, "--bf16"))
    assert _rounding_warning(assets.expanded) in rounded.out[0].splitlines(), rounded.out[0]

    bf16 = tmp_path / "expanded-bf16"  # the fix the warning names: the base rewritten in bf16
    tl.run_tool("reshard", "--in", assets.expanded, "--out", bf16, "--dtype", "bf16", env=tl.child_env(),
                check=True)
    same = tl.train(tl.train_args(assets, tmp_path / "from_bf16", 1, "--bf16", load=bf16))
    assert not [line for line in same.out[0].splitlines() if line.startswith("warning: ")], same.out[0]
    # no warning either where nothing is rounded or nothing frozen is saved
    runs = {"fp32": tl.train_args(assets, tmp_path / "never", 1, "--check"),
            "delta": tl.train_args(assets, tmp_path / "never", 1, "--check", "--bf16", "--save-trainable-only"),
            "no_save": tl.train_args(assets, None, 1, "--check", "--bf16"),
            "fp16_from_bf16": tl.train_args(assets, tmp_path / "never", 1, "--check", "--fp16", load=bf16)}
    results = run_distributed(tl.run_main_captured, 1, runs, timeout=240)[0]
    for name in ("fp32", "delta", "no_save"):
        code, out, err = _check_lines(results, name)
        assert code == 0 and len(out) == 1 and out[0].startswith("check: ok: "), results[name]
    code, out, err = _check_lines(results, "fp16_from_bf16")
    assert code == 0 and out[0] == _rounding_warning(bf16, "fp16", "bf16"), results["fp16_from_bf16"]


# ---- 3. an expansion whose new blocks leave a pipeline stage untrained ---------------------------

def _expansion_warning(placement: str, holding: int, empty: int) -> str:
    return (f"warning: --placement {placement} with --pp 2 puts all 2 new blocks on stage {holding}; stage {empty} "
            "would train nothing and the trainer refuses to save such a layout: use --placement interleaved, or "
            "train it at --pp 1 / with --train-all")


@pytest.mark.timeout(300)
def test_top_or_bottom_placement_at_pp2_warns_when_written_and_the_trainer_refuses_it(assets, tmp_path):
    from megatron_llamapro.runtime.multiproc import free_port

    top = tmp_path / "top-pp2"
    written = tl.run_tool("expand_blocks", "--in", assets.base, "--out", top, "--num-new-blocks", "2",
                          "--placement", "top", "--pp", "2", env=tl.child_env(), check=True)
    assert _expansion_warning("top", 1, 0) in written.stdout.splitlines(), written.stdout
    assert written.stderr.strip() == "", written.stderr
    # the layout the warning names is the one the trainer refuses (same StagePlacement rule)
    env = tl.child_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    refused = tl.run_tool("megatron_llamapro.pretrain", *tl.train_args(assets, tmp_path / "run", 1, "--pp", "2",
                                                                       "--check", load=top), env=env)
    assert refused.returncode == 2 and "stage 0 (layers 0-3) has no trainable layer" in refused.stderr, refused.stderr

    for placement, line in (("bottom", _expansion_warning("bottom", 0, 1)), ("interleaved", None)):
        dry = tl.run_tool("expand_blocks", "--in", assets.base, "--num-new-blocks", "2", "--placement", placement,
                          "--pp", "2", "--dry-run", env=tl.child_env(), check=True)
        warnings = [x for x in dry.stdout.splitlines() if x.startswith("warning: ")]
        assert warnings == ([line] if line else []), dry.stdout
    # at PP 1 every stage trains: no warning
    flat = tl.run_tool("expand_blocks", "--in", assets.base, "--num-new-blocks", "2", "--placement", "top",
                       "--dry-run", env=tl.child_env(), check=True)
    assert "warning: " not in flat.stdout, flat.stdout


# ---- 4. validation sets smaller than one evaluation ---------------------------------------------

def _one_epoch_samples(prefix: str, seq_length: int) -> int:
    """megatron's count of one epoch's sequences: all tokens less the extra label token, cut into seq_length."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix)
    tokens = int(numpy.sum(indexed.sequence_lengths))  # read while `indexed` (its mmap) is alive
    del indexed
    return (tokens - 1) // seq_length


@pytest.mark.timeout(400)
def test_validation_sets_smaller_than_an_evaluation_warn_that_samples_repeat(assets, tmp_path):
    from megatron_llamapro.data.synthetic import domain_corpus, write_jsonl

    write_jsonl(domain_corpus(3, seed=7), tmp_path / "small.jsonl")
    tl.run_tool("preprocess_data", "--input", tmp_path / "small.jsonl", "--json-key", "text", "--tokenizer-type",
                "sentencepiece", "--tokenizer-model", assets.hf / "tokenizer.model", "--output-prefix",
                tmp_path / "small", "--append-eod", env=tl.child_env(), check=True)
    small = str(tmp_path / "small_text_document")
    distinct_small, distinct_general = _one_epoch_samples(small, 32), _one_epoch_samples(assets.general, 32)
    assert 0 < distinct_small < 40 <= distinct_general, (distinct_small, distinct_general)

    metrics = tmp_path / "metrics.jsonl"
    run = tl.train(tl.train_args(assets, None, 1, "--eval-interval", "1", "--eval-iters", "10", "--metrics-file",
                                 metrics, "--valid-data", f"small={small}", f"general={assets.general}"))
    lines = run.out[0].splitlines()
    assert [line for line in lines if line.startswith("warning: ")] == [
        f"warning: validation set 'small' has {distinct_small} distinct samples; an evaluation reads 40 "
        "(--eval-iters 10 x --global-batch-size 4): samples are repeated"], run.out[0]
    assert [line for line in lines if line.startswith("validation: ")] == [
        "validation: each evaluation reads the same 40 samples of each set (--eval-iters 10 x --global-batch-size 4); "
        f"distinct samples covered: 'small' {distinct_small}, 'general' 40"], run.out[0]
    assert any("valid_loss/small" in record for record in metrics_records(metrics))  # it did evaluate

    quiet = tl.train(tl.train_args(assets, None, 1, "--valid-data", f"small={small}"))  # --eval-interval 0
    assert not [line for line in quiet.out[0].splitlines() if line.startswith(("warning: ", "validation: "))]
