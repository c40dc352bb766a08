"""`python -m megatron_llamapro.quickstart --out quickstart`: the whole LLaMA Pro pipeline on a laptop.

Nothing is downloaded. On a 2-core CPU (`--size tiny`, the default) it takes a few minutes:

1. generate a "general" (English-like prose) and a "domain" (arithmetic / small Python functions)
   corpus and train a LLaMA-like sentencepiece tokenizer on them;
2. train a tiny LLaMA base model (transformers ``LlamaForCausalLM``) on the general text, so the
   model that gets expanded is a real, trained model, and save it as an HF checkpoint with its tokenizer;
3. ``tools/convert_hf_to_megatron.py``: HF -> Megatron shards (TP1 PP2);
4. ``tools/expand_blocks.py``: add interleaved identity blocks (LLaMA Pro block expansion);
5. ``tools/preprocess_data.py``: tokenize the domain training text and a general and a domain
   validation set into Megatron .bin/.idx files;
6. ``python -m megatron_llamapro.pretrain`` on 2 gloo processes: train only the new blocks on the
   domain text, evaluating general and domain validation loss as it goes;
7. the paper's comparison: full fine-tuning of the original (unexpanded) model, same data, steps and lr;
8. ``tools/convert_megatron_to_hf.py``: export the trained expanded model to HF, load it with
   transformers, check its domain loss against the trainer's and generate a little text;
9. write ``OUT/report.md`` (with ``OUT/loss_curves.png``) and ``OUT/summary.json``.

Every step after 2 runs the project's command-line tools as subprocesses, exactly as a user would;
the command lines are printed and kept in the report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_llamapro.errors import EXIT_FAILED, UserError, entry_point, run

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS = REPO_ROOT / "tools"
TRAINER_SEED = 1234


@dataclass(frozen=True)
class Size:
    """Everything that differs between the quickstart sizes."""
    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    new_blocks: int
    seq_length: int
    # data (documents)
    general_docs: int
    domain_docs: int
    valid_docs: int
    base_domain_fraction: float  # share of domain-like documents in the base model's training mix
    # base model training (plain PyTorch loop on the HF model)
    base_steps: int
    base_batch: int
    base_lr: float
    # LLaMA Pro post-pretraining and the full fine-tuning baseline (same recipe for both)
    train_iters: int
    micro_batch: int
    global_batch: int
    lr: float
    min_lr: float
    eval_interval: int
    eval_iters: int
    tp: int
    pp: int


SIZES = {
    # < 10 minutes on 2 CPU cores.
    "tiny": Size(vocab=512, hidden=128, ffn=352, layers=4, heads=4, new_blocks=2, seq_length=64,
                 general_docs=12000, domain_docs=4000, valid_docs=300, base_domain_fraction=0.05,
                 base_steps=500, base_batch=32, base_lr=3e-3,
                 train_iters=300, micro_batch=4, global_batch=8, lr=1e-3, min_lr=1e-4,
                 eval_interval=25, eval_iters=8, tp=1, pp=2),
    # The test's size: a few steps, smallest shapes (< ~2.5 minutes).
    "smoke": Size(vocab=400, hidden=64, ffn=176, layers=4, heads=4, new_blocks=2, seq_length=64,
                  general_docs=3000, domain_docs=1000, valid_docs=120, base_domain_fraction=0.05,
                  base_steps=150, base_batch=32, base_lr=5e-3,
                  train_iters=30, micro_batch=4, global_batch=8, lr=3e-3, min_lr=3e-4,
                  eval_interval=10, eval_iters=4, tp=1, pp=2),
}


def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


class StepFailed(UserError):
    pass


class Pipeline:
    def __init__(self, out: Path, size_name: str, seed: int = 0, overrides: dict | None = None):
        self.out = out
        self.size_name = size_name
        self.size = dataclasses.replace(SIZES[size_name], **(overrides or {}))
        self.seed = seed
        self.logs = out / "logs"
        self.timings: list[dict] = []
        self.commands: list[str] = []
        self.summary: dict = {"size": size_name, "config": asdict(self.size)}

    # ---- helpers ---------------------------------------------------------------------------
    def _timed(self, name: str):
        pipeline = self

        class _Timer:
            def __enter__(self):
                self.start = time.time()
                self.cpu = time.process_time()
                _log(f"== {name}")
                return self

            def __exit__(self, *exc):
                seconds = time.time() - self.start
                pipeline.timings.append({"step": name, "seconds": round(seconds, 2),
                                         "cpu_seconds": round(time.process_time() - self.cpu, 2)})
                if exc[0] is None:
                    _log(f"   {name}: {seconds:.1f} s")
                return False

        return _Timer()

    def run(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        """Run one CLI as a subprocess; its output goes to OUT/logs/<name>.log (tail shown on failure)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        shown = " ".join(shlex.quote(str(c)) for c in cmd)
        shown = (shown.replace(shlex.quote(sys.executable), "python").replace(str(self.out) + "/", "")
                 .replace(str(REPO_ROOT) + "/", ""))
        self.commands.append(shown)
        _log(f"$ {shown}")
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.setdefault("OMP_NUM_THREADS", "1")
        full_env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + full_env["PYTHONPATH"]
                                                   if full_env.get("PYTHONPATH") else "")
        full_env.update(env or {})
        start = time.time()
        cpu0 = _children_cpu()
        with open(log_path, "w") as log:
            proc = subprocess.run([str(c) for c in cmd], cwd=self.out, env=full_env,
                                  stdout=log, stderr=subprocess.STDOUT)
        seconds = time.time() - start
        self.timings.append({"step": name, "seconds": round(seconds, 2),
                             "cpu_seconds": round(_children_cpu() - cpu0, 2), "command": shown})
        if proc.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
            raise StepFailed(f"step {name!r} failed with exit code {proc.returncode} after {seconds:.1f} s; "
                             f"last lines of {log_path}:\n{tail}")
        _log(f"   {name}: {seconds:.1f} s (log: {log_path.relative_to(self.out)})")

    def tool(self, script: str) -> str:
        path = TOOLS / script
        if not path.is_file():
            raise StepFailed(f"{path}: not found (the quickstart runs from a source checkout)")
        return str(path)

    # ---- 1. data ---------------------------------------------------------------------------
    def make_data(self) -> None:
        from megatron_llamapro.data.synthetic import (domain_corpus, general_corpus, train_sentencepiece,
                                                      write_jsonl)

        s = self.size
        with self._timed("1 data + tokenizer"):
            data = self.out / "data"
            # megatron's dataset index cache is keyed by paths and sizes, not content: a rerun into the
            # same directory with other settings must not pick up the old indices.
            shutil.rmtree(self.out / "cache", ignore_errors=True)
            self.general = general_corpus(s.general_docs, seed=self.seed)
            self.domain = domain_corpus(s.domain_docs, seed=self.seed)
            self.general_valid = general_corpus(s.valid_docs, seed=self.seed + 101)
            self.domain_valid = domain_corpus(s.valid_docs, seed=self.seed + 101)
            write_jsonl(self.general, data / "general.jsonl")
            write_jsonl(self.domain, data / "domain.jsonl")
            write_jsonl(self.general_valid, data / "general_valid.jsonl")
            write_jsonl(self.domain_valid, data / "domain_valid.jsonl")
            # Like LLaMA's tokenizer, it covers both kinds of text.
            n_dom = len(self.general) // 4
            self.tokenizer_model = train_sentencepiece(self.general + self.domain[:n_dom], s.vocab,
                                                       self.out / "tokenizer")
            _log(f"   {len(self.general)} general + {len(self.domain)} domain documents, "
                 f"{s.valid_docs} validation documents each, sentencepiece vocab {s.vocab}")

    # ---- 2. base model -------------------------------------------------------------------
    def _sp(self):
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=str(self.tokenizer_model))

    @staticmethod
    def _stream(sp, docs: list[str]) -> list[int]:
        """Documents tokenized and concatenated with EOS after each, as preprocess --append-eod does."""
        ids: list[int] = []
        for piece in sp.encode(docs, out_type=int):
            ids.extend(piece)
            ids.append(sp.eos_id())
        return ids

    def train_base(self) -> None:
        import random

        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        s = self.size
        with self._timed("2 train base model (HF, plain PyTorch)"):
            torch.manual_seed(self.seed)
            # One thread: with 2 threads, these tiny shapes spend their time synchronising, and on a
            # busy machine they slow down many times over.
            torch.set_num_threads(1)
            sp = self._sp()
            # The base model's pretraining mix: general text with a little domain-like text, as
            # LLaMA-2 saw some code and math before LLaMA Pro specialised it.
            rng = random.Random(self.seed)
            n_dom = int(round(s.base_domain_fraction * len(self.general) / (1 - s.base_domain_fraction)))
            extra = domain_corpus_for_base(self.seed, n_dom)
            docs = self.general + extra
            rng.shuffle(docs)
            stream = torch.tensor(self._stream(sp, docs), dtype=torch.long)
            n_seq = (len(stream) - 1) // s.seq_length
            config = LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=s.hidden, intermediate_size=s.ffn,
                                 num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                 num_key_value_heads=s.heads, max_position_embeddings=4 * s.seq_length,
                                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                                 bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), torch_dtype="float32")
            model = LlamaForCausalLM(config)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=s.base_lr, betas=(0.9, 0.95), weight_decay=0.1)
            warmup = max(1, s.base_steps // 20)

            def lr_at(step):
                if step < warmup:
                    return s.base_lr * (step + 1) / warmup
                t = (step - warmup) / max(1, s.base_steps - warmup)
                return 0.1 * s.base_lr + 0.9 * s.base_lr * 0.5 * (1 + math.cos(math.pi * t))

            gen = torch.Generator().manual_seed(self.seed)
            losses = []
            for step in range(s.base_steps):
                starts = torch.randint(0, n_seq, (s.base_batch,), generator=gen) * s.seq_length
                batch = torch.stack([stream[i:i + s.seq_length + 1] for i in starts.tolist()])
                logits = model(input_ids=batch[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         batch[:, 1:].reshape(-1))
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(loss.item())
                if step % 100 == 0 or step == s.base_steps - 1:
                    _log(f"   base step {step + 1}/{s.base_steps} loss {losses[-1]:.3f}")
            self.base_hf = self.out / "base_hf"
            model.save_pretrained(self.base_hf, safe_serialization=True)
            shutil.copy(self.tokenizer_model, self.base_hf / "tokenizer.model")
            n_params = sum(p.numel() for p in model.parameters())
            self.summary["base_model"] = {
                "params": n_params, "train_tokens": s.base_steps * s.base_batch * s.seq_length,
                "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
                "first_train_loss": losses[0],
            }
            self.summary["base_train_curve"] = losses[::max(1, len(losses) // 100)]
            _log(f"   {n_params / 1e6:.2f}M parameters, loss {losses[0]:.2f} -> "
                 f"{self.summary['base_model']['final_train_loss']:.2f}; saved {self.base_hf.name}/")

    # ---- 3-5. conversion, expansion, preprocessing ---------------------------------------
    def convert_expand_preprocess(self) -> None:
        s = self.size
        py = sys.executable
        self.run("3_convert_hf_to_megatron",
                 [py, self.tool("convert_hf_to_megatron.py"), "--hf-dir", "base_hf", "--out", "base_mg",
                  "--tp", s.tp, "--pp", s.pp, "--overwrite"])
        self.run("4_expand_blocks",
                 [py, self.tool("expand_blocks.py"), "--in", "base_mg", "--out", "expanded",
                  "--num-new-blocks", s.new_blocks, "--verify", "--overwrite"])
        for name in ("domain", "general_valid", "domain_valid"):
            self.run(f"5_preprocess_{name}",
                     [py, self.tool("preprocess_data.py"), "--input", f"data/{name}.jsonl", "--json-key", "text",
                      "--tokenizer-type", "sentencepiece", "--tokenizer-model", "base_hf/tokenizer.model",
                      "--output-prefix", f"data/{name}", "--append-eod", "--workers", "2", "--overwrite"])
        manifest = self.out / "expanded" / "llamapro.json"
        if manifest.is_file():
            try:
                info = json.loads(manifest.read_text())
                last = info["expansions"][-1]
                self.summary["expansion"] = {"new_layers": last["new_layers"], "sources": last["sources"],
                                             "placement": last.get("placement"),
                                             "num_layers": info["arch"]["num_layers"]}
            except (ValueError, KeyError, IndexError, TypeError):
                pass

    # ---- 6-7. training -------------------------------------------------------------------
    def train(self, name: str, load: str, extra: list[str]) -> None:
        s = self.size
        port = _free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", port,
               "-m", "megatron_llamapro.pretrain",
               "--load", load, "--save", name,
               "--data-path", "data/domain_text_document",
               "--valid-data", "general=data/general_valid_text_document",
               "domain=data/domain_valid_text_document",
               "--tp", s.tp, "--pp", s.pp, "--seq-length", s.seq_length,
               "--micro-batch-size", s.micro_batch, "--global-batch-size", s.global_batch,
               "--train-iters", s.train_iters, "--lr", s.lr, "--min-lr", s.min_lr, "--fp32",
               "--eval-interval", s.eval_interval, "--eval-iters", s.eval_iters,
               "--save-interval", s.train_iters, "--data-cache-dir", "cache", "--seed", TRAINER_SEED, *extra]
        run_dir = self.out / name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh run, not a resume of an earlier quickstart
        self.run(f"{'6' if name == 'run_expand' else '7'}_{name}", cmd,
                 env={"OMP_NUM_THREADS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})
        self.summary.setdefault("runs", {})[name] = read_metrics(run_dir / "metrics.jsonl")

    # ---- 8. export + check in transformers ----------------------------------------------
    def export_and_check(self) -> None:
        self.run("8_convert_megatron_to_hf",
                 [sys.executable, self.tool("convert_megatron_to_hf.py"), "--megatron-dir", "run_expand",
                  "--out", "export_hf", "--overwrite"])
        with self._timed("8 check the export in transformers"):
            import torch
            from transformers import AutoModelForCausalLM

            torch.set_num_threads(1)
            sp = self._sp()
            export = self.out / "export_hf"
            model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
            base = AutoModelForCausalLM.from_pretrained(self.out / "base_hf", dtype=torch.float32).eval()
            check = {"layers": model.config.num_hidden_layers, "base_layers": base.config.num_hidden_layers,
                     "params": sum(p.numel() for p in model.parameters()),
                     "tokenizer_in_export": (export / "tokenizer.model").is_file()}
            per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
            check["trainable_params"] = per_layer * (model.config.num_hidden_layers - base.config.num_hidden_layers)
            # The trainer evaluates the first eval_iters x global_batch samples of each validation
            # set (the same ones every time); rebuild those samples and score them in transformers.
            samples = self._trainer_eval_samples()
            final = self.summary["runs"]["run_expand"]["final"]
            initial = self.summary["runs"]["run_expand"]["initial"]
            diffs = []
            check["vocab_size"] = model.config.vocab_size
            for which, batch in samples.items():
                check[f"hf_{which}_loss"] = _masked_loss(model, batch)
                check[f"hf_base_{which}_loss"] = _masked_loss(base, batch)
                check[f"trainer_{which}_loss"] = final.get(f"valid_loss/{which}")
                check[f"trainer_base_{which}_loss"] = initial.get(f"valid_loss/{which}")
                for a, b in ((f"hf_{which}_loss", f"trainer_{which}_loss"),
                             (f"hf_base_{which}_loss", f"trainer_base_{which}_loss")):
                    if check[b] is not None:
                        diffs.append(abs(check[a] - check[b]))
            check["eval_sequences"] = {k: int(v["tokens"].shape[0]) for k, v in samples.items()}
            check["max_abs_diff"] = max(diffs) if diffs else None
            check["close"] = bool(diffs) and max(diffs) < 1e-3
            gens = []
            for prompt in ("12 + 7 =", "Q: Anna has 5 apples and gets 3 more. How many apples? A:",
                           "def double_2(x):\n", "The old river"):
                ids = torch.tensor([sp.encode(prompt, out_type=int)])
                row = {"prompt": prompt}
                for label, m in (("expanded", model), ("base", base)):
                    with torch.no_grad():
                        out = m.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=sp.eos_id(),
                                         eos_token_id=sp.eos_id())
                    row[label] = sp.decode(out[0, ids.shape[1]:].tolist())
                gens.append(row)
            check["generations"] = gens
            self.summary["export_check"] = check
            _log(f"   export: {check['layers']} layers; domain loss in transformers {check['hf_domain_loss']:.5f}"
                 f" vs trainer {_fmt(check['trainer_domain_loss'], 5)}; general {check['hf_general_loss']:.5f}"
                 f" vs {_fmt(check['trainer_general_loss'], 5)}; base model (iteration 0) max difference "
                 f"included: {_fmt(check['max_abs_diff'], 6)}")

    def _trainer_eval_samples(self) -> dict:
        """{name: batch of the samples the trainer's evaluation used}, rebuilt with the trainer's data code."""
        import torch

        from megatron_llamapro.data.blend import build_datasets
        from megatron_llamapro.data.tokenizer import build_tokenizer

        s = self.size
        eval_runs = s.train_iters // s.eval_interval + 1
        cwd = os.getcwd()
        os.chdir(self.out)  # the trainer ran here with these relative paths
        try:
            _, valid = build_datasets(
                ["data/domain_text_document"], "98,2,0",
                ["general=data/general_valid_text_document", "domain=data/domain_valid_text_document"],
                s.seq_length, TRAINER_SEED, train_samples=s.train_iters * s.global_batch,
                eval_samples=max(1, eval_runs * s.eval_iters * s.global_batch),
                tokenizer=build_tokenizer("sentencepiece", "base_hf/tokenizer.model"), cache_dir="cache")
        finally:
            os.chdir(cwd)
        out = {}
        for name, dataset in valid.items():
            # data-parallel size 1: eval_iters steps of global_batch samples, in order from 0
            n = min(len(dataset), s.eval_iters * s.global_batch) // s.global_batch * s.global_batch
            items = [dataset[i] for i in range(n)]
            out[name] = {k: torch.stack([torch.as_tensor(it[k]) for it in items])
                         for k in ("tokens", "labels", "loss_mask")}
        return out

    # ---- 9. report -----------------------------------------------------------------------
    def report(self, total_seconds: float) -> Path:
        self.summary["timings"] = self.timings
        self.summary["total_seconds"] = round(total_seconds, 1)
        self.summary["commands"] = self.commands
        runs = self.summary["runs"]
        e, f = runs["run_expand"], runs["run_full"]
        comparison = {}
        for key in ("general", "domain"):
            k = f"valid_loss/{key}"
            before = e["initial"].get(k)
            comparison[key] = {
                "base": before,
                "base_full_ft_run": f["initial"].get(k),
                "expand": e["final"].get(k),
                "full_ft": f["final"].get(k),
                "expand_delta": None if before is None else e["final"][k] - before,
                "full_ft_delta": None if f["initial"].get(k) is None else f["final"][k] - f["initial"][k],
            }
        self.summary["comparison"] = comparison
        g = comparison["general"]
        self.summary["expansion_kept_general_better"] = bool(
            g["expand"] is not None and g["full_ft"] is not None
            and abs(g["expand"] - g["base"]) < abs(g["full_ft"] - g["base"]))
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        plot = self.out / "loss_curves.png"
        make_plot(self.summary, plot)
        path = self.out / "report.md"
        path.write_text(render_report(self.summary))
        return path


def domain_corpus_for_base(seed: int, num_docs: int) -> list[str]:
    """Domain-like documents for the base model's mix: a seed not used by the domain train/valid sets."""
    from megatron_llamapro.data.synthetic import domain_corpus

    return domain_corpus(num_docs, seed=seed + 977) if num_docs > 0 else []


def _masked_loss(model, batch: dict, chunk: int = 16) -> float:
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


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def make_plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    styles = {"run_expand": ("block expansion (new blocks only)", "tab:blue"),
              "run_full": ("full fine-tuning (original model)", "tab:red")}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, (label, color) in styles.items():
        train = runs[name]["train"]
        xs, ys = [t[0] for t in train], [t[1] for t in train]
        axes[0].plot(xs, ys, color=color, lw=0.6, alpha=0.3)
        window = max(1, len(ys) // 15)
        smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1])
                  for i in range(len(ys))]
        axes[0].plot(xs, smooth, color=color, lw=1.6, label=f"{label}, mean of {window}")
        ev = runs[name]["eval"]
        for ax, key in ((axes[1], "valid_loss/general"), (axes[2], "valid_loss/domain")):
            pts = [(r["iteration"], r[key]) for r in ev if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=label, ms=3)
    base = summary["comparison"]
    for ax, key in ((axes[1], "general"), (axes[2], "domain")):
        if base[key]["base"] is not None:
            ax.axhline(base[key]["base"], color="gray", ls="--", lw=1, label="base model (before)")
    axes[0].set_title("training loss (domain text; faint: per step)")
    axes[1].set_title("validation loss: general text (forgetting)")
    axes[2].set_title("validation loss: domain text (learning)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"LLaMA Pro quickstart ({summary['size']}): block expansion vs full fine-tuning, "
                 f"same data, steps and lr")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x, digits=4):
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_report(summary: dict) -> str:
    c = summary["config"]
    cmp_ = summary["comparison"]
    g, d = cmp_["general"], cmp_["domain"]
    exp = summary.get("export_check", {})
    base = summary.get("base_model", {})
    ok = summary["expansion_kept_general_better"]
    lines = [
        f"# LLaMA Pro quickstart report (`--size {summary['size']}`)",
        "",
        "A tiny LLaMA trained here on synthetic general text was expanded with LLaMA Pro identity blocks "
        "and post-pretrained on a synthetic domain (arithmetic and small Python functions), training only "
        "the new blocks. The paper's comparison, full fine-tuning of the original model on the same data, "
        "with the same steps and learning rate, ran beside it. Everything ran on this machine's CPU with "
        "the project's command-line tools; nothing was downloaded.",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "## Result",
        "",
        "| validation loss (nats/token) | base model (iteration 0) | block expansion | full fine-tuning |",
        "|---|---|---|---|",
        f"| general text | {_fmt(g['base'])} | {_fmt(g['expand'])} ({_signed(g['expand_delta'])}) | "
        f"{_fmt(g['full_ft'])} ({_signed(g['full_ft_delta'])}) |",
        f"| domain text | {_fmt(d['base'])} | {_fmt(d['expand'])} ({_signed(d['expand_delta'])}) | "
        f"{_fmt(d['full_ft'])} ({_signed(d['full_ft_delta'])}) |",
        f"| final training loss (mean of last 5 steps) | | {_fmt(_last_mean(summary['runs']['run_expand']))} | "
        f"{_fmt(_last_mean(summary['runs']['run_full']))} |",
        "",
    ]
    if g["base"] is not None and g["base_full_ft_run"] is not None:
        lines.append(f"The expanded model's loss at iteration 0 equals the original model's (identity blocks): "
                     f"general {_fmt(g['base'])} vs {_fmt(g['base_full_ft_run'])}, domain {_fmt(d['base'])} vs "
                     f"{_fmt(d['base_full_ft_run'])}.")
        lines.append("")
    if ok:
        lines.append(f"**As in the paper:** block expansion kept the general-text loss closer to the base model "
                     f"(change {_signed(g['expand_delta'])}) than full fine-tuning did "
                     f"(change {_signed(g['full_ft_delta'])}).")
    else:
        lines.append(f"**Not as in the paper:** in this run block expansion did not keep the general-text loss "
                     f"closer to the base than full fine-tuning (expansion {_signed(g['expand_delta'])}, "
                     f"full fine-tuning {_signed(g['full_ft_delta'])}).")
    if d["expand"] is not None and d["full_ft"] is not None:
        better = "full fine-tuning" if d["full_ft"] < d["expand"] else "block expansion"
        lines.append(f"On the domain, {better} reached the lower loss ({_fmt(d['expand'])} expansion, "
                     f"{_fmt(d['full_ft'])} full fine-tuning): full fine-tuning trains "
                     f"all {_int(base.get('params'))} parameters of the original model, expansion only the "
                     f"{c['new_blocks']} new blocks ({_int(exp.get('trainable_params'))} of the expanded model's "
                     f"{_int(exp.get('params'))}{_share(exp.get('trainable_params'), exp.get('params'))}; "
                     f"LLaMA Pro 8.3B: 1.6B of 8.36B, 19%).")
    lines += ["", "## Export to Hugging Face", ""]
    if exp:
        lines.append(f"`export_hf/` ({exp['layers']} layers, {_int(exp['params'])} parameters, tokenizer.model "
                     f"{'included' if exp['tokenizer_in_export'] else 'MISSING'}) loads with "
                     f"`AutoModelForCausalLM.from_pretrained`.")
        seqs = " + ".join(f"{n} {k}" for k, n in exp["eval_sequences"].items())
        lines.append(f"The trainer's evaluation samples ({seqs} sequences), rebuilt with the "
                     f"trainer's data code and scored in transformers: domain {_fmt(exp['hf_domain_loss'], 5)} "
                     f"(trainer {_fmt(exp['trainer_domain_loss'], 5)}), general {_fmt(exp['hf_general_loss'], 5)} "
                     f"(trainer {_fmt(exp['trainer_general_loss'], 5)}); the HF base model against the trainer's "
                     f"iteration-0 evaluation: domain {_fmt(exp['hf_base_domain_loss'], 5)} "
                     f"({_fmt(exp['trainer_base_domain_loss'], 5)}), general {_fmt(exp['hf_base_general_loss'], 5)} "
                     f"({_fmt(exp['trainer_base_general_loss'], 5)}). Largest difference "
                     f"{_fmt(exp['max_abs_diff'], 6)}: "
                     f"{'the export matches the trained checkpoint' if exp['close'] else 'NOT within 1e-3: check the export'}.")
        lines += ["", "Greedy generations (16 tokens), base model vs the exported expanded model:", "",
                  "| prompt | base | expanded + trained |", "|---|---|---|"]
        for row in exp["generations"]:
            lines.append(f"| `{_cell(row['prompt'])}` | `{_cell(row['base'])}` | `{_cell(row['expanded'])}` |")
    lines += ["", "## Configuration", "",
              f"- tokenizer: sentencepiece BPE (LLaMA settings, byte fallback), vocabulary {c['vocab']}",
              f"- base model: LLaMA, {c['layers']} layers, hidden {c['hidden']}, FFN {c['ffn']}, {c['heads']} heads, "
              f"{_int(base.get('params'))} parameters; trained {c['base_steps']} steps x {c['base_batch']} x "
              f"{c['seq_length']} tokens (lr {c['base_lr']}) on general text with "
              f"{c['base_domain_fraction']:.0%} domain-like documents; training loss "
              f"{_fmt(base.get('first_train_loss'), 2)} -> {_fmt(base.get('final_train_loss'), 2)}",
              f"- expansion: {c['layers']} -> {c['layers'] + c['new_blocks']} blocks, {c['new_blocks']} new "
              f"interleaved identity blocks"
              + (f" at 0-based {summary['expansion']['new_layers']} (copies of original blocks "
                 f"{', '.join(str(v) for v in summary['expansion']['sources'].values())}), their attention "
                 f"and FFN output projections zeroed" if summary.get("expansion") else ""),
              f"- training (both runs): {c['train_iters']} iterations, global batch {c['global_batch']} x "
              f"{c['seq_length']} tokens (micro-batch {c['micro_batch']}), lr {c['lr']} cosine to {c['min_lr']}, "
              f"AdamW, weight decay 0.1, clip 1.0, fp32, TP{c['tp']} PP{c['pp']} on 2 gloo processes; "
              f"evaluation every {c['eval_interval']} iterations on {c['eval_iters']} batches per set",
              f"- data: {c['general_docs']} general documents (base model), {c['domain_docs']} domain documents "
              f"(post-pretraining), {c['valid_docs']} validation documents of each kind (unseen seeds)",
              "", "## Commands", "",
              "Run in the output directory (`tools/` is the repository's; `python` is the interpreter that ran "
              "the quickstart); steps 1 and 2 (data, tokenizer, base model) run inside the quickstart itself.",
              "", "```"]
    lines += summary["commands"]
    lines += ["```", "", "## Timings", "",
              "Wall-clock seconds, and the CPU seconds the step used (all its processes): on a busy machine "
              "wall time grows, CPU time much less.", "",
              "| step | wall s | CPU s |", "|---|---|---|"]
    for t in summary["timings"]:
        lines.append(f"| {t['step']} | {t['seconds']:.1f} | {t.get('cpu_seconds', 0):.1f} |")
    lines.append(f"| **total** | **{summary['total_seconds']:.1f}** | "
                 f"**{sum(t.get('cpu_seconds', 0) for t in summary['timings']):.1f}** |")
    lines.append("")
    lines.append(f"Machine: {os.cpu_count()} CPUs, load average at the end "
                 f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}.")
    lines += ["", "Numbers: `summary.json`; per-step metrics: `run_expand/metrics.jsonl`, "
              "`run_full/metrics.jsonl`; tool logs: `logs/`.", ""]
    return "\n".join(lines)


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


@entry_point(prog="quickstart")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_llamapro.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="quickstart", help="output directory (default: quickstart)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny",
                        help="tiny (default, < 10 min on 2 CPU cores) or smoke (the test's size, ~2 min)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting of the size, e.g. --set train_iters=200 --set lr=3e-4 "
                             f"(keys: {', '.join(f.name for f in dataclasses.fields(Size))})")
    args = parser.parse_args(argv)
    overrides = {}
    types = {f.name: f.type for f in dataclasses.fields(Size)}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            parser.error(f"--set {item}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        try:
            overrides[key] = float(value) if types[key] in ("float", float) else int(value)
        except ValueError:
            parser.error(f"--set {item}: {value!r} is not a number")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pipe = Pipeline(out, args.size, args.seed, overrides)
    _log(f"size {args.size}, output {out}")
    try:
        pipe.make_data()
        pipe.train_base()
        pipe.convert_expand_preprocess()
        pipe.train("run_expand", "expanded", [])
        pipe.train("run_full", "base_mg", ["--train-all"])
        pipe.export_and_check()
        report = pipe.report(time.time() - start)
    except StepFailed as exc:
        print(f"[quickstart] error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    g = pipe.summary["comparison"]["general"]
    d = pipe.summary["comparison"]["domain"]
    _log(f"general loss: base {_fmt(g['base'])}, expansion {_fmt(g['expand'])}, full FT {_fmt(g['full_ft'])}")
    _log(f"domain loss:  base {_fmt(d['base'])}, expansion {_fmt(d['expand'])}, full FT {_fmt(d['full_ft'])}")
    _log(f"done in {time.time() - start:.0f} s; report: {report}")
    return 0


if __name__ == "__main__":
    run(main)
