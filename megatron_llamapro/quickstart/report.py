"""OUT/report.md from the summary, a section per function."""

from __future__ import annotations

import os


def fmt(x, digits=4):
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_report(summary: dict) -> str:
    lines = [
        f"# LLaMA Pro quickstart report (`--size {summary['size']}`)",
        "",
        "A tiny LLaMA pretrained here on synthetic general text was expanded with LLaMA Pro identity blocks "
        "and post-pretrained on a synthetic domain (arithmetic and small Python functions), training only "
        "the new blocks. The paper's comparison, full fine-tuning of the original model on the same data, "
        "with the same steps and learning rate, ran beside it. Everything ran on this machine's CPU with "
        "the package's own command-line entry points; nothing was downloaded.",
        "",
        "![loss curves](loss_curves.png)",
        "",
    ]
    for section in (_result, _export, _instruct, _configuration, _commands, _timings):
        lines += section(summary)
    return "\n".join(lines)


def _result(summary: dict) -> list[str]:
    c = summary["config"]
    g, d = summary["comparison"]["general"], summary["comparison"]["domain"]
    exp = summary.get("export_check", {})
    base = summary.get("base_model", {})
    lines = [
        "## Result",
        "",
        "| validation loss (nats/token) | base model (iteration 0) | block expansion | full fine-tuning |",
        "|---|---|---|---|",
        f"| general text | {fmt(g['base'])} | {fmt(g['expand'])} ({_signed(g['expand_delta'])}) | "
        f"{fmt(g['full_ft'])} ({_signed(g['full_ft_delta'])}) |",
        f"| domain text | {fmt(d['base'])} | {fmt(d['expand'])} ({_signed(d['expand_delta'])}) | "
        f"{fmt(d['full_ft'])} ({_signed(d['full_ft_delta'])}) |",
        f"| final training loss (mean of last 5 steps) | | {fmt(_last_mean(summary['runs']['run_expand']))} | "
        f"{fmt(_last_mean(summary['runs']['run_full']))} |",
        "",
    ]
    if g["base"] is not None and g["base_full_ft_run"] is not None:
        lines.append(f"The expanded model's loss at iteration 0 equals the original model's (identity blocks): "
                     f"general {fmt(g['base'])} vs {fmt(g['base_full_ft_run'])}, domain {fmt(d['base'])} vs "
                     f"{fmt(d['base_full_ft_run'])}.")
        lines.append("")
    if summary["expansion_kept_general_better"]:
        lines.append(f"**As in the paper:** block expansion kept the general-text loss closer to the base model "
                     f"(change {_signed(g['expand_delta'])}) than full fine-tuning did "
                     f"(change {_signed(g['full_ft_delta'])}).")
    else:
        lines.append(f"**Not as in the paper:** in this run block expansion did not keep the general-text loss "
                     f"closer to the base than full fine-tuning (expansion {_signed(g['expand_delta'])}, "
                     f"full fine-tuning {_signed(g['full_ft_delta'])}).")
    if d["expand"] is not None and d["full_ft"] is not None:
        better = "full fine-tuning" if d["full_ft"] < d["expand"] else "block expansion"
        lines.append(f"On the domain, {better} reached the lower loss ({fmt(d['expand'])} expansion, "
                     f"{fmt(d['full_ft'])} full fine-tuning): full fine-tuning trains "
                     f"all {_int(base.get('params'))} parameters of the original model, expansion only the "
                     f"{c['new_blocks']} new blocks ({_int(exp.get('trainable_params'))} of the expanded model's "
                     f"{_int(exp.get('params'))}{_share(exp.get('trainable_params'), exp.get('params'))}; "
                     f"LLaMA Pro 8.3B: 1.6B of 8.36B, 19%).")
    return lines + [""]


def _export(summary: dict) -> list[str]:
    exp = summary.get("export_check", {})
    lines = ["## Export to Hugging Face", ""]
    if not exp:
        return lines
    lines.append(f"`export_hf/` ({exp['layers']} layers, {_int(exp['params'])} parameters, tokenizer.model "
                 f"{'included' if exp['tokenizer_in_export'] else 'MISSING'}) loads with "
                 f"`AutoModelForCausalLM.from_pretrained`.")
    seqs = " + ".join(f"{n} {k}" for k, n in exp["eval_sequences"].items())
    lines.append(f"The trainer's evaluation samples ({seqs} sequences), rebuilt with the "
                 f"trainer's data code and scored in transformers: domain {fmt(exp['hf_domain_loss'], 5)} "
                 f"(trainer {fmt(exp['trainer_domain_loss'], 5)}), general {fmt(exp['hf_general_loss'], 5)} "
                 f"(trainer {fmt(exp['trainer_general_loss'], 5)}); the HF base model against the trainer's "
                 f"iteration-0 evaluation: domain {fmt(exp['hf_base_domain_loss'], 5)} "
                 f"({fmt(exp['trainer_base_domain_loss'], 5)}), general {fmt(exp['hf_base_general_loss'], 5)} "
                 f"({fmt(exp['trainer_base_general_loss'], 5)}). Largest difference "
                 f"{fmt(exp['max_abs_diff'], 6)}: "
                 f"{'the export matches the trained checkpoint' if exp['close'] else 'NOT within 1e-3: check the export'}.")
    lines += ["", "Greedy generations (16 tokens), base model vs the exported expanded model:", "",
              "| prompt | base | expanded + trained |", "|---|---|---|"]
    for row in exp["generations"]:
        lines.append(f"| `{_cell(row['prompt'])}` | `{_cell(row['base'])}` | `{_cell(row['expanded'])}` |")
    return lines + [""]


def _instruct(summary: dict) -> list[str]:
    sft = summary.get("instruct")
    if not sft:
        return []
    loss = sft["valid_loss"]
    lines = ["## Instruction tuning (LLaMA Pro-Instruct, the paper's second stage)", "",
             "`run_sft/`: every parameter of the post-pretrained model tuned with `--sft` on synthetic chat samples "
             "(LLaMA-2 `[INST]` format, loss on the assistant's tokens only, samples packed per sequence), the text "
             "validation sets watched for forgetting; exported to `instruct_hf/`.", "",
             "| validation loss | before | after |", "|---|---|---|"]
    for name, (before, after) in loss.items():
        what = "chat (answer tokens)" if name == "chat" else name
        lines.append(f"| {what} | {fmt(before)} | {fmt(after)} |")
    lines += ["", f"Held-out questions answered right: **{sft['right']}/{sft['asked']}** (greedy, in transformers).", "",
              "| question | reply | right |", "|---|---|---|"]
    for row in sft["answers"]:
        lines.append(f"| {_cell(row['question'])} | `{_cell(row['reply'])}` | {'yes' if row['right'] else 'no'} |")
    return lines + [""]


def _configuration(summary: dict) -> list[str]:
    c = summary["config"]
    base = summary.get("base_model", {})
    expansion = summary.get("expansion")
    return [
        "## Configuration", "",
        f"- tokenizer: sentencepiece BPE (LLaMA settings, byte fallback), vocabulary {c['vocab']}",
        f"- base model: LLaMA, {c['layers']} layers, hidden {c['hidden']}, FFN {c['ffn']}, {c['heads']} heads, "
        f"{_int(base.get('params'))} parameters, randomly initialised; pretrained by the project's trainer "
        f"(all parameters, one process) {c['base_steps']} steps x {c['base_batch']} x "
        f"{c['seq_length']} tokens (lr {c['base_lr']} cosine to {c['base_lr'] / 10:g}) on general text with "
        f"{c['base_domain_fraction']:.0%} domain-like documents; training loss "
        f"{fmt(base.get('first_train_loss'), 2)} -> {fmt(base.get('final_train_loss'), 2)}",
        f"- expansion: {c['layers']} -> {c['layers'] + c['new_blocks']} blocks, {c['new_blocks']} new "
        f"interleaved identity blocks"
        + (f" at 0-based {expansion['new_layers']} (copies of original blocks "
           f"{', '.join(str(v) for v in expansion['sources'].values())}), their attention "
           f"and FFN output projections zeroed" if expansion else ""),
        f"- training (both runs): {c['train_iters']} iterations, global batch {c['global_batch']} x "
        f"{c['seq_length']} tokens (micro-batch {c['micro_batch']}), lr {c['lr']} cosine to {c['min_lr']}, "
        f"AdamW, weight decay 0.1, clip 1.0, fp32, TP{c['tp']} PP{c['pp']} on 2 gloo processes; "
        f"evaluation every {c['eval_interval']} iterations on {c['eval_iters']} batches per set",
        f"- data: {c['general_docs']} general documents (base model), {c['domain_docs']} domain documents "
        f"(post-pretraining), {c['valid_docs']} validation documents of each kind (unseen seeds)",
        "",
    ]


def _commands(summary: dict) -> list[str]:
    return ["## Commands", "",
            "Run in the output directory (`python` is the interpreter that ran the quickstart; every command "
            "is an entry point of the installed package); step 1 (data, tokenizer) and the base model's random "
            "initialisation run inside the quickstart itself.",
            "", "```", *summary["commands"], "```", ""]


def _timings(summary: dict) -> list[str]:
    lines = ["## Timings", "",
             "Wall-clock seconds, and the CPU seconds the step used (all its processes): on a busy machine "
             "wall time grows, CPU time much less.", "",
             "| step | wall s | CPU s |", "|---|---|---|"]
    for t in summary["timings"]:
        lines.append(f"| {t['step']} | {t['seconds']:.1f} | {t.get('cpu_seconds', 0):.1f} |")
    lines.append(f"| **total** | **{summary['total_seconds']:.1f}** | "
                 f"**{sum(t.get('cpu_seconds', 0) for t in summary['timings']):.1f}** |")
    lines += ["", f"Machine: {os.cpu_count()} CPUs, load average at the end "
                  f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}.",
              "", "Numbers: `summary.json`; per-step metrics: `base_run/metrics.jsonl`, `run_expand/metrics.jsonl`, "
                  "`run_full/metrics.jsonl`; tool logs: `logs/`.", ""]
    return lines


def _signed(x):
    return "n/a" if x is None else f"{x:+.4f}"


def _int(x):
    return "n/a" if x is None else f"{x:,}"


def _share(part, whole) -> str:
    return f", {part / whole:.0%}" if part and whole else ""


def _cell(text: str) -> str:
    return text.replace("\n", "\\n").replace("|", "\\|").replace("`", "'")


def _last_mean(run: dict, n: int = 5):
    vals = [t[1] for t in run["train"][-n:] if t[1] is not None]
    return sum(vals) / len(vals) if vals else None
