"""Writing output files atomically.

Every file sparse-ops (and bench/) writes goes through :func:`atomic_output`: written
under a hidden temporary name in the same folder, then renamed over the target, so a
reader never sees half a file. The temporary name says what it is and whose it was
(``.<name>.sparse-ops-tmp-<pid>``): SIGTERM removes it before the process dies, and the
next write to the same target removes those a SIGKILLed process left.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import OutputPathError, first_line

TEMP_TAG = ".sparse-ops-tmp-"
_pending: set[Path] = set()
_previous_sigterm: Any = None


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_TAG}{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it replaces
    ``path`` in one rename, on any failure (or SIGTERM) it is removed.

    Raises :class:`OutputPathError` naming ``path`` when it cannot hold a file."""
    path = Path(path)
    check_output_file(path)
    _remove_stale_temps(path)
    tmp = temp_path(path)
    _pending.add(tmp)
    _hook_sigterm()
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # temp files may be private; the result is not
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputPathError(f"{path}: cannot write ({first_line(exc)})") from None
    finally:
        _pending.discard(tmp)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path(path).write_text(text)``, atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _remove_stale_temps(path: Path) -> None:
    """Temporary files of ``path`` whose writer no longer runs (killed mid-write)."""
    try:
        candidates = list(path.parent.glob(f".{glob.escape(path.name)}{TEMP_TAG}*"))
    except OSError:
        return
    for stale in candidates:
        pid = stale.name.rpartition(TEMP_TAG)[2]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            stale.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _hook_sigterm() -> None:
    """Install (once) a SIGTERM handler that removes pending temporary files, then lets
    the signal do what it did before (by default: end the process)."""
    global _previous_sigterm
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            return
        _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # no signals here (embedded interpreter)
        _previous_sigterm = None


def _on_sigterm(signum, frame) -> None:
    global _previous_sigterm
    for tmp in list(_pending):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    previous, _previous_sigterm = _previous_sigterm, None
    signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    else:  # SIG_DFL or SIG_IGN: deliver again, now that it is restored
        os.kill(os.getpid(), signum)


def check_output_file(path: Path) -> None:
    """Make ``path``'s folders; refuse a path that is a folder, a device or below a file."""
    if path.is_dir():
        raise OutputPathError(f"{path}: is a directory; give a file name to save to")
    if path.exists() and not path.is_file():
        raise OutputPathError(f"{path}: exists and is not a regular file; not replacing it")
    parent = path.parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputPathError(f"{path}: {ancestor} is a file, not a directory")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"{path}: cannot create {parent} ({first_line(exc)})") from None


def _umask() -> int:
    """The process umask, read without setting it (os.umask would change it for a moment,
    under any thread creating files meanwhile) where /proc allows."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
