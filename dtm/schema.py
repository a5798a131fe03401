"""Names that every layer shares: what a run writes, and where.

The one place where these names are written; every module that reads or writes them
imports them from here.
"""

from __future__ import annotations

import hashlib


def token(name: str) -> str:
    """A short token for a name, used in task keys and checkpoint folders.

    It always holds a digit, so Dask's ``key_split`` drops it and the dashboard groups the
    tasks by their readable prefix (``correlate``, ``merge``, …).
    """
    return "0" + hashlib.sha1(name.encode()).hexdigest()[:11]
