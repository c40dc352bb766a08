"""Step 9's check: the instruction-tuned model, exported to HF, answers held-out questions in the
LLaMA-2 [INST] format it was tuned on (greedy decoding in transformers)."""

from __future__ import annotations

import random
import re
from pathlib import Path

QUESTIONS = 8


def held_out_questions(seed: int) -> list[tuple[str, int]]:
    """(question, answer) additions in the wording of the chat samples, from a seed of their own."""
    rng = random.Random(10_000 + seed)
    out = []
    for _ in range(QUESTIONS):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append((f"What is {a} plus {b}?", a + b))
    return out


def ask(export: Path, tokenizer_model: Path, seed: int) -> dict:
    """Each question as `<s>[INST] question [/INST]`; the reply up to EOS (at most 40 tokens), whether
    it states the right sum, and the share answered right."""
    import sentencepiece
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    rows = []
    for question, answer in held_out_questions(seed):
        ids = torch.tensor([[sp.bos_id()] + sp.encode(f"[INST] {question} [/INST]", out_type=int)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=sp.eos_id(),
                                 eos_token_id=sp.eos_id())
        reply = sp.decode(out[0, ids.shape[1]:].tolist())
        numbers = re.findall(r"-?\d+", reply)
        rows.append({"question": question, "expected": answer, "reply": reply,
                     "right": bool(numbers) and int(numbers[-1]) == answer})
    return {"answers": rows, "right": sum(r["right"] for r in rows), "asked": len(rows)}
