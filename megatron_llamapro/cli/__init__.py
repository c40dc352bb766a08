"""Shared command-line plumbing for the tools: dtype/size parsing, summaries, memory tuning.

Every tool's `main(argv)` is wrapped by `errors.entry_point` (one `error:` line for a UserError,
exit status 2; a failed verification exits 1; anything else is a bug and keeps its traceback).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from megatron_llamapro.errors import UserError

DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}


def tune_malloc(threshold: int = 1 << 20) -> bool:
    """glibc: serve allocations of `threshold` bytes or more with mmap, so a freed tensor's memory
    goes back to the OS at once. For checkpoint conversion only (not training loops, whose
    per-step activations would then be re-faulted every step).

    glibc's default threshold adapts upward (to 32 MB) after large frees, after which
    weight-sized buffers come from the heap; read / fuse / free then fragments it, and a 1.9 GB
    conversion peaked anywhere between 2.1 and 2.6 GB from run to run. Returns whether it applied;
    an explicit MALLOC_MMAP_THRESHOLD_ in the environment wins.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        return False


# ---- argument types ----------------------------------------------------------------------------

def parse_dtype(text: str | None) -> str | None:
    """'bf16' | 'fp16' | 'fp32' (torch-style names accepted); None stays None."""
    if text is None:
        return None
    key = str(text).strip().lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise UserError(f"--dtype {text}: must be one of bf16, fp16, fp32")
    return DTYPE_ALIASES[key]


def dtype_arg(text: str) -> str:
    import argparse

    try:
        return parse_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes (transformers' convention: KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise UserError(f"size {text!r}: expected a number with an optional unit (e.g. 5GB, 500MB)")
    unit = (match.group(2) or "").lower()
    unit = unit[:-1] if unit.endswith("b") and unit != "b" else unit
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise UserError(f"size {text!r}: must be positive")
    return value


def size_arg(text: str) -> int:
    import argparse

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def require_distinct(src: Path, out: Path, src_flag: str, out_flag: str = "--out") -> None:
    if Path(src).resolve() == Path(out).resolve():
        raise UserError(f"{out_flag} {out}: must differ from {src_flag}")


def note_unused_tokenizer(flag_value: Path | None, source) -> None:
    """Say so when --tokenizer-model is not used because the checkpoint carries its own tokenizer."""
    if flag_value is None:
        return
    from megatron_llamapro.checkpoint.manifest import resolve_tokenizer

    if source.tokenizer_dir() != resolve_tokenizer(flag_value):
        print(f"note: --tokenizer-model {flag_value} not used: {source.path} carries its own tokenizer "
              f"({source.tokenizer_dir()})")


# ---- summaries ---------------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def dir_stats(path: Path) -> tuple[int, int]:
    """(files, bytes) under a directory."""
    files = total = 0
    for item in Path(path).rglob("*"):
        if item.is_file():
            files += 1
            total += item.stat().st_size
    return files, total


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def summary_line(out: Path, seconds: float, what: str) -> str:
    files, total = dir_stats(out)
    rate = total / seconds / 1e9 if seconds > 0 else 0.0
    return (f"{what}: {out} | {files} files, {human_bytes(total)} in {seconds:.1f} s "
            f"({rate:.2f} GB/s)")
