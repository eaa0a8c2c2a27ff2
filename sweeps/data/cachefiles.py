"""Small JSON cache files written atomically (temporary file + rename): readers never see half a file."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def write_json_atomic(path: Path, payload: Any, what: str) -> bool:
    """Write ``payload`` as compact JSON to ``path``. A failure only logs a warning naming ``what``
    (a cache that cannot be written is rebuilt next time) and returns False."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=False, separators=(",", ":"))
        os.replace(tmp, path)
        tmp = None
        return True
    except (OSError, UnicodeError) as exc:
        logger.warning("could not write the %s %s: %s", what, path, exc)
        return False
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
