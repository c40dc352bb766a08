"""Atomic output directories and terminal progress, shared by every tool."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

from megatron_llamapro.errors import UserError


class OutputError(UserError):
    pass


def check_output_dir(out: Path, overwrite: bool, flag: str = "--out") -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{flag} {out}: directory is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, flag: str = "--out"):
    """Yield a temporary directory beside `out`; rename it to `out` only if the block succeeds.

    On any error the temporary directory is removed and `out` is left as it was.
    """
    out = Path(out).absolute()
    check_output_dir(out, overwrite, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def progress(total: int | None, desc: str, unit: str = "tensor"):
    """A tqdm bar on a terminal, a silent counter otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty(), leave=False)
