"""ptp_ext: the kernels of ptp as torch custom ops (``torch.ops.ptp_ext.*``).

Importing this package loads the compiled library ``ptp_ext._C``, which registers the ops for the
CPU (and, when built with CUDA, the CUDA) dispatch key, and registers their fake implementations
and autograd rules so they trace under ``torch.compile``. It never imports transformers.

Public API
----------
Ops (documented wrappers in :mod:`ptp_ext.ops`, re-exported here):

* :func:`tree_attention` -- attention of draft chains / trees over a static KV cache
* :func:`verify_tree` -- greedy / coupled (PTP) / rejection verification of draft trees
* :func:`sampler_mlp` -- the fused sampler head of the masked-input drafter
* :func:`invariant_linear` -- row-invariant ``x @ weight.T + bias`` (differentiable)
* :func:`gated_lora_linear` -- invariant_linear + a LoRA delta on a suffix of rows (differentiable)
* :func:`quant_linear` -- invariant_linear over GGUF Q8_0 / Q4_1 blocks (inference-only)
* :func:`gated_lora_quant_linear` -- gated_lora_linear over GGUF blocks (inference-only)
* :func:`decode_step` -- a Llama-family decoding call's whole layer stack in one op (CPU only)
* :func:`decode_linear` -- one linear in decode_step's arithmetic: the decoding LM head (CPU only)

Modules: :mod:`ptp_ext.ops` (the wrappers), :mod:`ptp_ext.reference` (``<op>_ref``: pure
PyTorch, the executable specification; ``sampling_probs`` and ``pick`` define ptp's sampling).
:func:`with_cuda` tells whether this build holds the CUDA kernels.
"""
from __future__ import annotations

import torch  # noqa: F401  (the extension links against libtorch: load it first)

from . import _C  # noqa: F401  (registers torch.ops.ptp_ext.*)
from . import ops, reference
from .ops import (decode_linear, decode_step, gated_lora_linear, gated_lora_quant_linear, invariant_linear,
                  quant_linear, sampler_mlp, tree_attention, verify_tree)

__all__ = ["ops", "reference", "tree_attention", "verify_tree", "sampler_mlp", "invariant_linear",
           "gated_lora_linear", "quant_linear", "gated_lora_quant_linear", "decode_step", "decode_linear",
           "with_cuda"]
__version__ = "0.1.0"


def with_cuda() -> bool:
    """True when the CUDA implementations were compiled into this build."""
    return bool(_C.with_cuda)
