"""Training configuration: Megatron-style flags, an optional YAML file whose keys mirror them.

Precedence: command-line flag > YAML value > default. YAML keys use the flag's name with
underscores or dashes (`micro_batch_size` or `micro-batch-size`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
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
    allow_long_sequences: bool = False  # --seq-length beyond what the checkpoint's RoPE was trained for
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
    # h8b (runs an operator can trust): preemption grace
    preempt_grace_secs: float | None = None  # SIGTERM -> SIGKILL; default: Slurm's KillWait in a job, else none
    log_all_ranks: bool = False  # every rank prints its own start line (default: one summary from rank 0)
    # issue 14 part 3 (h9): Megatron-LM launch flags (see MEGATRON_* tables below)
    lr_decay_iters: int | None = None  # the schedule's length; default --train-iters
    tokenizer_type: str | None = None  # Megatron-LM's name, checked against the tokenizer used
    tokenizer_model: str | None = None  # for a checkpoint that carries no tokenizer
    transformer_impl: str | None = None  # transformer_engine | local; default: from the machine
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False  # needs the distributed optimizer
    finetune: bool = False  # --load is read as weights only, from iteration 0 (always so here)
    no_load_optim: bool = False  # --load never carries optimizer state here (accepted)
    no_masked_softmax_fusion: bool = False
    model_shape: dict = field(default_factory=dict)  # Megatron-LM model-shape flags, checked against the checkpoint
    # issue 16 (h10): GPU memory/speed options, each measured on/off by tools/gpu_acceptance.py
    bf16_grad_buffer: bool = False  # DDP gradient buffer and reduction in bf16 (grad_reduce_in_fp32 off)
    use_precision_aware_optimizer: bool = False  # megatron-core's, TE FusedAdam (distributed optimizer)
    adam_states_dtype: str = "fp32"  # fp32 | bf16: Adam moments, with --use-precision-aware-optimizer
    fp8_frozen_storage: bool = False  # frozen layers' weights stored FP8 (TE quantized init), with --fp8
    attention_backend: str = "auto"  # auto | fused | flash | unfused | local (megatron-core AttnBackend)
    # instruction tuning (the paper's second stage): chat sets from preprocess_data.py --chat
    sft: bool = False
    sft_packing: str = "pack"  # pack | pad (data/sft.py)
    sft_overlong: str = "truncate"  # truncate | skip | error
    train_new_blocks: bool = False  # with --sft: only the expansion's new blocks train (the pretraining default)

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

    def decay_iters(self) -> int:
        """The LR schedule's length: --lr-decay-iters, else --train-iters."""
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.train_iters

    def warmup_iters(self) -> int:
        if self.lr_warmup_iters is not None:
            return self.lr_warmup_iters
        return int(round(self.lr_warmup_fraction * self.decay_iters()))

    def use_te(self) -> bool | None:
        """--transformer-impl as ModelOptions.use_te (None: decided by the machine)."""
        return None if self.transformer_impl is None else self.transformer_impl == "transformer_engine"

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
            raise ConfigError(f"--save-format/--ckpt-format {self.save_format}: must be torch_dist or torch")
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
        if self.lr < 0:
            raise ConfigError(f"--lr {self.lr}: must be >= 0")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} must be between 0 and --lr {self.lr}")
        if not self.data_path:
            raise ConfigError("--data-path is required")
        if not self.load and not self.save:
            raise ConfigError("--load (the expanded checkpoint) or --save with a checkpoint to resume is required")
        if self.save_trainable_only and not self.save:
            raise ConfigError("--save-trainable-only needs --save")
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"--keep-last must be >= 1, got {self.keep_last}")
        self._validate_megatron_flags()

    def _validate_megatron_flags(self) -> None:
        if self.lr_decay_iters is not None:
            if self.lr_decay_iters < 1:
                raise ConfigError(f"--lr-decay-iters must be >= 1, got {self.lr_decay_iters}")
            if self.warmup_iters() >= self.lr_decay_iters:
                raise ConfigError(f"--lr-warmup-iters {self.warmup_iters()} must be below "
                                  f"--lr-decay-iters {self.lr_decay_iters}")
        if self.transformer_impl not in (None, "transformer_engine", "local"):
            raise ConfigError(f"--transformer-impl {self.transformer_impl}: must be transformer_engine or local")
        if self.tokenizer_type is not None and self.tokenizer_type not in MEGATRON_TOKENIZER_TYPES:
            raise ConfigError(f"--tokenizer-type {self.tokenizer_type}: not supported by megatron-llamapro "
                              f"(one of {', '.join(MEGATRON_TOKENIZER_TYPES)}; the tokenizer files decide the rest)")
        if self.sft_packing not in ("pack", "pad"):
            raise ConfigError(f"--sft-packing {self.sft_packing}: must be pack or pad")
        if self.sft_overlong not in ("truncate", "skip", "error"):
            raise ConfigError(f"--sft-overlong {self.sft_overlong}: must be truncate, skip or error")
        # (--sft's default --train-all is never applied beside the other two: load_config skips it)
        chosen = [flag for flag, on in (("--train-all", self.train_all),
                                        ("--trainable-layers", bool(self.trainable_layers)),
                                        ("--train-new-blocks", self.train_new_blocks)) if on]
        if len(chosen) > 1:
            raise ConfigError(f"{chosen[0]} and {chosen[1]}: choose one way to say what trains")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("--overlap-param-gather needs the distributed optimizer "
                              "(drop --no-distributed-optimizer)")

    def metrics_path(self) -> Path | None:
        if self.metrics_file:
            return Path(self.metrics_file)
        if self.save:
            return Path(self.save) / "metrics.jsonl"
        return None


_FLAG_HELP = {
    "log_all_ranks": "every rank prints its own 'started' line (default: one line from rank 0 naming every "
                     "host and its ranks)",
    "check": "validate the flags, data paths and checkpoint for the launcher's world size (torchrun's or "
             "Slurm's; RANK=0 WORLD_SIZE=N checks for N tasks) without starting torch.distributed, print "
             "the plan and exit 0 (or 2 with the problem)",
    "load": "checkpoint to start from (expanded; legacy, torch_dist or HF); ignored when --save holds one",
    "save": "checkpoint directory; auto-resumes from its latest complete checkpoint",
    "data_path": "blend: [W1] PREFIX1 [W2 PREFIX2 ...]",
    "valid_data": "named validation sets NAME=PREFIX ... (e.g. general=... domain=...)",
    "allow_long_sequences": "train with --seq-length beyond the checkpoint's max_position_embeddings (and "
                            "beyond what its llama3 rope_scaling covers), with a warning instead of the refusal",
    "trainable_layers": "comma list / ranges of global 0-based layers to train (default: the new blocks)",
    "precision": "bf16 (default), fp16 or fp32",
    "preempt_grace_secs": "seconds between SIGTERM and SIGKILL (default: Slurm's KillWait in a Slurm job, "
                          "no limit elsewhere; 0: no limit): on SIGTERM a checkpoint is saved only if the last "
                          "save's duration fits in what is left, else the run exits at once (75) and resumes from "
                          "the last periodic checkpoint",
    "fp8": "FP8 through Transformer Engine (GPU only): hybrid or e4m3",
    "sft": "instruction tuning on chat sets (tools/preprocess_data.py --chat): loss on assistant tokens only, "
           "samples packed per sequence; defaults become the paper's SFT recipe (all parameters, lr 2e-5 cosine "
           "to 0, 3%% warm-up, global batch 128, seq 4096, weight decay 0)",
    "sft_packing": "with --sft: pack (several samples per sequence, attention and positions reset at each "
                   "sample) or pad (one sample per sequence)",
    "sft_overlong": "with --sft: a sample longer than --seq-length + 1 tokens is truncated (default), skipped, "
                    "or an error",
    "train_new_blocks": "with --sft: train only the expansion's new blocks instead of every parameter",
}

# --sft's defaults (the paper's instruction-tuning recipe), for flags not given on the command line or in YAML.
SFT_DEFAULTS = {
    "lr": 2e-5, "min_lr": 0.0, "lr_decay_style": "cosine", "lr_warmup_fraction": 0.03,
    "global_batch_size": 128, "seq_length": 4096, "weight_decay": 0.0, "train_all": True,
}

_ALIASES = {
    "tensor_model_parallel_size": ["--tp"],
    "pipeline_model_parallel_size": ["--pp"],
    "virtual_pipeline_model_parallel_size": ["--vpp"],
    # Megatron-LM's spellings of our flags
    "save_format": ["--ckpt-format"],
    "fp8": ["--fp8-format"],
    "data_cache_dir": ["--data-cache-path"],
    "bf16_grad_buffer": ["--grad-reduce-in-bf16"],
}

# ---- Megatron-LM launch flags (issue 14 part 3) ----------------------------------------------
# A launch script written for Megatron-LM's pretrain_gpt.py (docs/llama_mistral.md, examples/llama)
# runs here: its spellings of our flags are aliases above; the flags below are, in turn, how this
# trainer always runs, model-shape flags checked against the checkpoint, or refused by name.

MEGATRON_TOKENIZER_TYPES = {  # --tokenizer-type -> the tokenizer files it needs
    "Llama2Tokenizer": "sentencepiece", "SentencePieceTokenizer": "sentencepiece",
    "GPTSentencePieceTokenizer": "sentencepiece", "HuggingFaceTokenizer": "hf",
    "sentencepiece": "sentencepiece", "hf": "hf",
}

# Flags that ask for what this trainer always does (a value, if any, must be the one it uses).
MEGATRON_ALREADY_SO = {
    "--use-checkpoint-args": (None, "the model is always built from the checkpoint"),
    "--exit-on-missing-checkpoint": (None, "a missing --load is always an error"),
    "--no-load-rng": (None, "--load is read as weights only"),
    "--use-mcore-models": (None, "megatron-core models only"),
    "--use-rotary-position-embeddings": (None, "LLaMA models use RoPE"),
    "--no-position-embedding": (None, "LLaMA models have no learned position embedding"),
    "--disable-bias-linear": (None, "LLaMA linear layers have no bias (a QKV bias comes from the checkpoint)"),
    "--swiglu": (None, "LLaMA MLPs are SwiGLU"),
    "--attention-softmax-in-fp32": (None, "the softmax always runs in fp32"),
    "--log-throughput": (None, "throughput and MFU are always logged"),
    "--no-gradient-accumulation-fusion": (None, "gradient-accumulation fusion is never used"),
    "--no-async-tensor-model-parallel-allreduce": (None, "megatron-core 0.16 decides this itself"),
    "--optimizer": ("adam", "the optimizer is Adam(W)"),
    "--attention-dropout": ("0.0", "training runs without dropout"),
    "--hidden-dropout": ("0.0", "training runs without dropout"),
    "--rotary-percent": ("1.0", "RoPE covers the whole head"),
    "--normalization": ("RMSNorm", "LLaMA models use RMSNorm"),
    "--position-embedding-type": ("rope", "LLaMA models use RoPE"),
    "--recompute-method": ("uniform", "--recompute-granularity full recomputes uniformly, one layer at a time"),
    "--recompute-num-layers": ("1", "--recompute-granularity full recomputes one layer at a time"),
    "--distributed-backend": ("nccl", "NCCL on GPUs (gloo on CPU)"),
}

# Model-shape flags: dest -> (value type, "store_true" for flags without a value).
MEGATRON_SHAPE_FLAGS = {
    "num_layers": int, "hidden_size": int, "ffn_hidden_size": int, "num_attention_heads": int,
    "group_query_attention": "store_true", "num_query_groups": int, "kv_channels": int,
    "max_position_embeddings": int, "untie_embeddings_and_output_weights": "store_true",
    "rotary_base": float, "norm_epsilon": float, "make_vocab_size_divisible_by": int, "vocab_size": int,
    "use_rope_scaling": "store_true", "rope_scaling_factor": float, "add_qkv_bias": "store_true",
    "qk_layernorm": "store_true", "apply_layernorm_1p": "store_true",
}

# Flags with no meaning here: refused by name, with the reason.
MEGATRON_REFUSED = {
    "--use-flash-attn": "flash-attn is not installed; Transformer Engine's fused attention is used on GPUs",
    "--use-legacy-models": "megatron-core models only",
    "--init-method-std": "every weight comes from the checkpoint; new blocks are identity copies",
    "--mock-data": "training needs --data-path",
    "--train-samples": "the schedule counts iterations: use --train-iters",
    "--lr-decay-samples": "the schedule counts iterations: use --lr-decay-iters",
    "--lr-warmup-samples": "the schedule counts iterations: use --lr-warmup-iters",
    "--decoupled-lr": "one learning rate for every trainable parameter",
    "--decoupled-min-lr": "one learning rate for every trainable parameter",
    "--context-parallel-size": "context parallelism is not implemented",
    "--expert-model-parallel-size": "LLaMA models have no experts",
    "--fp8-amax-history-len": "FP8 scaling is chosen with --fp8-recipe",
    "--fp8-amax-compute-algo": "FP8 scaling is chosen with --fp8-recipe",
    "--fp8-param-gather": "weights are kept in --precision",
    "--initial-loss-scale": "fp16 loss scaling is dynamic with megatron-core's defaults",
    "--calculate-per-token-loss": "the loss is the mean over a micro-batch's tokens (with --sft: over the global "
                                  "batch's answer tokens, always)",
    "--cross-entropy-loss-fusion": "the cross entropy is not fused",
    "--no-save-optim": "a checkpoint without optimizer state could not resume",
    "--no-save-rng": "a checkpoint without RNG state could not resume exactly",
    "--dataloader-type": "the data order is fixed by --seed and the consumed samples",
    "--tiktoken-pattern": "tokenizers are sentencepiece or Hugging Face files",
    "--legacy-tokenizer": "tokenizers are sentencepiece or Hugging Face files",
    "--no-create-attention-mask-in-dataloader": "no attention mask is built (causal attention)",
    "--no-mmap-bin-files": "IndexedDataset files are always memory-mapped",
    "--num-workers": "data is read in the training process",
    "--manual-gc": "Python's garbage collector runs as usual",
    "--empty-unused-memory-level": "the CUDA cache is left to PyTorch",
    "--profile": "no built-in profiler",
    "--profile-step-start": "no built-in profiler",
    "--profile-step-end": "no built-in profiler",
    "--timing-log-level": "per-step time is logged with the metrics",
    "--log-timers-to-tensorboard": "per-step time is logged with the metrics",
    "--log-validation-ppl-to-tensorboard": "validation loss and perplexity are always logged",
    "--tensorboard-queue-size": "TensorBoard is written through --tensorboard-dir with its defaults",
    "--distributed-timeout-minutes": "the process group uses torch's default timeout",
}


class _Refuse(argparse.Action):
    """A Megatron-LM flag with no meaning here: one line naming it."""

    def __call__(self, parser, namespace, values, option_string=None):
        raise ConfigError(f"{option_string}: not supported by megatron-llamapro ({self.help})")


class _AlreadySo(argparse.Action):
    """A Megatron-LM flag asking for what this trainer always does; another value is refused."""

    def __init__(self, *args, expected: str | None = None, **kwargs):
        self.expected = expected
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.expected is None or values == self.expected:
            return
        try:
            if float(values) == float(self.expected):
                return
        except ValueError:
            pass
        raise ConfigError(f"{option_string} {values}: not supported by megatron-llamapro "
                          f"(only {self.expected}: {self.help})")


class _Shape(argparse.Action):
    """A model-shape flag: collected into `model_shape`, checked against the checkpoint by the run plan."""

    def __call__(self, parser, namespace, values, option_string=None):
        shape = dict(getattr(namespace, "model_shape", {}))
        shape[self.dest] = True if self.nargs == 0 else values
        namespace.model_shape = shape


def _add_megatron_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recompute-activations", dest="recompute_granularity", action="store_const",
                        const="selective", help="Megatron-LM's name for --recompute-granularity selective")
    parser.add_argument("--fp8-hybrid", dest="fp8", action="store_const", const="hybrid",
                        help="Megatron-LM's older name for --fp8-format hybrid")
    for flag, (expected, why) in MEGATRON_ALREADY_SO.items():
        parser.add_argument(flag, action=_AlreadySo, expected=expected, nargs=0 if expected is None else None,
                            dest="megatron_already_so", help=why)
    for name, kind in MEGATRON_SHAPE_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if kind == "store_true":
            parser.add_argument(flag, dest=name, action=_Shape, nargs=0, help="checked against the checkpoint")
        else:
            parser.add_argument(flag, dest=name, action=_Shape, type=kind, help="checked against the checkpoint")
    for flag, why in MEGATRON_REFUSED.items():
        parser.add_argument(flag, action=_Refuse, nargs="*", dest="megatron_refused", help=why)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_llamapro.pretrain",
        description="Train the new blocks of a LLaMA Pro expanded checkpoint on megatron-core.",
        argument_default=argparse.SUPPRESS,
    )
    # argparse takes '-1e-3' for a flag (its matcher knows only -1 and -.5): read it as a number
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag] + _ALIASES.get(f.name, [])
        help_text = _FLAG_HELP.get(f.name)
        if f.name == "model_shape":
            continue
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
    _add_megatron_flags(parser)
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
    shape = {**values.pop("model_shape", {}), **given.pop("model_shape", {})}
    values.update(given)
    if values.get("sft"):
        picks_layers = values.get("trainable_layers") or values.get("train_new_blocks")
        for name, value in SFT_DEFAULTS.items():
            if name in values or (name == "train_all" and picks_layers):
                continue
            if name == "lr_warmup_fraction" and "lr_warmup_iters" in values:
                continue
            values[name] = value
    return TrainConfig(**values, model_shape=shape)


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
        if name in MEGATRON_SHAPE_FLAGS:
            values.setdefault("model_shape", {})[name] = value
            continue
        if name not in known or name == "model_shape":
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

