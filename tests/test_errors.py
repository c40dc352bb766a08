"""The one error policy: every user-facing error class derives from UserError, every command goes
through errors.entry_point, and what a user sees is one line and the right exit status."""

from __future__ import annotations

import ast
import errno
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import megatron_llamapro
from megatron_llamapro import errors

REPO = Path(__file__).resolve().parents[1]
# Exceptions that are not about bad input: a rank's crash carried to the parent process, and
# SIGTERM/SIGHUP raised as an interruption (a KeyboardInterrupt, handled like Ctrl-C).
INTERNAL = {"megatron_llamapro.runtime.multiproc.RankFailure", "megatron_llamapro.errors.Interrupted"}


def _package_modules() -> list[str]:
    names = ["megatron_llamapro"]
    for info in pkgutil.walk_packages(megatron_llamapro.__path__, "megatron_llamapro."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return names


def test_every_exception_class_of_the_package_is_a_user_error():
    found = []
    for name in _package_modules():
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == name:
                qualified = f"{name}.{obj.__name__}"
                found.append(qualified)
                if qualified not in INTERNAL:
                    assert issubclass(obj, errors.UserError), f"{qualified} does not derive from UserError"
    assert len(found) >= 12, found  # the policy test must see the package's error classes


def _defines_main(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


@pytest.mark.parametrize("module", [m for m in _package_modules()
                                    if _defines_main(Path(importlib.util.find_spec(m).origin))])
def test_every_command_main_is_wrapped_by_entry_point(module):
    main = importlib.import_module(module).main
    # functools.wraps leaves the undecorated function in __wrapped__; entry_point's closure is 'wrapped'
    assert hasattr(main, "__wrapped__") and main.__qualname__ == main.__wrapped__.__qualname__, module
    assert main.__code__.co_name == "wrapped", f"{module}.main is not wrapped by errors.entry_point"


@pytest.mark.parametrize("tool", sorted(p.name for p in (REPO / "tools").glob("*.py")))
def test_every_tool_script_runs_a_wrapped_main(tool):
    text = (REPO / "tools" / tool).read_text()
    assert "run(main)" in text, f"tools/{tool} does not end in errors.run(main)"


def test_user_error_is_one_line_exit_2(capsys):
    @errors.entry_point
    def main(argv):
        raise errors.UserError("--flag x:\n  must be\tpositive")

    assert main([]) == 2
    assert capsys.readouterr().err == "error: --flag x: must be positive\n"


def test_verify_error_exits_1_and_prog_prefix(capsys):
    @errors.entry_point(prog="tool")
    def main(argv):
        raise errors.VerifyError("logits differ")

    assert main([]) == 1
    assert capsys.readouterr().err == "tool: error: logits differ\n"


def test_environment_oserror_names_the_path(capsys, tmp_path):
    @errors.entry_point
    def main(argv):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))

    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'out'}: No space left on device") and err.count("\n") == 1


def test_a_bug_keeps_its_traceback():
    @errors.entry_point
    def main(argv):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        main([])

    @errors.entry_point
    def other(argv):
        raise OSError(errno.EPIPE, "Broken pipe")

    with pytest.raises(OSError):
        other([])


def test_tokenizer_error_is_one_line_through_the_wrapper():
    """A TokenizerError escaped pretrain's own list of one-line errors as a traceback once."""
    code = ("import sys; from megatron_llamapro.errors import entry_point\n"
            "@entry_point\n"
            "def main(argv):\n"
            "    from megatron_llamapro.data.tokenizer import TokenizerError\n"
            "    raise TokenizerError('tokenizer.model: not a sentencepiece model')\n"
            "sys.exit(main([]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: tokenizer.model: not a sentencepiece model"], proc.stderr
