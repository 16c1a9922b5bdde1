"""Where ``cppo-mask`` writes, made safe: every output path is checked before any work,
``--out`` is written to a temporary file beside it and renamed when complete, and the
temporary file is removed on errors and on SIGTERM/SIGHUP/SIGINT.

Decisions:

- ``--force`` replaces a regular file only. A symbolic link is refused (replacing it
  would delete the link, not write through it: ``--out /dev/stdout --force`` once
  replaced the ``/dev/stdout`` link); so are directories, FIFOs, sockets and devices.
- The temporary file is ``.<name>.cppo-<pid>.part`` in ``--out``'s directory. After a
  SIGKILL (which no process can catch) it stays; the next run on the same ``--out``
  removes such files whose process is gone and says so on stderr (files of a live
  process, e.g. a concurrent run, are left alone).
"""

from __future__ import annotations

import os
import re
import signal
import stat
import sys
import threading
from typing import Optional


class CliError(Exception):
    """A user-facing error: printed as one line ``cppo-mask: error: ...``, exit status 2."""


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM/SIGHUP so that clean-up code runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, without ``[Errno N]`` prefixes."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename!r}" if exc.filename else "")
    else:
        text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_out(out: str, force: bool, input_path: Optional[str]) -> None:
    """``--out``: a writable directory, and a path that is free or (with ``--force``) a
    regular file that is not the input."""
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise CliError(f"output directory {out_dir!r} does not exist")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise CliError(f"cannot write to the output directory {out_dir!r} (permission denied)")
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise CliError(f"output {out!r} is {_kind(st.st_mode)}; --out must be a new path or (with --force) "
                       "a regular file")
    if not force:
        raise CliError(f"output {out!r} exists; pass --force to replace it")
    if input_path is not None and os.path.exists(input_path) and os.path.samefile(input_path, out):
        raise CliError("--out must differ from the input file")


def check_summary_json(path: str) -> None:
    """``--summary-json``: a writable file (``/dev/stdout`` and other non-directories
    are fine: it is written in place, after the run)."""
    if os.path.isdir(path):
        raise CliError(f"--summary-json {path!r} is a directory; give a file name")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise CliError(f"--summary-json {path!r} is not writable (permission denied)")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CliError(f"--summary-json: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"--summary-json: cannot write to directory {parent!r} (permission denied)")


def check_plot_dir(path: str) -> None:
    """``--plot``: an existing writable directory, or one that can be created."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise CliError(f"--plot {path!r} exists and is not a directory; give a directory for the PNG files")
    base = _existing_ancestor(path)
    if not os.path.isdir(base):
        raise CliError(f"--plot {path!r}: {base!r} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise CliError(f"--plot {path!r}: cannot write to {base!r} (permission denied)")


# ---------------------------------------------------------------------------------------
# The temporary file beside --out.


def _part_pattern(out: str) -> "re.Pattern":
    return re.compile(re.escape(f".{os.path.basename(out)}.cppo-") + r"(\d+)\.part")


def part_path(out: str, pid: Optional[int] = None) -> str:
    """``dir/.<name>.cppo-<pid>.part``: recognisable as ours, and whose process."""
    pid = os.getpid() if pid is None else pid
    return os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.cppo-{pid}.part")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_parts(out: str) -> list:
    """Removes temporary files of ``out`` left by processes that are gone (SIGKILL,
    power loss); returns their paths. Our own pid's leftover (from an earlier run in
    this process) counts as stale too."""
    out_dir = os.path.dirname(os.path.abspath(out))
    pattern = _part_pattern(out)
    removed = []
    try:
        names = os.listdir(out_dir)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _alive(pid):
            continue
        path = os.path.join(out_dir, name)
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def create_part(out: str) -> str:
    """Creates the empty temporary file for ``out`` (mode 0666 less the umask)."""
    path = part_path(out)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    return path


def commit_part(part: str, out: str) -> None:
    """Renames the complete temporary file over ``out`` (checked again: a regular file
    or nothing)."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise CliError(f"output {out!r} became {_kind(st.st_mode)} during the run; not replaced")
        # Unlink first: on ext4, renaming over an existing file forces the new file's
        # data to disk first (auto_da_alloc), ~1 s per GB.
        os.unlink(out)
    os.replace(part, out)


# ---------------------------------------------------------------------------------------
# Signals.

CAUGHT_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)


class SignalGuard:
    """While active (in the main thread), SIGTERM and SIGHUP raise :class:`Terminated`
    in the main thread, so ``finally`` blocks remove the temporary file; the previous
    handlers are restored on exit."""

    def __init__(self) -> None:
        self.previous: dict = {}

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for s in CAUGHT_SIGNALS:
                self.previous[s] = signal.signal(s, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame) -> None:
        raise Terminated(signum)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def note(text: str) -> None:
    print(f"cppo-mask: {text}", file=sys.stderr)
