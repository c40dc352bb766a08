"""Training checkpoints that survive preemption.

Layout under --save (Megatron-LM's):
    latest_checkpointed_iteration.txt   written last, atomically, after the checkpoint is complete
    iter_0000100/                       torch_dist (default): model + distributed optimizer + scheduler
                                        + RNG, loadable at any TP/PP/DP; or --save-format torch:
                                        Megatron-LM's mp_rank_XX[_YYY]/{model_optim_rng.pt,
                                        distrib_optim.pt}, resumable at the same TP/PP (any DP);
                                        or a trainable-only delta (see below); trainer_state.json
                                        (iteration, consumed samples = data position) is written last
    llamapro.json, tokenizer/           the model description, copied from the loaded checkpoint
Each checkpoint is written into `.tmp_iter_XXXXXXX` and renamed when every rank has finished.

Trainable-only deltas (--save-trainable-only) hold, per model-parallel rank, the trainable
parameters by canonical name (`delta/mp_rank_XX_YYY.pt`) plus the optimizer state (torch_dist);
`tools/merge_delta.py` folds one into its base checkpoint. They record the base they apply to.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_llamapro.checkpoint import weight_map
from megatron_llamapro.checkpoint.dist import model_sharded_state_dict
from megatron_llamapro.checkpoint.layout import Layout, StagePlacement, merge_tp, shard_of
from megatron_llamapro.checkpoint.manifest import MANIFEST_NAME, TOKENIZER_DIR, Manifest
from megatron_llamapro.checkpoint.source import CheckpointError, TensorSource
from megatron_llamapro.checkpoint.tracker import TRACKER, iteration_name, read_tracker, write_tracker

STATE_FILE = "trainer_state.json"  # iteration, consumed samples, delta info; written by rank 0
DELTA_DIR = "delta"
OPTIM_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class TrainerState:
    iteration: int = 0
    consumed_samples: int = 0
    trainable_only: bool = False
    base_checkpoint: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _mp_ranks():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_rank(with_context_parallel=True))


def _rng_sharded_object():
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tp, pp, dp = _mp_ranks()
    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", state,
                         (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
                         (pp, tp), replica_id=dp)


def _restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


# ---- finding checkpoints ------------------------------------------------------------------------

def complete_iterations(save_dir: Path) -> list[int]:
    """Iterations with a finished checkpoint folder (newest last)."""
    its = []
    for entry in Path(save_dir).glob("iter_*"):
        if entry.is_dir() and (entry / STATE_FILE).is_file():
            try:
                its.append(int(entry.name[5:]))
            except ValueError:
                continue
    return sorted(its)


def checkpoint_problem(save_dir: Path, iteration: int) -> str | None:
    """None if iter folder looks complete, else a one-line reason naming the file."""
    it_dir = Path(save_dir) / iteration_name(iteration)
    state_file = it_dir / STATE_FILE
    if not state_file.is_file():
        return f"{state_file}: missing (incomplete checkpoint)"
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError:
        return f"{state_file}: not valid JSON"
    if state.get("format", "torch_dist") == "torch_dist" and not (it_dir / "metadata.json").is_file():
        return f"{it_dir / 'metadata.json'}: missing (incomplete torch_dist checkpoint)"
    expected = state.get("files", {})
    for name, size in expected.items():
        path = it_dir / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != size:
            return f"{path}: truncated ({path.stat().st_size} of {size} bytes)"
    return None


def find_resume_iteration(save_dir: Path, log=print) -> int | None:
    """The newest complete checkpoint in save_dir; falls back past damaged ones with a warning."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return None
    candidates = complete_iterations(save_dir)
    tracked = None
    if (save_dir / TRACKER).is_file():
        try:
            tracked = read_tracker(save_dir)
        except ValueError as exc:
            log(f"warning: {exc}; looking for the newest complete checkpoint instead")
        if isinstance(tracked, int) and tracked not in candidates:
            it_dir = save_dir / iteration_name(tracked)
            why = checkpoint_problem(save_dir, tracked) if it_dir.is_dir() else f"{it_dir}: missing"
            log(f"warning: {save_dir / TRACKER} names iteration {tracked}, but {why}")
    found = None
    for iteration in sorted(candidates, reverse=True):
        if isinstance(tracked, int) and iteration > tracked:
            continue  # finished after the tracker was last written: not known complete on all ranks
        problem = checkpoint_problem(save_dir, iteration)
        if problem is None:
            found = iteration
            break
        log(f"warning: skipping damaged checkpoint: {problem}")
    # iteration folders without a state record (damaged by hand, or copied partially) newer than
    # the one chosen: say so rather than skip them silently
    for entry in sorted(save_dir.glob("iter_*")):
        try:
            iteration = int(entry.name[5:])
        except ValueError:
            continue
        if entry.is_dir() and iteration not in candidates and (found is None or iteration > found) \
                and iteration != tracked:
            log(f"warning: skipping damaged checkpoint: {entry / STATE_FILE}: missing (incomplete checkpoint)")
    if found is not None and isinstance(tracked, int) and found != tracked:
        log(f"warning: resuming from iteration {found}, not the tracked {tracked}")
    return found


def holds_checkpoints(save_dir: Path) -> bool:
    """A tracker naming an iteration, or iter_N folders: something a training run saved (complete
    or not). A 'release' tracker (--save pointing at the converted/expanded checkpoint itself, as
    Megatron-LM users do with --load == --save) is not a training checkpoint."""
    save_dir = Path(save_dir)
    if any(p.is_dir() for p in save_dir.glob("iter_*")):
        return True
    if not (save_dir / TRACKER).is_file():
        return False
    try:
        return isinstance(read_tracker(save_dir), int)
    except CheckpointError:
        return True  # a garbled tracker: something was saved here


def damaged_checkpoint(path: Path) -> str | None:
    """For a checkpoint this trainer saved (a --save root or one of its iter_N folders), the
    one-line problem of the folder the tracker names (see checkpoint_problem); None otherwise."""
    path = Path(path)
    if (path / TRACKER).is_file():
        try:
            tracked = read_tracker(path)
        except ValueError as exc:
            return str(exc)
        if tracked == "release":
            return None
        it_dir = path / iteration_name(tracked)
        if not it_dir.is_dir():
            return f"{it_dir}: missing (named by {path / TRACKER})"
        root, iteration = path, tracked
    elif path.name.startswith("iter_") and path.is_dir():
        try:
            root, iteration = path.parent, int(path.name[5:])
        except ValueError:
            return None
    else:
        return None
    if not (root / iteration_name(iteration) / STATE_FILE).is_file():
        return None  # not a training checkpoint: megatron's own loader reports what it finds
    return checkpoint_problem(root, iteration)


# ---- save ---------------------------------------------------------------------------------------

def _file_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def save_checkpoint(save_dir: Path, iteration: int, chunks, optimizer, scheduler, state: TrainerState,
                    manifest: Manifest, tokenizer_src: Path | None, keep_last: int | None,
                    trainable_only: bool, fmt: str = "torch_dist") -> Path:
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    final = save_dir / iteration_name(iteration)
    tmp = save_dir / f".tmp_{iteration_name(iteration)}"
    if _rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if not (save_dir / MANIFEST_NAME).is_file():
            manifest.replace(format="torch_dist").write(save_dir)
        if tokenizer_src is not None and not (save_dir / TOKENIZER_DIR).exists():
            shutil.copytree(tokenizer_src, save_dir / TOKENIZER_DIR)
    _barrier()

    from megatron_llamapro.training import signals

    if fmt == "torch":
        with signals.deferred():
            _save_legacy(tmp, iteration, chunks, optimizer, scheduler, manifest)
    else:
        model_sd = model_sharded_state_dict(chunks)
        sharded = {"optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIM_SHARDING),
                   "opt_param_scheduler": scheduler.state_dict(), "rng_state": _rng_sharded_object()}
        if trainable_only:
            _save_delta_tensors(tmp, chunks, manifest)
        else:
            sharded["model"] = model_sd
        with signals.deferred():
            dist_checkpointing.save(sharded, str(tmp), validate_access_integrity=not trainable_only)
    _barrier()
    if _rank() == 0:
        record = state.to_dict() | {"iteration": iteration, "trainable_only": trainable_only, "format": fmt,
                                    "files": _file_sizes(tmp), "saved_at": time.time()}
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_tracker(save_dir, iteration)
        if keep_last:
            prune_checkpoints(save_dir, keep_last)
    _barrier()
    return final


# ---- Megatron-LM's legacy layout ----------------------------------------------------------------

LEGACY_OPTIM_FILE = "distrib_optim.pt"


def _current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                  ps.get_virtual_pipeline_model_parallel_world_size())


def _legacy_rank_dir(it_dir: Path) -> Path:
    from megatron_llamapro.checkpoint.tracker import mp_rank_dir

    tp, pp, _ = _mp_ranks()
    return Path(it_dir) / mp_rank_dir(tp, pp, _current_layout().pp)


def _save_legacy(tmp: Path, iteration: int, chunks, optimizer, scheduler, manifest: Manifest) -> None:
    """model_optim_rng.pt per model-parallel rank (TE-spec keys, as checkpoint/legacy.py writes) plus
    the distributed optimizer's state gathered on DP rank 0 into distrib_optim.pt (Megatron-LM's way)."""
    from megatron_llamapro.checkpoint.legacy import CHECKPOINT_VERSION, FILE_NAME, megatron_args, te_state_dict_entries
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    _, _, dp = _mp_ranks()
    rank_dir = _legacy_rank_dir(tmp)
    if dp == 0:
        rank_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    if hasattr(optimizer, "save_parameter_state"):
        optimizer.save_parameter_state(str(rank_dir / LEGACY_OPTIM_FILE))  # collective over DP
    if dp != 0:
        return
    payload = {}
    for i, chunk in enumerate(chunks):
        state = {weight_map.te_spec_name(k): v for k, v in _unwrap(chunk).state_dict().items()}
        for key in te_state_dict_entries(list(state)):
            state.setdefault(key, None)
        payload["model" if len(chunks) == 1 else f"model{i}"] = state
    layout = _current_layout()
    payload.update({
        "optimizer": optimizer.state_dict(), "opt_param_scheduler": scheduler.state_dict(),
        "rng_state": {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()},
        "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
        "args": megatron_args(manifest.replace(layout=layout, format="torch"), iteration),
    })
    torch.save(payload, rank_dir / FILE_NAME)


def _load_legacy(it_dir: Path, chunks, optimizer, scheduler) -> None:
    from megatron_llamapro.checkpoint.legacy import FILE_NAME, copy_stored_tensors

    rank_file = _legacy_rank_dir(it_dir) / FILE_NAME
    if not rank_file.is_file():
        raise CheckpointError(f"{rank_file}: missing (legacy training checkpoints resume only at the TP/PP "
                              "they were saved with; save torch_dist to change the layout)")
    try:
        payload = torch.load(rank_file, map_location="cpu", weights_only=False)
    except Exception as exc:  # damaged zip archives raise several kinds
        raise CheckpointError(f"{rank_file}: unreadable checkpoint file ({type(exc).__name__})") from None
    args, layout = payload["args"], _current_layout()
    saved = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
             args.virtual_pipeline_model_parallel_size)
    if saved != (layout.tp, layout.pp, layout.vpp):
        raise CheckpointError(f"{rank_file}: saved with TP={saved[0]} PP={saved[1]} VPP={saved[2]}, resuming with "
                              f"{layout.describe()}; legacy training checkpoints resume only at the same layout")
    for i, chunk in enumerate(chunks):
        state = payload["model" if len(chunks) == 1 else f"model{i}"]
        copy_stored_tensors(_unwrap(chunk), state.items(), str(rank_file))
    with torch.no_grad():
        optimizer.load_state_dict(payload["optimizer"])
        if hasattr(optimizer, "load_parameter_state"):
            # distrib_optim.pt holds param, exp_avg and exp_avg_sq; torch's Adam also keeps a
            # per-parameter step, which megatron would try to fill from the file: restore it from
            # the param groups afterwards instead.
            for opt in _inner_optimizers(optimizer):
                inner = getattr(opt, "optimizer", None)
                for param_state in (inner.state.values() if inner is not None else ()):
                    param_state.pop("step", None)
            optimizer.load_parameter_state(str(rank_file.parent / LEGACY_OPTIM_FILE))
    _copy_step_into_param_state(optimizer)
    scheduler.load_state_dict(payload["opt_param_scheduler"])
    _restore_rng(payload["rng_state"])


def prune_checkpoints(save_dir: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` complete checkpoints; never the one the tracker names."""
    save_dir = Path(save_dir)
    its = complete_iterations(save_dir)
    try:
        tracked = read_tracker(save_dir)
    except (FileNotFoundError, ValueError):
        tracked = None
    if isinstance(tracked, int):
        # folders newer than the tracker are left over from a run that fell back past them: they
        # are neither counted nor removed (the resumed run overwrites them as it gets there)
        its = [it for it in its if it <= tracked]
    removed = []
    for iteration in its[:-keep_last] if keep_last < len(its) else []:
        if iteration == tracked:
            continue
        path = save_dir / iteration_name(iteration)
        shutil.rmtree(path)
        removed.append(path)
    return removed


# ---- trainable-only deltas ----------------------------------------------------------------------

def _trainable_canonical(chunks, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Trainable parameters of this rank, keyed by canonical (global, TE-spec) names."""
    from megatron.core import parallel_state as ps


    layout = Layout(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                    ps.get_virtual_pipeline_model_parallel_world_size())
    placement = StagePlacement(manifest.arch.num_layers, layout)
    stage = ps.get_pipeline_model_parallel_rank()
    out = {}
    for chunk_index, chunk in enumerate(chunks):
        module = chunk.module if hasattr(chunk, "module") else chunk
        for name, param in module.named_parameters():
            if param.requires_grad:
                out[placement.global_name(weight_map.te_spec_name(name), stage, chunk_index)] = param.detach().cpu().clone()
    return out


def _save_delta_tensors(tmp: Path, chunks, manifest: Manifest) -> None:
    from megatron.core import parallel_state as ps

    tp, pp, dp = _mp_ranks()
    if dp != 0:
        return
    layout = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size()}
    path = tmp / DELTA_DIR / f"mp_rank_{tp:02d}_{pp:03d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"tensors": _trainable_canonical(chunks, manifest), "layout": layout}, path)


class DeltaSource(TensorSource):
    """A base checkpoint with a trainable-only delta applied on top."""

    def __init__(self, base: TensorSource, delta_iteration_dir: Path):
        self.base = base
        self.path = base.path
        self.manifest = base.manifest
        self.delta_dir = Path(delta_iteration_dir) / DELTA_DIR
        files = sorted(self.delta_dir.glob("mp_rank_*.pt"))
        if not files:
            raise CheckpointError(f"{self.delta_dir}: no delta files (not a trainable-only checkpoint)")
        shards: dict[str, dict[int, torch.Tensor]] = {}
        tp = 1
        for file in files:
            try:
                data = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:  # damaged zip archives raise several kinds
                raise CheckpointError(f"{file}: unreadable delta file ({type(exc).__name__})") from None
            tp = int(data["layout"]["tp"])
            tp_rank = int(file.name.split("_")[2])
            for name, tensor in data["tensors"].items():
                shards.setdefault(name, {})[tp_rank] = tensor
        self.delta = {}
        for name, by_rank in shards.items():
            if len(by_rank) != tp:
                raise CheckpointError(f"{self.delta_dir}: tensor {name} lacks TP shards ({sorted(by_rank)} of {tp})")
            self.delta[name] = merge_tp([by_rank[r] for r in range(tp)], weight_map.split_rule(name))

    def full(self, name: str) -> torch.Tensor:
        if name in self.delta:
            return self.delta[name]
        return self.base.full(name)

    def get(self, name, tp_rank=0, tp=1, padded_vocab=None):
        name = self.resolve(name)
        if name in self.delta:
            return shard_of(self.delta[name], name, tp_rank, tp, padded_vocab)
        return self.base.get(name, tp_rank, tp, padded_vocab)

    def tokenizer_dir(self):
        return self.base.tokenizer_dir()

    def close(self):
        self.base.close()


# ---- load ---------------------------------------------------------------------------------------

def load_training_checkpoint(save_dir: Path, iteration: int, chunks, optimizer, scheduler,
                             base_loader) -> TrainerState:
    """Restore model (or base + delta), optimizer, scheduler and RNG from save_dir/iter_N."""
    from megatron.core import dist_checkpointing

    it_dir = Path(save_dir) / iteration_name(iteration)
    record = json.loads((it_dir / STATE_FILE).read_text())
    state = TrainerState(iteration=int(record["iteration"]), consumed_samples=int(record["consumed_samples"]),
                         trainable_only=bool(record.get("trainable_only")),
                         base_checkpoint=record.get("base_checkpoint"))
    if record.get("format", "torch_dist") == "torch":
        _load_legacy(it_dir, chunks, optimizer, scheduler)
        return state
    if state.trainable_only:
        base_loader(it_dir)
    model_sd = model_sharded_state_dict(chunks)
    _prime_optimizer_state(optimizer)
    sharded = {"optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIM_SHARDING),
               "rng_state": _rng_sharded_object()}
    if not state.trainable_only:
        sharded["model"] = model_sd
    try:
        with torch.no_grad():
            loaded = dist_checkpointing.load(sharded, str(it_dir))
    except Exception as exc:  # megatron raises several kinds for damaged checkpoints
        raise CheckpointError(f"{it_dir}: cannot load checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not state.trainable_only:
        model_state = loaded["model"]
        if len(chunks) == 1:
            _unwrap(chunks[0]).load_state_dict(model_state, strict=False)
        else:
            for i, chunk in enumerate(chunks):
                _unwrap(chunk).load_state_dict(model_state[f"model{i}"], strict=False)
    with torch.no_grad():
        optimizer.load_state_dict(loaded["optimizer"])
    _copy_step_into_param_state(optimizer)
    common = dist_checkpointing.load_common_state_dict(str(it_dir))
    scheduler.load_state_dict(common["opt_param_scheduler"])
    _restore_rng(loaded["rng_state"])
    return state


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def _inner_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _prime_optimizer_state(optimizer) -> None:
    """Adam state tensors must exist before the distributed optimizer builds its load plan."""
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                st = inner.state[param]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(param.data, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(param.data, dtype=torch.float32)
                    st["step"] = torch.zeros((), dtype=torch.float32)


def _copy_step_into_param_state(optimizer) -> None:
    """The restored step lives in the param group; Adam reads it per parameter state."""
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            step = group.get("step")
            if step is None:
                continue
            for param in group["params"]:
                if param in inner.state:
                    inner.state[param]["step"] = torch.tensor(float(step), dtype=torch.float32)



def delta_iteration_dir(save_dir: Path, iteration: int | None = None) -> Path:
    """The iter_N folder of a trainable-only checkpoint under save_dir (the tracker's by default),
    checked complete; CheckpointError naming the file otherwise."""
    save_dir = Path(save_dir)
    if iteration is None:
        try:
            iteration = read_tracker(save_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise CheckpointError(str(exc)) from None
    it_dir = save_dir / iteration_name(iteration)
    if not it_dir.is_dir():
        raise CheckpointError(f"{it_dir}: missing")
    problem = checkpoint_problem(save_dir, int(iteration))
    if problem:
        raise CheckpointError(problem)
    record = json.loads((it_dir / STATE_FILE).read_text())
    if not record.get("trainable_only"):
        raise CheckpointError(f"{it_dir / STATE_FILE}: a full checkpoint, not a trainable-only delta "
                              "(it loads on its own: no merge needed)")
    return it_dir


def open_delta_source(base: str, delta_iteration: str) -> DeltaSource:
    """Base checkpoint + delta as one source; module-level so functools.partial of it pickles
    (write_checkpoint calls it once per worker)."""
    from megatron_llamapro.checkpoint.open import open_checkpoint

    source = open_checkpoint(Path(base))
    try:
        return DeltaSource(source, Path(delta_iteration))
    except BaseException:
        source.close()
        raise
