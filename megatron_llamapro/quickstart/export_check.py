"""Step 8's check: the exported HF model loads in transformers, scores the trainer's evaluation
samples as the trainer did, and generates text next to the base model."""

from __future__ import annotations

from pathlib import Path

PROMPTS = ("12 + 7 =", "Q: Anna has 5 apples and gets 3 more. How many apples? A:",
           "def double_2(x):\n", "The old river")


def masked_loss(model, batch: dict, chunk: int = 16) -> float:
    """Mean next-token loss over the loss-masked tokens, as the trainer computes it (the trainer
    gives the vocabulary's padding rows -inf logits, so both score the real vocabulary only)."""
    import torch

    total, count = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, batch["tokens"].shape[0], chunk):
            tokens = batch["tokens"][i:i + chunk].long()
            labels = batch["labels"][i:i + chunk].long()
            mask = batch["loss_mask"][i:i + chunk].float()
            logits = model(input_ids=tokens).logits.float()
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                       reduction="none")
            total += float((losses * mask.reshape(-1)).sum())
            count += float(mask.sum())
    return total / max(count, 1.0)


def check_export(export: Path, base_hf: Path, tokenizer_model: Path, samples: dict, run: dict) -> dict:
    """The export and the base model against the trainer's final and iteration-0 evaluations of
    ``run`` (read_metrics of the expansion run) on ``samples`` (its evaluation samples)."""
    import sentencepiece
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32).eval()
    check = {"layers": model.config.num_hidden_layers, "base_layers": base.config.num_hidden_layers,
             "params": sum(p.numel() for p in model.parameters()),
             "tokenizer_in_export": (export / "tokenizer.model").is_file()}
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    check["trainable_params"] = per_layer * (model.config.num_hidden_layers - base.config.num_hidden_layers)
    diffs = []
    check["vocab_size"] = model.config.vocab_size
    for which, batch in samples.items():
        check[f"hf_{which}_loss"] = masked_loss(model, batch)
        check[f"hf_base_{which}_loss"] = masked_loss(base, batch)
        check[f"trainer_{which}_loss"] = run["final"].get(f"valid_loss/{which}")
        check[f"trainer_base_{which}_loss"] = run["initial"].get(f"valid_loss/{which}")
        for a, b in ((f"hf_{which}_loss", f"trainer_{which}_loss"),
                     (f"hf_base_{which}_loss", f"trainer_base_{which}_loss")):
            if check[b] is not None:
                diffs.append(abs(check[a] - check[b]))
    check["eval_sequences"] = {k: int(v["tokens"].shape[0]) for k, v in samples.items()}
    check["max_abs_diff"] = max(diffs) if diffs else None
    check["close"] = bool(diffs) and max(diffs) < 1e-3
    check["generations"] = [_generations(prompt, sp, {"expanded": model, "base": base}) for prompt in PROMPTS]
    return check


def _generations(prompt: str, sp, models: dict) -> dict:
    """Greedy 16-token continuations of ``prompt`` by each model."""
    import torch

    ids = torch.tensor([sp.encode(prompt, out_type=int)])
    row = {"prompt": prompt}
    for label, model in models.items():
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=sp.eos_id(),
                                 eos_token_id=sp.eos_id())
        row[label] = sp.decode(out[0, ids.shape[1]:].tolist())
    return row
