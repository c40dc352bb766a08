"""The quickstart's steps, in order. Each tool step is the installed package's own entry point
(`python -m megatron_llamapro.cli.<tool>`, `python -m megatron_llamapro.pretrain`), run in the
output directory with relative paths, exactly as a user would type it."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from megatron_llamapro.quickstart import base_model, results
from megatron_llamapro.quickstart.report import fmt
from megatron_llamapro.quickstart.runner import StepRunner, log, module_command
from megatron_llamapro.quickstart.sizes import resolve_size
from megatron_llamapro.runtime.distributed import free_port

TRAINER_SEED = 1234
DATASETS = ("base_mix", "domain", "general_valid", "domain_valid")
VALID_DATA = ["general=data/general_valid_text_document", "domain=data/domain_valid_text_document"]


@contextlib.contextmanager
def _replacing(path: Path):
    """A temporary file beside ``path`` (same suffix) that replaces it when the block succeeds."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class Quickstart:
    def __init__(self, out: Path, size_name: str, seed: int = 0, overrides: dict | None = None):
        self.out = out
        self.size = resolve_size(size_name, overrides)
        self.seed = seed
        self.runner = StepRunner(out)
        self.tokenizer_model = out / "tokenizer" / "tokenizer.model"
        self.pretrain_args: dict[str, list[str]] = {}
        self.summary: dict = {"size": size_name, "config": asdict(self.size)}

    # ---- 1. data ---------------------------------------------------------------------------
    def make_data(self) -> None:
        from megatron_llamapro.data.synthetic import (domain_corpus, general_corpus, train_sentencepiece,
                                                      write_jsonl)

        s = self.size
        with self.runner.timed("1 data + tokenizer"):
            data = self.out / "data"
            # megatron's dataset index cache is keyed by paths and sizes, not content: a rerun into the
            # same directory with other settings must not pick up the old indices.
            shutil.rmtree(self.out / "cache", ignore_errors=True)
            general = general_corpus(s.general_docs, seed=self.seed)
            domain = domain_corpus(s.domain_docs, seed=self.seed)
            write_jsonl(base_model.base_mix(general, self.seed, s.base_domain_fraction), data / "base_mix.jsonl")
            write_jsonl(domain, data / "domain.jsonl")
            write_jsonl(general_corpus(s.valid_docs, seed=self.seed + 101), data / "general_valid.jsonl")
            write_jsonl(domain_corpus(s.valid_docs, seed=self.seed + 101), data / "domain_valid.jsonl")
            # Like LLaMA's tokenizer, it covers both kinds of text.
            train_sentencepiece(general + domain[:len(general) // 4], s.vocab, self.tokenizer_model.parent)
            log(f"   {len(general)} general + {len(domain)} domain documents, "
                f"{s.valid_docs} validation documents each, sentencepiece vocab {s.vocab}")

    # ---- 2. tokenized data sets ----------------------------------------------------------
    def preprocess(self, names=DATASETS) -> None:
        tokenizer = self.tokenizer_model.relative_to(self.out)
        for name in names:
            self.runner.run(f"2_preprocess_{name}", module_command(
                "megatron_llamapro.cli.preprocess_data", "--input", f"data/{name}.jsonl", "--json-key", "text",
                "--tokenizer-type", "sentencepiece", "--tokenizer-model", tokenizer,
                "--output-prefix", f"data/{name}", "--append-eod", "--workers", 2, "--overwrite"))

    # ---- 3. base model -------------------------------------------------------------------
    def train_base(self) -> None:
        """Pretrain a randomly initialised LLaMA with the project's trainer, then export it to HF:
        the model that gets expanded is a real, trained model."""
        s = self.size
        with self.runner.timed("3 random-initialised base model (HF)"):
            params = base_model.write_random_init(self.out / "init_hf", s, self.tokenizer_model, self.seed)
        args = ["--load", "init_hf", "--save", "base_run", "--train-all",
                "--data-path", "data/base_mix_text_document", "--valid-data", *VALID_DATA,
                "--tp", 1, "--pp", 1, "--seq-length", s.seq_length,
                "--micro-batch-size", s.base_batch, "--global-batch-size", s.base_batch,
                "--train-iters", s.base_steps, "--lr", s.base_lr, "--min-lr", f"{s.base_lr / 10:g}",
                "--lr-warmup-iters", max(1, s.base_steps // 20), "--fp32",
                "--eval-interval", s.base_steps, "--eval-iters", s.eval_iters,
                "--save-interval", s.base_steps, "--data-cache-dir", "cache", "--seed", TRAINER_SEED]
        run = self._pretrain("3_pretrain_base", "base_run", args)
        self.runner.run("3_convert_megatron_to_hf_base", module_command(
            "megatron_llamapro.cli.convert_megatron_to_hf", "--megatron-dir", "base_run", "--out", "base_hf",
            "--overwrite"))
        losses = [loss for _, loss in run["train"]]
        self.summary["base_model"] = {
            "params": params, "train_tokens": s.base_steps * s.base_batch * s.seq_length,
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]), "first_train_loss": losses[0],
            "final_valid_loss": {k.removeprefix("valid_loss/"): v for k, v in run["final"].items()
                                 if k.startswith("valid_loss/")},
        }
        self.summary["base_train_curve"] = losses[::max(1, len(losses) // 100)]
        log(f"   {params / 1e6:.2f}M parameters, loss {losses[0]:.2f} -> "
            f"{self.summary['base_model']['final_train_loss']:.2f}; exported base_hf/")

    # ---- 4-5. conversion, expansion ------------------------------------------------------
    def convert_and_expand(self) -> None:
        s = self.size
        self.runner.run("4_convert_hf_to_megatron", module_command(
            "megatron_llamapro.cli.convert_hf_to_megatron", "--hf-dir", "base_hf", "--out", "base_mg",
            "--tp", s.tp, "--pp", s.pp, "--overwrite"))
        self.runner.run("5_expand_blocks", module_command(
            "megatron_llamapro.cli.expand_blocks", "--in", "base_mg", "--out", "expanded",
            "--num-new-blocks", s.new_blocks, "--verify", "--overwrite"))
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

    # ---- 6-7. post-pretraining and the full fine-tuning baseline ---------------------------
    def post_pretrain(self, name: str, load: str, extra: list[str]) -> None:
        """The domain recipe (same for both runs) on 2 gloo processes."""
        s = self.size
        args = ["--load", load, "--save", name,
                "--data-path", "data/domain_text_document", "--valid-data", *VALID_DATA,
                "--tp", s.tp, "--pp", s.pp, "--seq-length", s.seq_length,
                "--micro-batch-size", s.micro_batch, "--global-batch-size", s.global_batch,
                "--train-iters", s.train_iters, "--lr", s.lr, "--min-lr", s.min_lr, "--fp32",
                "--eval-interval", s.eval_interval, "--eval-iters", s.eval_iters,
                "--save-interval", s.train_iters, "--data-cache-dir", "cache", "--seed", TRAINER_SEED, *extra]
        step = f"{'6' if name == 'run_expand' else '7'}_{name}"
        self.summary.setdefault("runs", {})[name] = self._pretrain(step, name, args, processes=2)

    def _pretrain(self, step: str, save: str, args: list, processes: int = 1) -> dict:
        """`python -m megatron_llamapro.pretrain ARGS` (through `python -m megatron_llamapro.launch` for
        several processes) into a fresh ``save``; returns its metrics."""
        args = [str(a) for a in args]
        run_dir = self.out / save
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh run, not a resume of an earlier quickstart
        if processes == 1:
            cmd = module_command("megatron_llamapro.pretrain", *args)
        else:
            # the project's launcher: flags and checkpoint checked once, one closing line
            cmd = module_command("megatron_llamapro.launch", "--nproc-per-node", processes,
                                 "--master-port", free_port(), *args)
        self.runner.run(step, cmd, env={"OMP_NUM_THREADS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})
        self.pretrain_args[save] = args
        return results.read_metrics(run_dir / "metrics.jsonl")

    # ---- 8. export + check in transformers ----------------------------------------------
    def export_and_check(self) -> None:
        from megatron_llamapro.quickstart.eval_samples import trainer_eval_samples
        from megatron_llamapro.quickstart.export_check import check_export

        self.runner.run("8_convert_megatron_to_hf", module_command(
            "megatron_llamapro.cli.convert_megatron_to_hf", "--megatron-dir", "run_expand", "--out", "export_hf",
            "--overwrite"))
        with self.runner.timed("8 check the export in transformers"):
            # The trainer evaluates the same samples of each validation set every time: rebuild
            # them and score them in transformers.
            samples = trainer_eval_samples(self.out, self.pretrain_args["run_expand"], str(self.tokenizer_model))
            check = check_export(self.out / "export_hf", self.out / "base_hf", self.tokenizer_model, samples,
                                 self.summary["runs"]["run_expand"])
            self.summary["export_check"] = check
            log(f"   export: {check['layers']} layers; domain loss in transformers {check['hf_domain_loss']:.5f}"
                f" vs trainer {fmt(check['trainer_domain_loss'], 5)}; general {check['hf_general_loss']:.5f}"
                f" vs {fmt(check['trainer_general_loss'], 5)}; base model (iteration 0) max difference "
                f"included: {fmt(check['max_abs_diff'], 6)}")

    # ---- 9. instruction tuning (the paper's second stage) --------------------------------
    def instruction_tune(self) -> None:
        """Chat samples -> preprocess_data --chat -> pretrain --sft from the post-pretrained model
        (every parameter, loss on the answers only, the text sets watched for forgetting) -> HF
        export, asked held-out questions."""
        from megatron_llamapro.data.synthetic import chat_samples, write_records
        from megatron_llamapro.quickstart.instruct import ask

        s = self.size
        with self.runner.timed("9 chat samples"):
            write_records(chat_samples(s.sft_train_samples, seed=self.seed), self.out / "data" / "chat_train.jsonl")
            write_records(chat_samples(s.sft_valid_samples, seed=self.seed + 101), self.out / "data" / "chat_valid.jsonl")
        tokenizer = self.tokenizer_model.relative_to(self.out)
        for name in ("chat_train", "chat_valid"):
            self.runner.run(f"9_preprocess_{name}", module_command(
                "megatron_llamapro.cli.preprocess_data", "--chat", "--input", f"data/{name}.jsonl",
                "--tokenizer-type", "sentencepiece", "--tokenizer-model", tokenizer,
                "--output-prefix", f"data/{name}", "--workers", 2, "--overwrite"))
        args = ["--sft", "--load", "run_expand", "--save", "run_sft",
                "--data-path", "data/chat_train_chat_document",
                "--valid-data", "chat=data/chat_valid_chat_document", *VALID_DATA,
                "--tp", s.tp, "--pp", s.pp, "--seq-length", s.sft_seq_length,
                "--micro-batch-size", s.micro_batch, "--global-batch-size", s.global_batch,
                "--train-iters", s.sft_iters, "--lr", s.sft_lr, "--fp32",
                "--eval-interval", max(1, s.sft_iters // 4), "--eval-iters", s.eval_iters,
                "--save-interval", s.sft_iters, "--data-cache-dir", "cache", "--seed", TRAINER_SEED]
        run = self._pretrain("9_pretrain_sft", "run_sft", args, processes=2)
        self.runner.run("9_convert_megatron_to_hf_sft", module_command(
            "megatron_llamapro.cli.convert_megatron_to_hf", "--megatron-dir", "run_sft", "--out", "instruct_hf",
            "--overwrite"))
        with self.runner.timed("9 ask the instruction-tuned model"):
            answers = ask(self.out / "instruct_hf", self.tokenizer_model, self.seed)
        losses = {name: [run["initial"].get(f"valid_loss/{name}"), run["final"].get(f"valid_loss/{name}")]
                  for name in ("chat", "general", "domain")}
        self.summary["instruct"] = {"valid_loss": losses, "train": run["train"], **answers}
        log(f"   SFT: chat (answer-token) loss {fmt(losses['chat'][0])} -> {fmt(losses['chat'][1])}; general "
            f"{fmt(losses['general'][0])} -> {fmt(losses['general'][1])}; {answers['right']}/{answers['asked']} "
            "held-out sums answered right")

    # ---- 10. report ----------------------------------------------------------------------
    def write_report(self, total_seconds: float) -> Path:
        from megatron_llamapro.quickstart.plot import make_plot
        from megatron_llamapro.quickstart.report import render_report

        self.summary["timings"] = self.runner.timings
        self.summary["total_seconds"] = round(total_seconds, 1)
        self.summary["commands"] = self.runner.commands
        runs = self.summary["runs"]
        comparison = results.compare_runs(runs["run_expand"], runs["run_full"])
        self.summary["comparison"] = comparison
        self.summary["expansion_kept_general_better"] = results.expansion_kept_general_better(comparison)
        with _replacing(self.out / "summary.json") as tmp:
            tmp.write_text(json.dumps(self.summary, indent=2) + "\n")
        with _replacing(self.out / "loss_curves.png") as tmp:
            make_plot(self.summary, tmp)
        with _replacing(self.out / "report.md") as tmp:
            tmp.write_text(render_report(self.summary))
        return self.out / "report.md"
