"""Shared set-up and rank functions for the training and checkpointing tests.

One tiny expanded checkpoint per test session (built once, whichever test module asks first):
a 6-layer random LLaMA (hidden 64, vocab 500, sentencepiece tokenizer trained on the synthetic
corpora) expanded with 2 interleaved identity blocks -> 8 layers, new blocks [3, 7]. (8 layers
rather than 4 + 2 = 6 so that PP=2 x VPP=2 divides the model.) Training runs go through the real
command line (`python -m megatron_llamapro.pretrain`), one process or several started by hand
with torchrun's environment variables; in-process checks run in spawned ranks
(runtime.multiproc.run_distributed) so megatron-core never initializes in the pytest process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Re-exported: the training tests reach them as training_lib's.
from tests.lib import PYTHON, REPO, child_env, last_logged_iteration, losses  # noqa: F401
from tests.lib import run_tool, start_tool

BASE_LAYERS = 6
NEW_LAYERS = [3, 7]
NUM_LAYERS = 8
VOCAB = 500

# Every training run in the tests: tiny steps, fp32, a schedule that does not depend on
# --train-iters (constant LR, no warm-up), so a run cut short matches the first steps of a long one.
COMMON = ["--data-path", "domain_text_document", "--seq-length", "32", "--micro-batch-size", "2",
          "--global-batch-size", "4", "--lr", "1e-3", "--lr-decay-style", "constant",
          "--lr-warmup-iters", "0", "--fp32", "--deterministic", "--eval-interval", "0"]


@dataclass
class Assets:
    root: Path
    hf: Path           # 6-layer HF checkpoint with tokenizer.model
    base: Path         # the HF one converted to legacy Megatron (no expansion manifest)
    expanded: Path     # legacy Megatron TP=1 PP=1, 8 layers, manifest trainable [3, 7]
    domain: str        # IndexedDataset prefixes
    general: str


_ASSETS: Assets | None = None


def build_assets(root: Path) -> Assets:
    """Build (once per process) the tiny expanded checkpoint and the tokenized corpora."""
    global _ASSETS
    if _ASSETS is not None:
        return _ASSETS
    from megatron_llamapro.data.synthetic import domain_corpus, general_corpus, train_sentencepiece, write_jsonl
    from tests.fixtures import make_tiny_hf

    if (root / "READY").is_file():  # LLAMAPRO_TRAIN_TEST_DIR reused between sessions
        _ASSETS = _assets_at(root)
        return _ASSETS
    root.mkdir(parents=True, exist_ok=True)
    general, domain = general_corpus(400), domain_corpus(400)
    tok = Path(train_sentencepiece(general + domain, VOCAB, root / "tok"))
    if tok.is_dir():
        tok = tok / "tokenizer.model"
    write_jsonl(general, root / "general.jsonl")
    write_jsonl(domain, root / "domain.jsonl")
    make_tiny_hf(root / "hf", num_layers=BASE_LAYERS, vocab=VOCAB, tokenizer_model=tok)
    procs = [start_tool("preprocess_data", "--input", f"{name}.jsonl", "--json-key", "text",
                        "--tokenizer-type", "sentencepiece", "--tokenizer-model", "hf/tokenizer.model",
                        "--output-prefix", name, "--append-eod", "--workers", "1", cwd=root, env=child_env(),
                        stdout=subprocess.DEVNULL)
             for name in ("domain", "general")]
    run_tool("convert_hf_to_megatron", "--hf-dir", "hf", "--out", "base", "--tp", "1", "--pp", "1",
             cwd=root, env=child_env(), timeout=120, check=True)
    run_tool("expand_blocks", "--in", "base", "--out", "expanded", "--num-new-blocks", "2",
             cwd=root, env=child_env(), timeout=120, check=True)
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    manifest = json.loads((root / "expanded" / "llamapro.json").read_text())
    assert manifest["arch"]["num_layers"] == NUM_LAYERS
    assert manifest["expansions"][-1]["new_layers"] == NEW_LAYERS
    _ASSETS = _assets_at(root)
    (root / "READY").write_text("ok\n")
    return _ASSETS


def _assets_at(root: Path) -> Assets:
    return Assets(root, root / "hf", root / "base", root / "expanded",
                  str(root / "domain_text_document"), str(root / "general_text_document"))


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    tmp = Path(os.environ.get("LLAMAPRO_TRAIN_TEST_DIR", "")) if os.environ.get("LLAMAPRO_TRAIN_TEST_DIR") \
        else tmp_path_factory.getbasetemp() / "training_assets"
    return build_assets(tmp)


# ---- launching training -------------------------------------------------------------------------

def train_args(assets: Assets, save: Path | None, iters: int, *extra: str, load: Path | None = None) -> list[str]:
    args = ["--load", str(load or assets.expanded), "--train-iters", str(iters),
            "--data-cache-dir", str(assets.root / "cache")]
    args += [a if a != "domain_text_document" else assets.domain for a in COMMON]
    if save is not None:
        args += ["--save", str(save)]
    return args + list(extra)


@dataclass
class RunResult:
    codes: list[int]
    out: list[str]
    err: list[str]

    @property
    def code(self) -> int:
        return self.codes[0]


class Launch:
    """N trainer processes started by hand with torchrun's variables (each in its own session so a
    whole rank, helpers included, can be killed by process group)."""

    def __init__(self, args: list[str], nproc: int = 1, logdir: Path | None = None):
        from megatron_llamapro.runtime.multiproc import free_port

        port = free_port()
        self.procs = []
        self.logs = []
        logdir = Path(logdir or os.environ.get("TMPDIR", "/tmp"))
        logdir.mkdir(parents=True, exist_ok=True)
        stamp = f"{os.getpid()}_{time.monotonic_ns()}"
        for rank in range(nproc):
            extra = {"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                     "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} \
                if nproc > 1 else {}
            out = open(logdir / f"train_{stamp}_r{rank}.out", "w+")
            err = open(logdir / f"train_{stamp}_r{rank}.err", "w+")
            self.logs.append((out, err))
            self.procs.append(start_tool("megatron_llamapro.pretrain", *args, env=child_env(extra),
                                         stdout=out, stderr=err, start_new_session=True))

    def kill(self, rank: int | None = None, sig: int = signal.SIGKILL) -> None:
        for r, proc in enumerate(self.procs):
            if (rank is None or r == rank) and proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

    def wait(self, timeout: float) -> RunResult:
        deadline = time.monotonic() + timeout
        try:
            for proc in self.procs:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            for proc in self.procs:
                proc.wait(timeout=30)
            raise AssertionError(f"training did not finish in {timeout:.0f}s:\n{self.text()}") from None
        return self.result()

    def result(self) -> RunResult:
        outs, errs = [], []
        for out, err in self.logs:
            out.seek(0)
            err.seek(0)
            outs.append(out.read())
            errs.append(err.read())
        return RunResult([p.returncode for p in self.procs], outs, errs)

    def text(self) -> str:
        res = self.result()
        return "\n".join(f"--- rank {r} stdout\n{o[-2000:]}\n--- rank {r} stderr\n{e[-3000:]}"
                         for r, (o, e) in enumerate(zip(res.out, res.err)))


def train(args: list[str], nproc: int = 1, timeout: float = 180, expect: int | None = 0) -> RunResult:
    launch = Launch(args, nproc)
    result = launch.wait(timeout)
    if expect is not None:
        assert result.codes == [expect] * nproc, launch.text()
    return result


def wait_for(predicate, timeout: float, what: str, launch: Launch | None = None, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if launch is not None and any(p.poll() is not None for p in launch.procs):
            raise AssertionError(f"training ended before {what}:\n{launch.text()}")
        time.sleep(poll)
    if launch is not None:
        launch.kill()
    raise AssertionError(f"timed out waiting for {what}")


# ---- rank functions (run in spawned processes) ----------------------------------------------------

def canonical_tensors(path: str) -> dict:
    """Every canonical tensor of a checkpoint (any format), as CPU tensors."""
    from megatron_llamapro.checkpoint.open import open_checkpoint

    with open_checkpoint(Path(path)) as source:
        return {name: source.full(source.resolve(name)).clone() for name in source.names()}


def compare_checkpoints(a: str, b: str) -> dict[str, float]:
    """name -> max |a - b| over the canonical tensors of two checkpoints (vocab rows as stored
    may be padded differently: compared over the unpadded vocabulary)."""
    ta, tb = canonical_tensors(a), canonical_tensors(b)
    assert set(ta) == set(tb), (sorted(set(ta) ^ set(tb)))
    out = {}
    for name, x in ta.items():
        y = tb[name]
        if x.shape != y.shape:
            rows = min(x.shape[0], y.shape[0])
            x, y = x[:rows], y[:rows]
        out[name] = float((x.double() - y.double()).abs().max()) if not torch_equal(x, y) else 0.0
    return out


def torch_equal(x, y) -> bool:
    import torch

    return x.dtype == y.dtype and x.shape == y.shape and bool(torch.equal(x, y))


def trainer_probe(argv: list[str]) -> dict:
    """Build the trainer as the CLI does, then: count optimizer state vs trainable parameters, and
    run one train step with hooks on every transformer layer recording which ones backward
    reached."""
    import torch

    from megatron_llamapro.model import transformer_layers
    from megatron_llamapro.training.config import load_config
    from megatron_llamapro.training.trainer import Trainer

    trainer = Trainer(load_config(argv))
    trainer.setup()
    chunks = [m.module if hasattr(m, "module") else m for m in trainer.model]
    trainable_numel = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    frozen_numel = sum(p.numel() for c in chunks for p in c.parameters() if not p.requires_grad)
    grad_buffer_numel = sum(buf.numel_unpadded if hasattr(buf, "numel_unpadded") else 0
                            for m in trainer.model for buf in getattr(m, "buffers", []))

    seen_forward: set[int] = set()
    output_requires_grad: dict[int, bool] = {}
    backward_reached: set[int] = set()
    handles = []

    def make_hook(index):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            seen_forward.add(index)
            output_requires_grad[index] = bool(hidden.requires_grad)
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: backward_reached.add(index))
        return hook

    for chunk in chunks:
        for index, layer in transformer_layers(chunk):
            handles.append(layer.register_forward_hook(make_hook(index)))
    before = {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}
    loss, grad_norm, ok = trainer.train_step()
    for h in handles:
        h.remove()
    changed = {n for c in chunks for n, p in c.named_parameters() if not torch.equal(p.detach(), before[n])}
    frozen_changed = [n for c in chunks for n, p in c.named_parameters() if not p.requires_grad and n in changed]
    trainable_unchanged = [n for c in chunks for n, p in c.named_parameters() if p.requires_grad and n not in changed]

    state_numel = {"exp_avg": 0, "exp_avg_sq": 0}
    state_params = 0
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        inner = opt.optimizer
        for st in inner.state.values():
            state_params += 1
            for key in state_numel:
                if key in st:
                    state_numel[key] += st[key].numel()
    return {"trainable_numel": trainable_numel, "frozen_numel": frozen_numel,
            "grad_buffer_numel": grad_buffer_numel, "state_numel": state_numel,
            "state_params": state_params, "loss": loss, "ok": ok,
            "seen_forward": sorted(seen_forward), "output_requires_grad": output_requires_grad,
            "backward_reached": sorted(backward_reached), "plan": sorted(trainer.plan.trainable.layers),
            "frozen_changed": frozen_changed, "trainable_unchanged": trainable_unchanged}


# ---- the uninterrupted reference run --------------------------------------------------------------

REF_ITERS = 40
_REFERENCE: Path | None = None


def reference_run(assets: Assets) -> Path:
    """40 steps, one process, a checkpoint every 10 (built once per test session)."""
    global _REFERENCE
    if _REFERENCE is None:
        save = assets.root / "reference"
        if (save / "REF_DONE").is_file():  # LLAMAPRO_TRAIN_TEST_DIR reused between sessions
            _REFERENCE = save
            return save
        if save.exists():
            import shutil

            shutil.rmtree(save)
        train(train_args(assets, save, REF_ITERS, "--save-interval", "10"), timeout=300)
        (save / "REF_DONE").write_text("ok\n")
        _REFERENCE = save
    return _REFERENCE


@pytest.fixture(scope="session")
def reference(assets) -> Path:
    return reference_run(assets)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run_main_captured(argvs: dict[str, list[str]]) -> dict[str, tuple[int, str, str]]:
    """name -> (exit code, stdout, stderr) of megatron_llamapro.pretrain.main(argv), in this process."""
    import contextlib
    import io

    from megatron_llamapro.pretrain import main

    out = {}
    for name, argv in argvs.items():
        so, se = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code
        out[name] = (code, so.getvalue(), se.getvalue())
    return out
