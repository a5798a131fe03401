"""Writing and removing outputs: whole or not at all, and only where dtm may write.

Every file or directory dtm writes goes through :func:`write_atomic` (a file) or
:func:`replace_atomic` (a file or a directory such as a zarr group): the new result is
written beside its destination under a temporary name unique to the process, flushed to
disk (``fsync``), and only then renamed onto the destination, so the old result stays until
the new one is complete and a crash never leaves a half-written result that looks whole.

Every path dtm creates or deletes is first checked by :func:`check_inside` to lie inside
its output directory (or a path the user named for Leopard-EM map outputs), following
symbolic links: a micrograph name such as ``../../victim`` or a link in ``output_dir`` can
never make dtm write or delete outside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from dtm.errors import OutputError

StrPath = str | os.PathLike[str]


def check_inside(path: StrPath, roots: StrPath | Iterable[StrPath]) -> Path:
    """``path``, after checking that it lies inside one of ``roots`` (or is one of them).

    Both are resolved (``..`` and symbolic links followed, as far as they exist), so a path
    that leaves its root by either is refused.

    Raises
    ------
    OutputError
        ``path`` lies outside every root.
    """
    path = Path(path)
    if isinstance(roots, str | os.PathLike):
        roots = [roots]
    resolved = Path(os.path.realpath(path))
    allowed = [Path(os.path.realpath(root)) for root in roots]
    if not any(resolved == root or resolved.is_relative_to(root) for root in allowed):
        where = ", ".join(str(root) for root in allowed)
        raise OutputError(f"{path}: refused to write or delete outside {where}")
    return path


def temporary_name(path: StrPath, suffix: str = "tmp") -> Path:
    """A hidden name beside ``path``, unique to this process and call."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.{suffix}"


def flush_to_disk(path: Path) -> None:
    """Flush a file, or every file and directory of a tree, to disk (best effort on file
    systems that refuse to fsync a directory)."""
    if path.is_dir() and not path.is_symlink():
        for folder, _, files in os.walk(path):
            for name in files:
                flush_to_disk(Path(folder) / name)
            _fsync_fd(folder, os.O_RDONLY | os.O_DIRECTORY)
    elif path.is_file():
        _fsync_fd(path, os.O_RDONLY)


def _fsync_fd(path: StrPath, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2``); False where the
    system or the file system cannot."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        renameat2 = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    status = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return bool(status == 0)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def move_into_place(temporary: StrPath, final: StrPath) -> None:
    """Rename a complete ``temporary`` (file or directory) onto ``final``, replacing it.

    A file replaces a file in one ``rename``. A directory is swapped with the old one in one
    step where the system can (``renameat2(RENAME_EXCHANGE)``); elsewhere the old one is
    first renamed aside, so that it survives (under a hidden name) a crash between the two
    renames. The old result is removed only once the new one is in place.
    """
    temporary, final = Path(temporary), Path(final)
    if not (final.is_dir() and not final.is_symlink()):
        os.replace(temporary, final)
        return
    if _exchange(temporary, final):
        _remove(temporary)  # now the old result
        return
    backup = temporary_name(final, "old")
    os.replace(final, backup)
    os.replace(temporary, final)
    _remove(backup)


def replace_atomic(
    path: StrPath,
    write: Callable[[str], None],
    *,
    root: StrPath | Iterable[StrPath] | None = None,
    temporary: StrPath | None = None,
) -> None:
    """Call ``write(temporary_path)`` to make a file or a directory, then move it onto
    ``path`` (:func:`move_into_place`). The temporary is removed if anything fails.

    Parameters
    ----------
    path
        The destination; missing parent directories are created.
    write
        Writes the new result at the path it is given (which does not exist yet).
    root
        Where ``path`` must lie (:func:`check_inside`); not checked when None.
    temporary
        Where to write first (default: a hidden name beside ``path``); it must be on the
        same file system and unique to this call.
    """
    path = Path(path)
    if root is not None:
        check_inside(path, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = temporary_name(path) if temporary is None else Path(temporary)
    try:
        write(str(scratch))
        flush_to_disk(scratch)
        move_into_place(scratch, path)
        _fsync_fd(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except BaseException:
        _remove(scratch)
        raise


def write_atomic(
    path: Path,
    write: Callable[[str], None],
    *,
    root: StrPath | Iterable[StrPath] | None = None,
) -> None:
    """Call ``write(temporary_path)``, then rename the result onto ``path`` in one step.

    The temporary file lies beside ``path`` (same file system, so the rename is atomic) under
    a name unique to the process, which gives it the umask's permissions (``mkstemp`` would
    make it private). It is flushed to disk before the rename and removed if ``write``
    fails. ``root``: see :func:`replace_atomic`.
    """
    replace_atomic(path, write, root=root)


def remove_output(path: StrPath, root: StrPath | Iterable[StrPath]) -> None:
    """Delete a file or directory that dtm wrote, after :func:`check_inside`; a symbolic
    link is removed itself, never what it points to."""
    path = Path(os.path.normpath(path))
    check_inside(path.parent, root)
    roots = [root] if isinstance(root, str | os.PathLike) else list(root)
    if any(os.path.realpath(path) == os.path.realpath(item) for item in roots):
        raise OutputError(f"{path}: refused to delete the output directory itself")
    _remove(path)
