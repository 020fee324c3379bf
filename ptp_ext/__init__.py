"""ptp_ext: the kernels of ptp as torch custom ops (``torch.ops.ptp_ext.*``).

Importing this package loads the compiled library ``ptp_ext._C``, which registers the ops for the
CPU (and, when built with CUDA, the CUDA) dispatch key, and registers their fake implementations
so they trace under ``torch.compile``. Public wrappers live in :mod:`ptp_ext.ops`, pure-PyTorch
references in :mod:`ptp_ext.reference`.
"""
from __future__ import annotations

import torch  # noqa: F401  (the extension links against libtorch: load it first)

from . import _C  # noqa: F401  (registers torch.ops.ptp_ext.*)
from . import ops, reference
from .ops import gated_lora_linear, invariant_linear, sampler_mlp, tree_attention, verify_tree

__all__ = ["ops", "reference", "tree_attention", "verify_tree", "sampler_mlp", "invariant_linear", "gated_lora_linear", "with_cuda"]
__version__ = "0.1.0"


def with_cuda() -> bool:
    """True when the CUDA implementations were compiled into this build."""
    return bool(_C.with_cuda)
