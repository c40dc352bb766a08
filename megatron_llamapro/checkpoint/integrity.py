"""Damaged-file detection shared by every reader, the trainer's resume and export.

Each checkpoint folder this package writes (an iteration folder of a training --save, the `release/`
folder of a converted checkpoint) carries `checksums.json`: every other file's size and CRC-32,
recorded when it was written. A training save's `trainer_state.json` also lists file sizes (older
saves have only that). `folder_problem` checks sizes (cheap) and, with `content=True`, checksums;
a reader checks one file with `file_problem` just before loading it.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from megatron_llamapro.checkpoint.source import CheckpointError
from megatron_llamapro.fsutil import write_text_atomic

CHECKSUM_FILE = "checksums.json"
STATE_FILE = "trainer_state.json"  # a training save's completion record (training/iteration_dirs.py)
CHUNK_BYTES = 16 * 1024**2
ALGORITHM = "crc32"


class NonFiniteError(CheckpointError):
    pass


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(CHUNK_BYTES)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)  # zlib releases the GIL: files hash in parallel threads
    return crc


def _parallel(fn, paths: list[Path]) -> list:
    if len(paths) <= 1:
        return [fn(p) for p in paths]
    with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(fn, paths))


def record_checksums(folder: Path) -> dict:
    """Write `folder/checksums.json` for every file under `folder` (but itself and trainer_state.json)."""
    folder = Path(folder)
    paths = [p for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name not in (CHECKSUM_FILE, STATE_FILE)]
    crcs = _parallel(file_crc32, paths)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, ALGORITHM: crc}
             for p, crc in zip(paths, crcs)}
    record = {"algorithm": ALGORITHM, "files": files}
    write_text_atomic(folder / CHECKSUM_FILE, json.dumps(record, indent=1) + "\n")
    return record


def _recorded(folder: Path) -> tuple[dict[str, int], dict[str, int], str | None]:
    """(sizes, crc32s) by relative name from the folder's records, and a problem with the records."""
    sizes: dict[str, int] = {}
    crcs: dict[str, int] = {}
    for name in (STATE_FILE, CHECKSUM_FILE):
        path = folder / name
        if not path.is_file():
            continue
        try:
            files = json.loads(path.read_text()).get("files", {})
            for rel, entry in files.items():
                if isinstance(entry, dict):
                    sizes[rel], crcs[rel] = int(entry["size"]), int(entry[ALGORITHM])
                else:
                    sizes[rel] = int(entry)
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            return {}, {}, f"{path}: not valid JSON (damaged checkpoint record)"
    return sizes, crcs, None


def _size_problem(path: Path, size: int) -> str | None:
    if not path.is_file():
        return f"{path}: missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{path}: truncated ({actual} of {size} bytes)" if actual < size else \
            f"{path}: wrong size ({actual} bytes, {size} recorded)"
    return None


def _crc_problem(path: Path, crc: int) -> str | None:
    actual = file_crc32(path)
    if actual != crc:
        return f"{path}: content damaged (CRC-32 {actual:08x}, {crc:08x} recorded at save time)"
    return None


def folder_problem(folder: Path, content: bool = True) -> str | None:
    """None if every file the folder's records list is there with its size (and, with `content`,
    its checksum); else a one-line reason naming the first bad file. No records: None."""
    folder = Path(folder)
    sizes, crcs, problem = _recorded(folder)
    if problem:
        return problem
    for rel, size in sizes.items():
        if problem := _size_problem(folder / rel, size):
            return problem
    if content:
        names = sorted(crcs)
        for problem in _parallel(lambda rel: _crc_problem(folder / rel, crcs[rel]), names):
            if problem:
                return problem
    return None


def file_problem(folder: Path, file: Path, content: bool = True) -> str | None:
    """`folder_problem` for one file of `folder` (a reader checks what it is about to load)."""
    folder, file = Path(folder), Path(file)
    sizes, crcs, problem = _recorded(folder)
    if problem:
        return problem
    rel = file.relative_to(folder).as_posix()
    if rel in sizes and (problem := _size_problem(file, sizes[rel])):
        return problem
    if content and rel in crcs and file.is_file():
        return _crc_problem(file, crcs[rel])
    return None


def check_folder(folder: Path, content: bool = True) -> None:
    if problem := folder_problem(folder, content):
        raise CheckpointError(f"damaged checkpoint: {problem}")


def check_file(folder: Path, file: Path) -> None:
    if problem := file_problem(folder, file):
        raise CheckpointError(f"damaged checkpoint: {problem}")


def check_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    """Refuse a NaN/Inf tensor by name (`--allow-non-finite` lets them through)."""
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(f"{where}: tensor {name} holds {bad} non-finite value(s) (NaN/Inf) of "
                             f"{tensor.numel()}; pass --allow-non-finite to copy them anyway")
