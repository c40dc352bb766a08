"""megatron-core dist_checkpointing (torch_dist): loads under any TP/PP.

Sharded keys follow the Transformer Engine spec (`linear_qkv.layer_norm_weight`, ...) whichever spec
built the model, so a checkpoint written on CPU (local spec) loads on GPU (TE spec) and back.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_llamapro.checkpoint import weight_map
from megatron_llamapro.checkpoint.layout import chunk_key
from megatron_llamapro.checkpoint.manifest import Manifest, tokenizer_dir
from megatron_llamapro.checkpoint.source import CheckpointError, TensorSource
from megatron_llamapro.checkpoint.tracker import TRACKER, iteration_dir, read_tracker


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


class DistSource(TensorSource):
    """A torch_dist checkpoint written by this tool (llamapro.json at the root), read whole."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest_root = self.path
        if (self.path / TRACKER).is_file():
            self.dir = iteration_dir(self.path, read_tracker(self.path))
        else:
            self.dir = self.path
        manifest = Manifest.read(self.path) or Manifest.read(self.dir.parent)
        if manifest is None:
            raise CheckpointError(f"{self.path}: torch_dist checkpoint without llamapro.json "
                                  "(needed to rebuild the model)")
        if not is_dist_checkpoint(self.dir):
            raise CheckpointError(f"{self.dir / 'metadata.json'}: missing (incomplete torch_dist checkpoint)")
        self.manifest = manifest.replace(format="torch_dist")
        self._state: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        from megatron.core import dist_checkpointing

        from megatron_llamapro.model import ModelOptions, build_model
        from megatron_llamapro.runtime.distributed import single_process_megatron

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

    def tokenizer_dir(self) -> Path | None:
        return tokenizer_dir(self.path)

    def close(self) -> None:
        self._state = None


def write_dist(source: TensorSource, out_dir: Path, manifest: Manifest) -> None:
    """Write `source` as a torch_dist checkpoint in `out_dir` (one process, TP=PP=1 model)."""
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

        load_source_into_model([model], source, manifest.padded_vocab_size)
        dist_checkpointing.save(model_sharded_state_dict([model]), str(out_dir))

