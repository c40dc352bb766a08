"""The run plan: flags, data paths and checkpoint checked once, before torch.distributed starts.

`resolve_run_plan` is the one place a training run is validated: `--check` (at submit time, with
the world size the launcher's environment announces) and `Trainer.setup` (which then adds only what
needs the process group) both call it, so a bad configuration fails the same way in both, in a
second, with one line. The checkpoint to start from is opened here once and kept open in the plan
for the trainer to load its weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron_llamapro.checkpoint.manifest import (
    MANIFEST_NAME,
    Manifest,
    detect_tokenizer_type,
    resolve_tokenizer,
    tokenizer_dir,
)
from megatron_llamapro.checkpoint.open import open_checkpoint
from megatron_llamapro.checkpoint.source import CheckpointError, TensorSource
from megatron_llamapro.checkpoint.tracker import iteration_name
from megatron_llamapro.fsutil import check_writable_dir
from megatron_llamapro.model import ModelOptions, TrainablePlan
from megatron_llamapro.training.config import (
    MEGATRON_TOKENIZER_TYPES,
    ConfigError,
    TrainConfig,
    parse_layer_list,
)
from megatron_llamapro.training.iteration_dirs import (
    damaged_checkpoint,
    find_resume_iteration,
    holds_checkpoints,
    read_state_record,
)


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    data_parallel_size: int
    num_microbatches: int  # per step per data-parallel rank
    manifest: Manifest
    trainable: TrainablePlan
    padded_vocab_size: int
    tokenizer_dir: Path
    resume_iteration: int | None  # the --save checkpoint to resume, or None to start from --load
    resume_trainable_only: bool  # that checkpoint is a trainable-only delta (base weights from --load)
    load_source: TensorSource | None  # --load, opened: the weights to start from, or a resumed delta's base

    def summary(self, config: TrainConfig) -> str:
        """`--check`'s one line."""
        if self.resume_iteration is not None:
            start = f"resumes iteration {self.resume_iteration} of --save {config.save}"
            if self.resume_trainable_only:
                start += f" (trainable-only, on --load {config.load})"
        else:
            start = f"starts from --load {config.load} ({self.load_source.manifest.format})"
        return (f"check: ok: world size {self.world_size} = TP {config.tp} x PP {config.pp} x DP "
                f"{self.data_parallel_size}; {self.num_microbatches} micro-batch(es) of "
                f"{config.micro_batch_size} per step per DP rank; global batch {config.global_batch_size}; "
                f"{start}; trains {self.trainable.describe()}")

    def close(self) -> None:
        if self.load_source is not None:
            self.load_source.close()


def resolve_run_plan(config: TrainConfig, world_size: int, log: Callable[[str], None] = print) -> RunPlan:
    """Every check that needs no process group and no GPU (FP8's is the job's: check_fp8), in the
    order a user meets them: inputs exist, the checkpoint to resume or start from, the model
    against the parallel layout, then the flags against the world size. `log` gets the warnings
    about damaged checkpoints skipped under --save."""
    check_inputs_exist(config)
    resume, trainable_only = _resume_iteration(config, log)
    load_source = None
    try:
        manifest = tokenizer = None
        if resume is not None:
            manifest = Manifest.read(Path(config.save))
            if manifest is None:
                raise CheckpointError(f"{Path(config.save) / MANIFEST_NAME}: missing (cannot rebuild the model to resume)")
            tokenizer = tokenizer_dir(Path(config.save))
            if trainable_only:
                load_source = _open_load(config)
                if load_source.manifest.arch != manifest.arch:
                    raise CheckpointError(f"--load {config.load}: a different model from the one {config.save} "
                                          "was trained on (a trainable-only checkpoint resumes on its base)")
        elif config.load:
            load_source = _open_load(config)
            manifest, tokenizer = load_source.manifest, load_source.tokenizer_dir()
        if tokenizer is None and resume is None and config.tokenizer_model:
            tokenizer = resolve_tokenizer(Path(config.tokenizer_model))
        elif tokenizer is not None and config.tokenizer_model \
                and Path(tokenizer).resolve() != resolve_tokenizer(Path(config.tokenizer_model)):
            log(f"note: --tokenizer-model {config.tokenizer_model} not used: the checkpoint carries its own "
                f"tokenizer ({tokenizer})")
        if tokenizer is not None:
            check_tokenizer_type(config, tokenizer)
        if manifest is not None:
            check_model_shape(config, manifest)
            check_model_fits(config, manifest, log)
            trainable = trainable_plan(config, manifest, config.load or config.save)
            check_every_stage_trains(trainable, manifest.arch.num_layers, config)
            if resume is None and load_source is not None and not trainable.all:
                warn_rounded_frozen_weights(config, load_source, log)
        config.validate(world_size)
        if manifest is None:
            raise ConfigError(f"--save {config.save} holds no checkpoint to resume and no --load was given")
        if tokenizer is None:
            flag = f"--save {config.save}" if resume is not None else f"--load {config.load}"
            raise ConfigError(f"{flag}: the checkpoint carries no tokenizer files")
        return RunPlan(
            world_size=world_size, data_parallel_size=config.data_parallel_size(world_size),
            num_microbatches=config.num_microbatches(world_size), manifest=manifest, trainable=trainable,
            padded_vocab_size=manifest.arch.padded_vocab_size(config.tp, manifest.make_vocab_size_divisible_by),
            tokenizer_dir=tokenizer, resume_iteration=resume, resume_trainable_only=trainable_only,
            load_source=load_source)
    except BaseException:
        if load_source is not None:
            load_source.close()
        raise


def check_only(config: TrainConfig) -> str:
    """`--check`: the run plan for the launcher's world size (torchrun's, Slurm's or MPI's
    variables; RANK=0 WORLD_SIZE=N checks for N tasks), without torch.distributed; its one line."""
    from megatron_llamapro.runtime.distributed import detect_launch_env

    plan = resolve_run_plan(config, detect_launch_env().world_size)
    try:
        return plan.summary(config)
    finally:
        plan.close()


def _resume_iteration(config: TrainConfig, log: Callable[[str], None]) -> tuple[int | None, bool]:
    """(newest complete checkpoint under --save or None, whether it is a trainable-only delta);
    never silently starts over (and later overwrites) in a directory with damaged checkpoints."""
    if not config.save:
        return None, False
    save = Path(config.save)
    warnings_seen: list[str] = []

    def warn(message: str) -> None:
        warnings_seen.append(message)
        log(message)

    resume = find_resume_iteration(save, log=warn)
    if resume is None:
        if holds_checkpoints(save):
            reason = warnings_seen[-1].removeprefix("warning: ") if warnings_seen else "none is complete"
            raise CheckpointError(f"--save {save}: no complete checkpoint to resume from ({reason})")
        return None, False
    trainable_only = bool(read_state_record(save, resume).get("trainable_only"))
    if trainable_only and not config.load:
        raise ConfigError(f"--save {save}: {iteration_name(resume)} is a trainable-only checkpoint; "
                          "it needs --load (its base checkpoint)")
    return resume, trainable_only


def _open_load(config: TrainConfig) -> TensorSource:
    problem = damaged_checkpoint(Path(config.load))
    if problem:
        raise CheckpointError(f"--load {config.load}: damaged checkpoint: {problem}")
    return open_checkpoint(Path(config.load), tokenizer=config.tokenizer_model)


def check_inputs_exist(config: TrainConfig) -> None:
    from megatron_llamapro.data.sft import check_data_inputs

    check_data_inputs(config.data_path, config.valid_data, config.sft)
    if config.load and not Path(config.load).exists():
        raise ConfigError(f"--load {config.load}: no such checkpoint directory")
    if config.save:
        check_writable_dir(Path(config.save), "--save")  # found now, not at the first save


def check_fp8(config: TrainConfig) -> None:
    """FP8 and --transformer-impl transformer_engine need the GPU the job runs on: checked by the
    job, not by --check."""
    from megatron_llamapro.model import te_available
    from megatron_llamapro.runtime.cpu_compat import cuda_usable

    if config.transformer_impl == "transformer_engine" and not (cuda_usable() and te_available()):
        raise ConfigError("--transformer-impl transformer_engine: needs a GPU and Transformer Engine "
                          "(drop the flag to use the local spec where they are missing)")
    if config.fp8 is None:
        return
    if config.transformer_impl == "local":
        raise ConfigError(f"--fp8 {config.fp8}: needs Transformer Engine layers (drop --transformer-impl local)")
    if not cuda_usable():
        raise ConfigError(f"--fp8 {config.fp8}: needs a GPU (no CUDA device is usable here)")
    if not te_available():
        raise ConfigError(f"--fp8 {config.fp8}: needs Transformer Engine (pip install 'megatron-llamapro[gpu]')")


def megatron_launch_options(config: TrainConfig, options: ModelOptions) -> ModelOptions:
    """--transformer-impl and --no-masked-softmax-fusion applied to the model's build options."""
    changes = {}
    if config.use_te() is not None:
        changes["use_te"] = config.use_te()
    if config.no_masked_softmax_fusion:
        changes["config_overrides"] = tuple(options.config_overrides) + (("masked_softmax_fusion", False),)
    return dataclasses.replace(options, **changes)


def check_model_fits(config: TrainConfig, manifest: Manifest, log: Callable[[str], None] = print) -> None:
    try:
        manifest.arch.check_parallel(config.tp, config.pp, config.vpp)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    window = manifest.arch.sliding_window
    if window and config.seq_length > window:
        # Mistral's sliding window equals full causal attention up to the window; beyond it
        # megatron-core's local/TE layers here would attend further than the model was trained to.
        raise ConfigError(f"--seq-length {config.seq_length} exceeds the model's sliding_window {window} "
                          "(sliding-window attention is not implemented; train at most that long)")
    check_sequence_length(config, manifest, log)


def rope_covered_length(arch) -> int | None:
    """The sequence length LLaMA-3 style rope_scaling stretches RoPE to (factor x
    original_max_position_embeddings), or None without such scaling."""
    factor = arch.rope_scaling_factor
    if factor is None:
        return None
    return int(factor * int(arch.rope_scaling.get("original_max_position_embeddings", 8192)))


def check_sequence_length(config: TrainConfig, manifest: Manifest, log: Callable[[str], None] = print) -> None:
    """--seq-length within the positions the checkpoint's RoPE was trained for: its
    max_position_embeddings, or what its llama3 rope_scaling covers; beyond them only with
    --allow-long-sequences (a warning)."""
    arch = manifest.arch
    positions, covered = arch.max_position_embeddings, rope_covered_length(arch)
    if config.seq_length <= max(positions, covered or 0):
        return
    what = f"--seq-length {config.seq_length} exceeds the checkpoint's max_position_embeddings {positions}"
    if covered is not None:
        original = int(arch.rope_scaling.get("original_max_position_embeddings", 8192))
        what += f" and its llama3 rope_scaling's {arch.rope_scaling_factor:g} x {original} = {covered}"
    if config.allow_long_sequences:
        log(f"warning: {what} (RoPE was not trained that long); training anyway (--allow-long-sequences)")
        return
    raise ConfigError(f"{what} (RoPE was not trained that long; pass --allow-long-sequences to train anyway)")


def warn_rounded_frozen_weights(config: TrainConfig, source: TensorSource, log: Callable[[str], None]) -> None:
    """bf16/fp16 training holds the frozen layers in --precision, so every save of a run started
    from weights stored otherwise (fp32, or the other 16-bit format) writes them rounded: one warning."""
    if config.precision == "fp32" or not config.save or config.save_trainable_only:
        return
    stored = source.weights_dtype()
    if stored == config.precision:
        return
    want = config.precision
    log(f"warning: --load {config.load} holds {stored} weights and --precision {want} stores the frozen layers "
        f"rounded to {want} in every saved checkpoint (they stay exactly the base's only with --fp32 or "
        f"--save-trainable-only; or rewrite the base in {want} first: tools/reshard.py --in {config.load} "
        f"--out {config.load.rstrip('/')}-{want} --dtype {want})")


def check_tokenizer_type(config: TrainConfig, tokenizer: Path) -> None:
    if config.tokenizer_type is None:
        return
    wanted = MEGATRON_TOKENIZER_TYPES[config.tokenizer_type]
    needs = "tokenizer.model" if wanted == "sentencepiece" else "tokenizer.json"
    if detect_tokenizer_type(tokenizer) != wanted and not (tokenizer / needs).is_file():
        raise ConfigError(f"--tokenizer-type {config.tokenizer_type}: the tokenizer {tokenizer} has no {needs}")


def _expected_shape(config: TrainConfig, manifest: Manifest) -> dict:
    """What each Megatron-LM model-shape flag would have to say for the checkpoint's model."""
    arch = manifest.arch
    return {
        "num_layers": arch.num_layers, "hidden_size": arch.hidden_size, "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads, "kv_channels": arch.head_dim,
        # Megatron-LM: --num-query-groups counts only with --group-query-attention (default 1 group)
        "group_query_attention": None,
        "num_query_groups": arch.num_kv_heads if config.model_shape.get("group_query_attention") else None,
        "max_position_embeddings": arch.max_position_embeddings,
        "untie_embeddings_and_output_weights": not arch.tie_word_embeddings,
        "rotary_base": float(arch.rope_theta), "norm_epsilon": float(arch.rms_norm_eps),
        "make_vocab_size_divisible_by": manifest.make_vocab_size_divisible_by, "vocab_size": arch.vocab_size,
        "use_rope_scaling": arch.rope_scaling_factor is not None, "rope_scaling_factor": arch.rope_scaling_factor,
        "add_qkv_bias": arch.qkv_bias, "qk_layernorm": arch.qk_layernorm, "apply_layernorm_1p": False,
    }


def check_model_shape(config: TrainConfig, manifest: Manifest) -> None:
    """Megatron-LM's model-shape flags describe the model; here the checkpoint does, so each one
    given must agree with it (a flag without a value only says yes)."""
    expected = _expected_shape(config, manifest)
    for name, given in config.model_shape.items():
        want = expected[name]
        if want is None:
            continue
        same = given == want if not isinstance(want, float) else abs(float(given) - want) <= 1e-12 * max(1.0, abs(want))
        if not same:
            flag = "--" + name.replace("_", "-")
            said = "" if given is True else f" {given}"
            has = (("yes" if want else "no") if isinstance(want, bool) else f"{want:g}" if isinstance(want, float)
                   else str(want))
            raise ConfigError(f"{flag}{said}: disagrees with the checkpoint ({name} = {has}); "
                              "the model comes from the checkpoint: drop the flag or fix its value")
    shape = config.model_shape
    if shape.get("group_query_attention") and "num_query_groups" not in shape and manifest.arch.num_kv_heads != 1:
        raise ConfigError(f"--group-query-attention: without --num-query-groups Megatron-LM uses 1 query group; "
                          f"the checkpoint has {manifest.arch.num_kv_heads} (add --num-query-groups "
                          f"{manifest.arch.num_kv_heads})")
    positions = shape.get("max_position_embeddings")
    if positions is not None and config.seq_length > positions:
        raise ConfigError(f"--seq-length {config.seq_length} exceeds --max-position-embeddings {positions}")


def check_every_stage_trains(plan: TrainablePlan, num_layers: int, config: TrainConfig) -> None:
    """megatron-core's distributed optimizer cannot checkpoint a pipeline stage that owns no
    trainable parameter; refuse such layouts up front when saving (an interleaved expansion planned
    for the same PP/VPP never produces one)."""
    from megatron_llamapro.checkpoint.layout import Layout, StagePlacement
    from megatron_llamapro.checkpoint.weight_map import EMBEDDING, FINAL_NORM

    if plan.all or config.pp == 1 or not config.save:
        return
    placement = StagePlacement(num_layers, Layout(config.tp, config.pp, config.vpp))
    for stage in placement.stages_without(plan.layers):
        layers = placement.stage_layers(stage)
        owns = (plan.embeddings and placement.unit_of(EMBEDDING)[0] == stage) \
            or (plan.final_norm and placement.unit_of(FINAL_NORM)[0] == stage)
        if not owns:
            raise ConfigError(
                f"--pipeline-model-parallel-size {config.pp}: stage {stage} (layers {layers[0]}-{layers[-1]}) "
                f"has no trainable layer (trainable: {sorted(plan.layers)}), and a stage without one cannot be "
                "checkpointed; use a smaller PP/VPP or new blocks on every stage (interleaved placement)")


def trainable_plan(config: TrainConfig, manifest: Manifest, load_path: str) -> TrainablePlan:
    num_layers = manifest.arch.num_layers
    if config.train_all:
        return TrainablePlan(layers=frozenset(range(num_layers)), all=True)
    if config.trainable_layers:
        layers = parse_layer_list(config.trainable_layers, num_layers)
    elif manifest.trainable_layers:
        layers = manifest.trainable_layers
    else:
        raise ConfigError(f"--load {load_path}: the checkpoint has no expansion manifest; "
                          "pass --trainable-layers (or --train-all)")
    return TrainablePlan(layers=frozenset(layers), embeddings=config.train_embeddings,
                         final_norm=config.train_final_norm)
