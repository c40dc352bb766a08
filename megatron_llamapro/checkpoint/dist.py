"""megatron-core dist_checkpointing (torch_dist): loads under any TP/PP.

Sharded keys follow the Transformer Engine spec (`linear_qkv.layer_norm_weight`, ...) whichever spec
built the model, so a checkpoint written on CPU (local spec) loads on GPU (TE spec) and back.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_llamapro.checkpoint import weight_map
from megatron_llamapro.checkpoint.integrity import check_file, check_folder
from megatron_llamapro.checkpoint.layout import chunk_key
from megatron_llamapro.checkpoint.manifest import (
    Manifest,
    detect_tokenizer_type,
    manifest_from_megatron_args,
    stored_tokenizer,
    tokenizer_dir,
)
from megatron_llamapro.checkpoint.source import PRECISION_NAMES, CheckpointError, TensorSource
from megatron_llamapro.checkpoint.tracker import TRACKER, iteration_dir, read_tracker


COMMON_FILE = "common.pt"


def te_keyed(sharded_state_dict: dict) -> dict:
    """Rename local-spec norm keys (in place, recursively) to their TE-spec names."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    def visit(obj):
        if isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)
        elif isinstance(obj, ShardedBase):
            obj.key = weight_map.te_spec_name(obj.key)

    visit(sharded_state_dict)
    return sharded_state_dict


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """The sharded state dict of a (possibly virtual-pipelined) model, keyed as Megatron-LM does."""
    if len(chunks) == 1:
        return te_keyed(chunks[0].sharded_state_dict())
    return {chunk_key(i, len(chunks)): te_keyed(chunk.sharded_state_dict()) for i, chunk in enumerate(chunks)}


def is_dist_checkpoint(directory: Path) -> bool:
    return (Path(directory) / "metadata.json").is_file()


def _canonical_from_model_state(state: dict) -> dict[str, torch.Tensor]:
    canonical = {}
    for key, value in state.items():
        if key.endswith("._extra_state") or value is None:
            continue
        canonical[weight_map.te_spec_name(key)] = value
    return canonical


def read_common_state(directory: Path) -> dict:
    """The non-sharded part of a torch_dist checkpoint (`common.pt`: Megatron-LM keeps its args,
    iteration and checkpoint_version there), loaded weights_only as Megatron-LM does."""
    from megatron_llamapro.checkpoint.legacy import load_checkpoint_file

    file = Path(directory) / COMMON_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (a torch_dist checkpoint without llamapro.json needs its args)")
    check_file(directory, file)
    try:
        return load_checkpoint_file(file, mmap=False)
    except Exception as exc:  # torch raises a variety of errors for damaged files
        raise CheckpointError(f"{file}: unreadable ({type(exc).__name__}: {exc})") from None


class DistSource(TensorSource):
    """A torch_dist checkpoint, read whole: written by this tool (llamapro.json at the root) or by
    Megatron-LM (model rebuilt from the args in common.pt)."""

    def __init__(self, path: Path, tokenizer: Path | None = None):
        self.path = Path(path)
        self.manifest_root = self.path
        if (self.path / TRACKER).is_file():
            self.dir = iteration_dir(self.path, read_tracker(self.path))
        else:
            self.dir = self.path
        if not is_dist_checkpoint(self.dir):
            raise CheckpointError(f"{self.dir / 'metadata.json'}: missing (incomplete torch_dist checkpoint)")
        check_folder(self.dir, content=False)  # sizes now; checksums when the tensors are loaded
        manifest = Manifest.read(self.path) or Manifest.read(self.dir.parent)
        args = read_common_state(self.dir).get("args") if manifest is None or (self.dir / COMMON_FILE).is_file() \
            else None
        if manifest is not None and getattr(args, "num_layers", None) not in (None, manifest.arch.num_layers):
            raise CheckpointError(f"{self.dir / COMMON_FILE}: args.num_layers is {args.num_layers}, but the "
                                  f"checkpoint's llamapro.json says num_layers {manifest.arch.num_layers}")
        self._tokenizer = tokenizer_dir(self.path) or tokenizer or (stored_tokenizer(args) if manifest is None else None)
        if manifest is None:
            manifest = manifest_from_megatron_args(args, str(self.dir / COMMON_FILE), "torch_dist", self._tokenizer)
        elif manifest.tokenizer_type is None and self._tokenizer is not None:
            manifest = manifest.replace(tokenizer_type=detect_tokenizer_type(self._tokenizer))
        self.manifest = manifest.replace(format="torch_dist")
        self._state: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        from megatron.core import dist_checkpointing

        from megatron_llamapro.model import ModelOptions, build_model
        from megatron_llamapro.runtime.distributed import single_process_megatron

        check_folder(self.dir)
        with single_process_megatron():
            model = build_model(self.arch, ModelOptions(
                params_dtype=self.manifest.dtype, padded_vocab_size=self.manifest.padded_vocab_size,
                use_te=False, config_overrides=(("perform_initialization", False),)))[0]
            sharded = model_sharded_state_dict([model])
            try:
                loaded = dist_checkpointing.load(sharded, str(self.dir))
            except Exception as exc:  # megatron raises several kinds for damaged checkpoints
                raise CheckpointError(f"{self.dir}: cannot load torch_dist checkpoint "
                                      f"({type(exc).__name__}: {exc})") from None
            model.load_state_dict(loaded, strict=False)
            state = _canonical_from_model_state(model.state_dict())
        return {k: v.detach().clone() for k, v in state.items()}

    def full(self, name: str) -> torch.Tensor:
        if self._state is None:
            self._state = self._load()
        try:
            return self._state[name]
        except KeyError:
            raise CheckpointError(f"{self.dir}: tensor {name} missing") from None

    def weights_dtype(self) -> str:
        """From the checkpoint's metadata (torch.distributed.checkpoint's `.metadata`): the stored
        dtype of the linear QKV weights, without loading the model; else the manifest's."""
        from torch.distributed.checkpoint import FileSystemReader

        try:
            metadata = FileSystemReader(str(self.dir)).read_metadata().state_dict_metadata
        except Exception:  # an older or foreign layout: the manifest says what was written
            return self.manifest.dtype
        for key, entry in metadata.items():
            if key.endswith("self_attention.linear_qkv.weight") and not key.startswith("optimizer"):
                dtype = getattr(getattr(entry, "properties", None), "dtype", None)
                return PRECISION_NAMES.get(dtype, self.manifest.dtype)
        return self.manifest.dtype

    def tokenizer_dir(self) -> Path | None:
        return self._tokenizer

    def close(self) -> None:
        self._state = None


def write_dist(source: TensorSource, out_dir: Path, manifest: Manifest, allow_non_finite: bool = False) -> None:
    """Write `source` as a torch_dist checkpoint in `out_dir` (one process, TP=PP=1 model); a NaN/Inf
    tensor is refused by name unless `allow_non_finite`."""
    from megatron.core import dist_checkpointing

    from megatron_llamapro.model import ModelOptions, build_model
    from megatron_llamapro.runtime.distributed import single_process_megatron

    out_dir.mkdir(parents=True, exist_ok=True)
    with single_process_megatron():
        model = build_model(manifest.arch, ModelOptions(
            params_dtype=manifest.dtype, padded_vocab_size=manifest.padded_vocab_size, use_te=False,
            config_overrides=(("perform_initialization", False),)))[0]  # every weight is overwritten
        # Tensor by tensor into the model (a full state dict first would hold the weights twice).
        from megatron_llamapro.checkpoint.load import load_source_into_model

        load_source_into_model([model], source, manifest.padded_vocab_size, check_finite=not allow_non_finite)
        from megatron_llamapro.checkpoint.legacy import CHECKPOINT_VERSION, megatron_args

        # The non-sharded entries go to common.pt, where Megatron-LM reads args and iteration.
        state = model_sharded_state_dict([model])
        state.update(args=megatron_args(manifest), checkpoint_version=CHECKPOINT_VERSION, iteration=0)
        dist_checkpointing.save(state, str(out_dir))

