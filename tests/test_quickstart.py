"""`python -m megatron_llamapro.quickstart --size smoke`: the whole pipeline end to end.

Data + tokenizer -> tiny trained LLaMA (HF) -> Megatron TP1/PP2 shards -> interleaved block
expansion -> preprocessing -> training of the new blocks on 2 gloo processes, and full fine-tuning
of the original model beside it -> HF export checked in transformers -> report.

What is asserted, and why it is reliable at the smoke size (30 steps at lr 3e-3 for both runs):
* the report, plot and summary exist and carry finite numbers;
* the expanded model starts exactly where the original does (identity blocks): both runs' iteration-0
  evaluations agree;
* the export is the trained checkpoint: the trainer's own evaluation samples, rebuilt and scored in
  transformers, give the trainer's losses to 1e-3;
* both runs learn the domain (domain loss falls);
* the paper's comparison: block expansion keeps the general-text loss closer to the base model than
  full fine-tuning does. At this lr full fine-tuning on the narrow domain forgets general text by
  several times more than expansion does (typically +2 vs +0.3 nats), far beyond run-to-run noise;
* the second stage ran: instruction tuning (--sft) of the expanded model lowered the chat set's
  answer-token loss, and its HF export answered the held-out questions (the count is reported, not
  asserted: 12 steps teach a tiny model the format, not arithmetic);
* every step ran a package entry point (`python -m megatron_llamapro...`), none a file of the checkout.

A second, quick test runs a step with only a copy of the package on the path, from a directory
outside the repository: what an installed package's quickstart does.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lib import REPO, run_tool


@pytest.fixture(scope="module")
def quickstart_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    proc = run_tool("megatron_llamapro.quickstart", "--size", "smoke", "--out", out, timeout=560)
    assert proc.returncode == 0, f"quickstart failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert "report:" in proc.stdout
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quickstart_smoke(quickstart_out: Path):
    out = quickstart_out
    report = out / "report.md"
    plot = out / "loss_curves.png"
    assert report.is_file() and plot.is_file()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    text = report.read_text()
    assert "loss_curves.png" in text and "megatron_llamapro.launch --nproc-per-node 2" in text

    summary = json.loads((out / "summary.json").read_text())
    g, d = summary["comparison"]["general"], summary["comparison"]["domain"]
    for row in (g, d):
        for key in ("base", "base_full_ft_run", "expand", "full_ft", "expand_delta", "full_ft_delta"):
            assert _finite(row[key]), (key, row)
        # the numbers in the report are the summary's
        assert f"{row['expand']:.4f}" in text and f"{row['full_ft']:.4f}" in text

    # identity expansion: the expanded model's loss at iteration 0 is the original model's
    assert abs(g["base"] - g["base_full_ft_run"]) < 1e-4
    assert abs(d["base"] - d["base_full_ft_run"]) < 1e-4

    # the exported HF model is the trained checkpoint
    check = summary["export_check"]
    assert check["layers"] == summary["config"]["layers"] + summary["config"]["new_blocks"]
    assert check["tokenizer_in_export"]
    assert check["close"], check
    assert len(check["generations"]) >= 2

    # both runs learn the domain
    assert d["expand"] < d["base"] and d["full_ft"] < d["base"]
    # the paper's comparison: expansion forgets less general ability than full fine-tuning
    assert abs(g["expand"] - g["base"]) < abs(g["full_ft"] - g["base"]), g
    assert summary["expansion_kept_general_better"]

    # the base model was pretrained by the project's trainer from a random initialisation
    base = summary["base_model"]
    assert base["final_train_loss"] < base["first_train_loss"] - 1.0, base
    assert (out / "base_run" / "metrics.jsonl").is_file()

    # every step is an entry point of the package, shown as a user types it in OUT
    commands = summary["commands"]
    assert commands and all(c.startswith("python -m megatron_llamapro.")
                            for c in commands), commands
    assert not any("tools/" in c or str(REPO) in c for c in commands), commands
    assert "python -m megatron_llamapro.cli.expand_blocks --in base_mg" in text

    # the second stage: instruction tuning of the expanded model
    sft = summary["instruct"]
    chat_before, chat_after = sft["valid_loss"]["chat"]
    assert _finite(chat_before) and _finite(chat_after) and chat_after < chat_before, sft["valid_loss"]
    assert all(_finite(x) for pair in sft["valid_loss"].values() for x in pair), sft["valid_loss"]
    assert sft["asked"] == len(sft["answers"]) == 8 and 0 <= sft["right"] <= 8
    assert (out / "instruct_hf" / "config.json").is_file()
    assert "## Instruction tuning" in text and f"{chat_after:.4f}" in text
    assert any(c.startswith("python -m megatron_llamapro.launch") and " --sft " in c for c in commands), commands

    # timings recorded for every step
    steps = {t["step"] for t in summary["timings"]}
    assert any(s.startswith("6_run_expand") for s in steps) and any(s.startswith("7_run_full") for s in steps)


_ONE_STEP = """
import json
from pathlib import Path

import megatron_llamapro
from megatron_llamapro.data.synthetic import general_corpus, train_sentencepiece, write_jsonl
from megatron_llamapro.quickstart.steps import Quickstart

quickstart = Quickstart(Path("qs").resolve(), "smoke")
docs = general_corpus(1000, seed=0)
write_jsonl(docs, quickstart.out / "data" / "general_valid.jsonl")
train_sentencepiece(docs, 400, quickstart.tokenizer_model.parent)
quickstart.preprocess(["general_valid"])
print(json.dumps({"package": megatron_llamapro.__file__, "commands": quickstart.runner.commands}))
"""


@pytest.mark.timeout(300)
def test_step_runs_the_installed_package_outside_the_repository(tmp_path: Path):
    """A copy of the package alone (no tools/, no checkout) on the path, run from elsewhere: the
    step runs the package's own entry point and records the command a user would type."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "megatron_llamapro", site / "megatron_llamapro",
                    ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-c", _ONE_STEP], cwd=work, env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    info = json.loads(proc.stdout.splitlines()[-1])
    assert Path(info["package"]).is_relative_to(site), info
    assert info["commands"] == [
        "python -m megatron_llamapro.cli.preprocess_data --input data/general_valid.jsonl --json-key text "
        "--tokenizer-type sentencepiece --tokenizer-model tokenizer/tokenizer.model "
        "--output-prefix data/general_valid --append-eod --workers 2 --overwrite"]
    out = work / "qs"
    assert (out / "data" / "general_valid_text_document.bin").stat().st_size > 0
    assert (out / "data" / "general_valid_text_document.idx").is_file()
    assert "tokens" in (out / "logs" / "2_preprocess_general_valid.log").read_text()
