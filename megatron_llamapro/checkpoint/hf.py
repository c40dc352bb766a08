"""Hugging Face checkpoints: streaming safetensors reader and writer, config and tokenizer files.

The reader parses safetensors itself and reads one tensor at a time with plain file reads (no
mmap), so resident memory grows only with what the caller keeps; a truncated file is detected
from its header before any tensor is used.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from megatron_llamapro.arch import LlamaArch
from megatron_llamapro.arch import torch_dtype as precision_dtype
from megatron_llamapro.checkpoint import weight_map
from megatron_llamapro.checkpoint.layout import Layout
from megatron_llamapro.checkpoint.integrity import check_finite
from megatron_llamapro.checkpoint.manifest import (
    EXPANSION_JSON,
    Expansion,
    Manifest,
    copy_tokenizer_files,
    detect_tokenizer_type,
)
from megatron_llamapro.checkpoint.source import PRECISION_NAMES, CheckpointError, TensorSource

_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class SafetensorsFile:
    """Header-indexed access to one .safetensors file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (header cut short)")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{self.path}: not a safetensors file (bad header)") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise CheckpointError(
                f"{self.path}: truncated safetensors file ({size} bytes, header needs "
                f"{self.data_start + end})")

    def keys(self):
        return self.entries.keys()

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        # Read straight into an uninitialized tensor: a zero-filled bytearray touched every page twice.
        raw = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.data_start + begin)
                view, done = memoryview(raw.numpy()), 0
                while done < len(view):
                    count = f.readinto(view[done:])
                    if not count:
                        raise CheckpointError(f"{self.path}: truncated while reading {name}")
                    done += count
        return raw.view(dtype).reshape(entry["shape"])


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> int:
    """Write tensors one by one (no second in-memory copy of the file); returns bytes written."""
    header, offset = {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _ST_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for tensor in tensors.values():
            t = tensor.detach().contiguous().cpu()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return 8 + len(raw) + offset


class HFSource(TensorSource):
    """An HF LLaMA-family checkpoint directory (safetensors, or pytorch_model*.bin)."""

    def __init__(self, path: Path, tokenizer: Path | None = None):
        self.path = Path(path)
        # its own tokenizer files, else the --tokenizer-model directory
        self._tokenizer = self.path if detect_tokenizer_type(self.path) else tokenizer
        arch = LlamaArch.from_hf_dir(self.path)
        expansions = []
        exp_path = self.path / EXPANSION_JSON
        if exp_path.is_file():
            expansions = [Expansion.from_dict(e) for e in json.loads(exp_path.read_text())["expansions"]]
        self.manifest = Manifest(arch=arch, padded_vocab_size=arch.vocab_size, layout=Layout(),
                                 dtype=self._config_dtype(), format="hf",
                                 tokenizer_type=detect_tokenizer_type(self._tokenizer) if self._tokenizer else None,
                                 expansions=expansions)
        self._files: dict[str, SafetensorsFile] = {}
        self._bin_state: dict | None = None
        self._where = self._index()
        self._check_complete()

    def _config_dtype(self) -> str:
        config = json.loads((self.path / "config.json").read_text())
        name = config.get("torch_dtype") or config.get("dtype") or "float32"
        return {v: k for k, v in HF_DTYPE_NAMES.items()}.get(str(name), "fp32")

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise CheckpointError(f"{index}: malformed (expected JSON with a weight_map)") from None
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            where = {}
            for file in files:
                for key in self._open(file.name).keys():
                    where[key] = file.name
            return where
        bins = sorted(self.path.glob("pytorch_model*.bin"))
        if bins:
            self._bin_state = {}
            for file in bins:
                self._bin_state.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
            return {k: "bin" for k in self._bin_state}
        raise CheckpointError(f"{self.path}: no weights (*.safetensors or pytorch_model*.bin)")

    def _check_complete(self) -> None:
        expected = weight_map.hf_model_shapes(self.arch)
        missing = sorted(set(expected) - set(self._where))
        if missing:
            raise CheckpointError(f"{self.path}: missing weights {', '.join(missing[:3])}"
                                  + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        for name in self._where:
            if name.endswith(".bias") and name not in expected:
                raise CheckpointError(f"{self.path}: bias tensor {name} present ({self.arch.model_type} "
                                      f"blocks have none there)")
        for file in set(self._where.values()) - {"bin"}:
            if not (self.path / file).is_file():
                raise CheckpointError(f"{self.path / file}: missing (named by the index)")
            self._open(file)
        for name in sorted(expected):
            file = self._where[name]
            shape = tuple(self._bin_state[name].shape) if file == "bin" \
                else tuple(self._open(file).entries[name]["shape"])
            if shape != expected[name]:
                raise CheckpointError(f"{self.path / file}: tensor {name} has shape {list(shape)}, "
                                      f"config.json implies {list(expected[name])}")

    def _open(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = SafetensorsFile(self.path / file)
        return self._files[file]

    def read_hf(self, hf_name: str) -> torch.Tensor:
        file = self._where[hf_name]
        if file == "bin":
            return self._bin_state[hf_name]
        return self._open(file).get(hf_name)

    def full(self, name: str) -> torch.Tensor:
        return weight_map.hf_to_megatron(name, self.read_hf, self.arch)

    def weights_dtype(self) -> str:
        """From the safetensors header (or the mmapped .bin tensor): no weight is read."""
        name = "model.layers.0.self_attn.q_proj.weight"
        file = self._where.get(name)
        if file is None:
            return self.manifest.dtype
        if file == "bin":
            dtype = self._bin_state[name].dtype
        else:
            dtype = _ST_DTYPES.get(self._open(file).entries[name]["dtype"])
        return PRECISION_NAMES.get(dtype, self.manifest.dtype)

    def tokenizer_dir(self) -> Path | None:
        return self._tokenizer


def write_hf(source: TensorSource, out: Path, dtype: str | None = None,
             max_shard_bytes: int = 5 * 1024**3, bar=None, allow_non_finite: bool = False) -> None:
    """Stream `source` into an HF directory: config, safetensors shards (+ index), tokenizer; a
    NaN/Inf tensor is refused by name unless `allow_non_finite`."""
    out = Path(out)
    manifest = source.manifest
    arch = manifest.arch
    dtype = dtype or manifest.dtype
    torch_dtype = precision_dtype(dtype)
    element = torch.empty((), dtype=torch_dtype).element_size()

    # Plan the shards from the known shapes, so each file's header can be written first and the
    # tensors streamed after it one by one: memory stays at about one tensor, not one shard.
    planned: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    shard_bytes = 0
    for name in source.names():
        for hf_name, shape in weight_map.hf_shapes(name, arch).items():
            size = element * _numel(shape)
            if planned[-1] and shard_bytes + size > max_shard_bytes:
                planned.append([])
                shard_bytes = 0
            planned[-1].append((hf_name, shape))
            shard_bytes += size
    files = (["model.safetensors"] if len(planned) == 1 else
             [f"model-{i + 1:05d}-of-{len(planned):05d}.safetensors" for i in range(len(planned))])
    writers = iter([_StreamingSafetensors(out / file, entries, torch_dtype) for file, entries in zip(files, planned)])
    writer = next(writers)
    for name in source.names():
        full = source.full(name)
        if not allow_non_finite:
            check_finite(name, full, str(source.path))
        for hf_name, tensor in weight_map.megatron_to_hf(name, full, arch).items():
            if writer.full():
                writer.close()
                writer = next(writers)
            writer.write(hf_name, tensor.to(torch_dtype))
            if bar is not None:
                bar.update(tensor.numel() * element)
    writer.close()
    if len(planned) > 1:
        weight_index = {hf_name: file for file, entries in zip(files, planned) for hf_name, _ in entries}
        total = sum(element * _numel(shape) for entries in planned for _, shape in entries)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_index}, indent=2) + "\n")

    (out / "config.json").write_text(json.dumps(arch.to_hf_config(HF_DTYPE_NAMES[dtype]), indent=2) + "\n")
    tok_dir = source.tokenizer_dir()
    if tok_dir is not None:
        copy_tokenizer_files(tok_dir, out)
    if not (out / "generation_config.json").is_file():
        generation = {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id}
        if arch.pad_token_id is not None:
            generation["pad_token_id"] = arch.pad_token_id
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if manifest.expansions:
        (out / EXPANSION_JSON).write_text(json.dumps(
            {"expansions": [e.to_dict() for e in manifest.expansions]}, indent=2) + "\n")


def _numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= int(dim)
    return n


class _StreamingSafetensors:
    """A safetensors file whose header is written from planned shapes before any tensor data."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype):
        self.path, self.entries, self.dtype = path, entries, dtype
        element = torch.empty((), dtype=dtype).element_size()
        header, offset = {}, 0
        for name, shape in entries:
            nbytes = element * _numel(shape)
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)
        self.next = 0

    def full(self) -> bool:
        return self.next >= len(self.entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, shape = self.entries[self.next]
        if name != expected or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"{self.path}: planned {expected} {tuple(shape)}, got {name} {tuple(tensor.shape)}")
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            self.file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> None:
        if not self.full():
            raise RuntimeError(f"{self.path}: {len(self.entries) - self.next} planned tensors never written")
        self.file.close()
