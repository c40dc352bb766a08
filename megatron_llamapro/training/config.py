"""Training configuration: Megatron-style flags, an optional YAML file whose keys mirror them.

Precedence: command-line flag > YAML value > default. YAML keys use the flag's name with
underscores or dashes (`micro_batch_size` or `micro-batch-size`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from megatron_llamapro.errors import EXIT_PREEMPTED as PREEMPTION_EXIT_CODE  # noqa: F401 (re-export)
from megatron_llamapro.errors import UserError


class ConfigError(UserError):
    """A bad flag or flag combination; the message is one line naming the flag and the rule."""


@dataclass
class TrainConfig:
    # checkpoints
    load: str | None = None
    save: str | None = None
    save_interval: int | None = None
    save_format: str = "torch_dist"  # torch_dist | torch
    save_trainable_only: bool = False
    keep_last: int | None = None
    no_save_on_exit: bool = False
    exit_duration_in_mins: float | None = None
    exit_interval: int | None = None
    # data
    data_path: list[str] = field(default_factory=list)
    split: str = "98,2,0"
    valid_data: list[str] = field(default_factory=list)
    data_cache_dir: str | None = None
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 1024
    # schedule
    train_iters: int = 15900
    lr: float = 2e-4
    min_lr: float = 2e-5
    lr_decay_style: str = "cosine"
    lr_warmup_fraction: float = 0.06
    lr_warmup_iters: int | None = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # parallelism
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    # precision
    precision: str = "bf16"  # bf16 | fp16 | fp32
    fp8: str | None = None  # hybrid | e4m3
    fp8_recipe: str = "delayed"  # delayed | tensorwise
    # what trains
    trainable_layers: str | None = None
    train_embeddings: bool = False
    train_final_norm: bool = False
    train_all: bool = False
    # evaluation and logging
    eval_interval: int | None = 1000
    eval_iters: int = 10
    log_interval: int = 1
    tensorboard_dir: str | None = None
    metrics_file: str | None = None
    seed: int = 1234
    deterministic: bool = False
    recompute_granularity: str | None = None  # selective | full
    peak_tflops: float | None = None  # per GPU, for MFU; default from the device
    config: str | None = None
    check: bool = False  # validate flags, data and checkpoint against the world size, then exit
    # issue 16 (h10): GPU memory/speed options, each measured on/off by tools/gpu_acceptance.py
    bf16_grad_buffer: bool = False  # DDP gradient buffer and reduction in bf16 (grad_reduce_in_fp32 off)
    use_precision_aware_optimizer: bool = False  # megatron-core's, TE FusedAdam (distributed optimizer)
    adam_states_dtype: str = "fp32"  # fp32 | bf16: Adam moments, with --use-precision-aware-optimizer
    fp8_frozen_storage: bool = False  # frozen layers' weights stored FP8 (TE quantized init), with --fp8
    attention_backend: str = "auto"  # auto | fused | flash | unfused | local (megatron-core AttnBackend)

    # ---- derived -------------------------------------------------------------------------
    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def vpp(self) -> int | None:
        v = self.virtual_pipeline_model_parallel_size
        return v if v and v > 1 else None

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % (self.tp * self.pp):
            raise ConfigError(f"world size {world_size} is not a multiple of "
                              f"--tensor-model-parallel-size x --pipeline-model-parallel-size = {self.tp} x {self.pp}")
        return world_size // (self.tp * self.pp)

    def num_microbatches(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is not divisible by "
                              f"--micro-batch-size x data-parallel size = {self.micro_batch_size} x {dp}")
        return self.global_batch_size // per_step

    def warmup_iters(self) -> int:
        if self.lr_warmup_iters is not None:
            return self.lr_warmup_iters
        return int(round(self.lr_warmup_fraction * self.train_iters))

    def validate(self, world_size: int) -> None:
        """Everything checkable before any work: one line per problem (the first one raised)."""
        for name in ("micro_batch_size", "global_batch_size", "train_iters", "seq_length",
                     "tensor_model_parallel_size", "pipeline_model_parallel_size", "eval_iters",
                     "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        self.num_microbatches(world_size)
        if self.vpp and self.pp < 2:
            raise ConfigError("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size >= 2")
        if self.vpp and self.num_microbatches(world_size) % self.pp:
            raise ConfigError(f"the interleaved schedule needs the number of micro-batches "
                              f"({self.num_microbatches(world_size)}) to be a multiple of PP={self.pp}")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"--precision {self.precision}: must be bf16, fp16 or fp32")
        if self.save_format not in ("torch_dist", "torch"):
            raise ConfigError(f"--save-format {self.save_format}: must be torch_dist or torch")
        if self.save_format == "torch" and self.save_trainable_only:
            raise ConfigError("--save-trainable-only: deltas are saved as torch_dist; drop --save-format torch")
        if self.fp8 not in (None, "hybrid", "e4m3"):
            raise ConfigError(f"--fp8 {self.fp8}: must be hybrid or e4m3")
        if self.fp8_recipe not in ("delayed", "tensorwise"):
            raise ConfigError(f"--fp8-recipe {self.fp8_recipe}: must be delayed or tensorwise")
        if self.adam_states_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"--adam-states-dtype {self.adam_states_dtype}: must be fp32 or bf16")
        if self.adam_states_dtype == "bf16" and not self.use_precision_aware_optimizer:
            raise ConfigError("--adam-states-dtype bf16 needs --use-precision-aware-optimizer")
        if self.use_precision_aware_optimizer and not self.use_distributed_optimizer:
            raise ConfigError("--use-precision-aware-optimizer needs the distributed optimizer")
        if self.fp8_frozen_storage and not self.fp8:
            raise ConfigError("--fp8-frozen-storage needs --fp8")
        if self.attention_backend not in ("auto", "fused", "flash", "unfused", "local"):
            raise ConfigError(f"--attention-backend {self.attention_backend}: must be auto, fused, flash, "
                              "unfused or local")
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} must be between 0 and --lr {self.lr}")
        if not self.data_path:
            raise ConfigError("--data-path is required")
        if not self.load and not self.save:
            raise ConfigError("--load (the expanded checkpoint) or --save with a checkpoint to resume is required")
        if self.save_trainable_only and not self.save:
            raise ConfigError("--save-trainable-only needs --save")
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"--keep-last must be >= 1, got {self.keep_last}")

    def metrics_path(self) -> Path | None:
        if self.metrics_file:
            return Path(self.metrics_file)
        if self.save:
            return Path(self.save) / "metrics.jsonl"
        return None


_FLAG_HELP = {
    "check": "validate the flags, data paths and checkpoint for the launcher's world size (torchrun's or "
             "Slurm's; RANK=0 WORLD_SIZE=N checks for N tasks) without starting torch.distributed, print "
             "the plan and exit 0 (or 2 with the problem)",
    "load": "checkpoint to start from (expanded; legacy, torch_dist or HF); ignored when --save holds one",
    "save": "checkpoint directory; auto-resumes from its latest complete checkpoint",
    "data_path": "blend: [W1] PREFIX1 [W2 PREFIX2 ...]",
    "valid_data": "named validation sets NAME=PREFIX ... (e.g. general=... domain=...)",
    "trainable_layers": "comma list / ranges of global 0-based layers to train (default: the new blocks)",
    "precision": "bf16 (default), fp16 or fp32",
    "fp8": "FP8 through Transformer Engine (GPU only): hybrid or e4m3",
}

_ALIASES = {
    "tensor_model_parallel_size": ["--tp"],
    "pipeline_model_parallel_size": ["--pp"],
    "virtual_pipeline_model_parallel_size": ["--vpp"],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_llamapro.pretrain",
        description="Train the new blocks of a LLaMA Pro expanded checkpoint on megatron-core.",
        argument_default=argparse.SUPPRESS,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag] + _ALIASES.get(f.name, [])
        help_text = _FLAG_HELP.get(f.name)
        if f.type in ("bool",) or f.type is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", help=help_text)
            if f.name == "use_distributed_optimizer":
                parser.add_argument("--no-distributed-optimizer", dest=f.name, action="store_false")
        elif f.name in ("data_path", "valid_data"):
            parser.add_argument(*names, dest=f.name, nargs="+", help=help_text)
        else:
            kind = _scalar_type(f)
            parser.add_argument(*names, dest=f.name, type=kind, help=help_text)
    parser.add_argument("--bf16", dest="precision", action="store_const", const="bf16")
    parser.add_argument("--fp16", dest="precision", action="store_const", const="fp16")
    parser.add_argument("--fp32", dest="precision", action="store_const", const="fp32")
    return parser


def _scalar_type(f: dataclasses.Field):
    text = str(f.type)
    if "float" in text:
        return float
    if "int" in text:
        return int
    return str


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags over YAML over defaults."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    values: dict = {}
    yaml_path = given.get("config")
    if yaml_path:
        values.update(_read_yaml(Path(yaml_path)))
    values.update(given)
    return TrainConfig(**values)


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    aliases = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
               "vpp": "virtual_pipeline_model_parallel_size"}
    values = {}
    for key, value in data.items():
        name = aliases.get(str(key), str(key).replace("-", "_"))
        if name not in known:
            raise ConfigError(f"--config {path}: unknown key {key!r}")
        if name in ("data_path", "valid_data") and isinstance(value, str):
            value = value.split()
        values[name] = value
    return values


def parse_layer_list(text: str, num_layers: int) -> list[int]:
    """'4,9,14' or '4-6,9' -> sorted unique global layer indices, each checked against the model."""
    layers = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                layers.update(range(lo, hi + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise ConfigError(f"--trainable-layers {text!r}: expected numbers like 4,9 or 4-6") from None
    bad = sorted(x for x in layers if not 0 <= x < num_layers)
    if bad:
        raise ConfigError(f"--trainable-layers: layers {bad} out of range for a {num_layers}-layer model")
    return sorted(layers)

