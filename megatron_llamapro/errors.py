"""One error policy for the whole package.

Every error the user can fix (a bad flag, a damaged or inconsistent checkpoint, a full disk, a
malformed input line) is a `UserError`: its message alone, on one line, tells what is wrong and
where. Every command-line entry point (the tools/ scripts and `python -m megatron_llamapro.*`) runs
through `entry_point`, which prints a `UserError` as `error: <message>` and exits with status 2.
Anything else is a bug and keeps its traceback.

`UserError` is a ValueError so that library callers that already catch ValueError keep working.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
import warnings
from typing import Callable

EXIT_OK = 0
EXIT_FAILED = 1            # a bug (traceback), or a verification that found a difference
EXIT_BAD_INPUT = 2         # a UserError: one line on stderr
EXIT_PREEMPTED = 75        # training stopped by a signal or time limit after saving: requeue


class UserError(ValueError):
    """An error whose message is a complete one-line explanation for the user. `quiet`: another
    process of the same job (rank 0) prints it; this one only exits with its status."""

    exit_code = EXIT_BAD_INPUT
    quiet = False


class VerifyError(UserError):
    """A converted checkpoint whose logits do not match its source."""

    exit_code = EXIT_FAILED


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is so that its clean-up runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


# What `kill`, Slurm (scancel, time limit, requeue) and a closed terminal send. The trainer
# replaces SIGTERM's handler with its own (save, then exit 75) first thing.
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def one_line(message: object) -> str:
    text = " ".join(str(message).split())
    return text or "unknown error"


def quiet_libraries() -> None:
    """Silence import-time chatter of megatron-core / torch / transformers (optional kernels,
    deprecations) so a tool's stderr holds only its own lines. LLAMAPRO_WARNINGS=1 keeps them."""
    if os.environ.get("LLAMAPRO_WARNINGS") == "1":
        return
    for module in (r"megatron(\..*)?", r"torch(\..*)?", r"transformers(\..*)?", r"tqdm(\..*)?"):
        warnings.filterwarnings("ignore", module=module)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    for name in ("megatron", "torch.distributed", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


# Errors of the environment the user fixes (a missing path, a full or read-only disk, permissions);
# other OSErrors (a broken pipe, a socket) keep their traceback.
_ENVIRONMENT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                       errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EEXIST, errno.ENOTEMPTY}


def environment_error(exc: OSError) -> str | None:
    """One line naming the path and the problem, for an OSError the user can fix; else None."""
    if exc.errno not in _ENVIRONMENT_ERRNOS:
        return None
    where = exc.filename if exc.filename is not None else None
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free space or choose another output directory)"
    return one_line(f"{where}: {reason}" if where is not None else reason)


def report(exc: UserError, prog: str | None = None) -> int:
    """Print a user error as one `error:` line (unless it is quiet); return its exit status."""
    if exc.quiet:
        return exc.exit_code
    print(f"{prog + ': ' if prog else ''}error: {one_line(exc)}", file=sys.stderr, flush=True)
    return exc.exit_code


def entry_point(main: Callable[[list[str] | None], int | None] | None = None, *, prog: str | None = None):
    """Wrap a command's main(argv): a UserError becomes one `error:` line (after `prog: ` when
    given) and its exit status; Ctrl-C, SIGTERM and SIGHUP interrupt it like Ctrl-C (clean-up
    runs), say so in one line and exit 128 + the signal number; an OSError of the environment
    (missing path, full or read-only disk) names the path; anything else propagates with its
    traceback. Use as `@entry_point` or `@entry_point(prog="name")`."""
    if main is None:
        return functools.partial(entry_point, prog=prog)
    prefix = f"{prog}: " if prog else ""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        quiet_libraries()
        previous = {}
        try:
            for sig in TERMINATING_SIGNALS:
                previous[sig] = signal.signal(sig, _raise_interrupted)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            return int(main(argv) or 0)
        except UserError as exc:
            return report(exc, prog)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            print(f"{prefix}error: interrupted by {signal.Signals(signum).name}; no output written",
                  file=sys.stderr, flush=True)
            return 128 + signum
        except OSError as exc:
            message = environment_error(exc)
            if message is None:
                raise
            print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return wrapped


def run(main: Callable[[list[str] | None], int]) -> None:
    """`if __name__ == "__main__": run(main)` for an `entry_point`-wrapped main."""
    sys.exit(main(None))
