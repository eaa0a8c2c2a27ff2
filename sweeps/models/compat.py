"""What differs between the transformers releases lora-sweep supports, bridged in one place."""

from __future__ import annotations

import torch


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained``/``from_config`` keyword for ``dtype`` in the installed transformers.

    transformers >= 4.56 calls it ``dtype``; older releases call it ``torch_dtype``.
    """
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
