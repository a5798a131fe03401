"""Write a file so that it appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, then rename the result onto ``path`` in one step.

    The temporary file lies beside ``path`` (same file system, so the rename is atomic) under
    a unique name, which gives it the umask's permissions (``mkstemp`` would make it private).
    It is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        write(str(temporary))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
