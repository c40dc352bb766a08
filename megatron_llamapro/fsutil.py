"""Atomic output directories and terminal progress, shared by every tool.

An output is written into a hidden temporary folder beside it, `.{name}.tmp-{host}-{pid}-{random}`,
and renamed into place only when complete. On any error (a full or read-only disk, Ctrl-C, SIGTERM)
the temporary folder is removed and the output is left as it was. A folder left behind by a process
that was killed outright (kill -9, a node crash) is removed by the next run into the same output on
the same host, which says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from megatron_llamapro.errors import UserError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# Below this much free space a failed write is taken as a full disk even when the library that
# failed did not say so (torch.save reports "unexpected pos" from its zip writer).
_NEARLY_FULL_BYTES = 64 * 2**20


class OutputError(UserError):
    pass


def _host() -> str:
    return socket.gethostname().split(".")[0].replace("-", "_") or "host"


def temp_name(out: Path, kind: str = "tmp") -> str:
    """Name of a temporary sibling of `out` that records which process on which host owns it."""
    return f".{Path(out).name}.{kind}-{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def stale_temporaries(out: Path) -> list[tuple[Path, int]]:
    """Temporary siblings of `out` (folders or files) left by dead processes of this host."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    stale = []
    prefixes = tuple(f".{out.name}.{kind}-{_host()}-" for kind in ("tmp", "old"))
    for entry in out.parent.iterdir():
        for prefix in prefixes:
            if entry.name.startswith(prefix):
                pid_text = entry.name[len(prefix):].split("-", 1)[0].split(".", 1)[0]
                if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
                    stale.append((entry, int(pid_text)))
    return sorted(stale)


def remove_stale_temporaries(out: Path, log=None) -> list[Path]:
    """Remove what dead processes left beside `out` and say so (on stderr by default)."""
    removed = []
    for entry, pid in stale_temporaries(out):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
        message = f"note: removed {entry} (left by process {pid}, which is no longer running)"
        print(message, file=sys.stderr, flush=True) if log is None else log(message)
    return removed


def free_bytes(path: Path) -> int | None:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _errno_in_chain(exc: BaseException | None) -> int | None:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        # torch.distributed.checkpoint's CheckpointException carries each rank's exception
        for failure in (getattr(exc, "failures", None) or {}).values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            code = _errno_in_chain(inner) if isinstance(inner, BaseException) else None
            if code is not None:
                return code
        exc = exc.__cause__ or exc.__context__
    return None


NO_SPACE, READ_ONLY, NO_PERMISSION = "no space left on device", "read-only file system", "permission denied"


def disk_problem(exc: BaseException, target: Path) -> str | None:
    """NO_SPACE, READ_ONLY or NO_PERMISSION when `exc` came from the disk under `target` rather
    than from the program; None for anything else (see write_failure)."""
    code = _errno_in_chain(exc)
    free = free_bytes(target)
    if code in _NO_SPACE or (code is None and free is not None and free < _NEARLY_FULL_BYTES
                             and not isinstance(exc, (UserError, KeyboardInterrupt))):
        return NO_SPACE
    if code == errno.EROFS:
        return READ_ONLY
    if code in (errno.EACCES, errno.EPERM):
        return NO_PERMISSION
    return None


def write_failure(exc: BaseException, target: Path, flag: str | None = None) -> OutputError | None:
    """An OutputError naming `target` (and its flag) when `exc` came from the disk rather than the
    program: no space, a read-only file system, no permission. None for anything else."""
    from megatron_llamapro.errors import one_line

    problem = disk_problem(exc, target)
    where = f"{flag} {target}" if flag else str(target)
    cause = one_line(f"{type(exc).__name__}: {exc}")
    if problem == NO_SPACE:
        free = free_bytes(target)
        shown = f"{free / 2**20:.1f} MiB free" if free is not None else "no space"
        return OutputError(f"{where}: no space left on the device ({shown}); nothing was written, "
                           f"the previous contents are intact ({cause})")
    if problem == READ_ONLY:
        return OutputError(f"{where}: read-only file system; choose a writable directory")
    if problem == NO_PERMISSION:
        return OutputError(f"{where}: permission denied ({cause})")
    return None


def write_text_atomic(path: Path, text: str) -> None:
    """`path` gets `text` whole or not at all (a temp beside it, renamed): a full disk or a signal
    never leaves a half-written tracker, manifest or checksum record, nor the temp."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable_dir(path: Path, flag: str) -> None:
    """Write (then remove) a file in `path`, creating the folders that are missing for it and
    removing them again, so a check leaves nothing behind: an OutputError naming `flag` when that
    fails (read-only, no permission, full, or not a directory)."""
    shown, path = Path(path), Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {shown}: exists and is not a directory")
    created = []
    try:
        for folder in [*reversed(path.parents), path]:
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        fd, probe = tempfile.mkstemp(prefix=temp_name(path / "write-test"), dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise (write_failure(exc, shown, flag) or exc) from exc
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()


def check_output_dir(out: Path, overwrite: bool, flag: str = "--out") -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{flag} {out}: directory is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, flag: str = "--out"):
    """Yield a temporary directory beside `out`; rename it to `out` only if the block succeeds.

    On any error the temporary directory is removed and `out` is left as it was; a disk error
    (full, read-only, no permission) becomes one OutputError line naming `flag` and `out`.
    """
    out = Path(out).absolute()
    check_output_dir(out, overwrite, flag)
    remove_stale_temporaries(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_name(out), dir=out.parent))
    except OSError as exc:
        raise (write_failure(exc, out, flag) or exc) from exc
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(exc, out, flag)
        if failure is not None:
            raise failure from exc
        raise
    old = None
    if out.exists():
        old = out.parent / (temp_name(out, "old") + tmp.name.rsplit("-", 1)[-1])
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def progress(total: int | None, desc: str, unit: str = "tensor"):
    """A tqdm bar on a terminal, a silent counter otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty(), leave=False)
