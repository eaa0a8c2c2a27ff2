"""What every benchmark does with its result: print the JSON, and write it to ``--out`` when given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: Any, out: Path | None) -> int:
    """Print ``result`` as indented JSON; also write it to ``out`` (its folder created). Returns 0."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0
