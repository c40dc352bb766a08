"""The trainer's metrics files read back, and the paper's comparison computed from them."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_llamapro.quickstart.runner import StepFailed


def read_metrics(path: Path) -> dict:
    """metrics.jsonl -> {train: [(it, loss)], eval: [{iteration, valid_loss/...}], initial, final}."""
    if not path.is_file():
        raise StepFailed(f"{path}: the trainer wrote no metrics file")
    train, evals = [], []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec and "iteration" in rec:
            train.append([rec["iteration"], rec["loss"]])
        if any(k.startswith("valid_loss/") for k in rec):
            evals.append({k: v for k, v in rec.items() if k == "iteration" or k.startswith("valid_loss/")})
    if not evals:
        raise StepFailed(f"{path}: no evaluation records (valid_loss/...)")
    initial = next((r for r in evals if r["iteration"] == 0), evals[0])
    final = max(evals, key=lambda r: r["iteration"])
    return {"train": train, "eval": evals, "initial": initial, "final": final}


def compare_runs(expand: dict, full: dict) -> dict:
    """{general|domain: base, expand, full_ft and their changes} from the two runs' metrics."""
    comparison = {}
    for key in ("general", "domain"):
        k = f"valid_loss/{key}"
        before = expand["initial"].get(k)
        comparison[key] = {
            "base": before,
            "base_full_ft_run": full["initial"].get(k),
            "expand": expand["final"].get(k),
            "full_ft": full["final"].get(k),
            "expand_delta": None if before is None else expand["final"][k] - before,
            "full_ft_delta": None if full["initial"].get(k) is None else full["final"][k] - full["initial"][k],
        }
    return comparison


def expansion_kept_general_better(comparison: dict) -> bool:
    """The paper's claim: block expansion forgets less general ability than full fine-tuning."""
    g = comparison["general"]
    return bool(g["expand"] is not None and g["full_ft"] is not None
                and abs(g["expand"] - g["base"]) < abs(g["full_ft"] - g["base"]))
