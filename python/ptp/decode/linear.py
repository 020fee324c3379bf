"""Which kernel computes a linear layer in a decoding call: the one place that decides.

A projection of the target runs one of five kernels:

===========================  ===============================================================
``F.linear`` (BLAS)          calls that need no row invariance (the prefill, GPU calls)
``invariant_linear``         row-invariant calls over float weights (each output row one fixed
                             sequence of float32 operations, whatever the call's row count)
``quant_linear``             the same, reading the layer's GGUF blocks (:mod:`ptp.decode.quant`;
                             bitwise the float32 result from a quarter of the bytes)
``gated_lora_linear``        a gated-LoRA layer (:class:`ptp.decode.lora.GatedLoRALinear`) whose
                             aux rows are a suffix of every batch row: base + adapter in one op
``gated_lora_quant_linear``  the same over the base layer's GGUF blocks
===========================  ===============================================================

:class:`LinearPlan` holds one layer's choice of weights (float or blocks) and makes the decision
per call; the decode fast path (:mod:`ptp.decode.fastpath`) calls the plans directly.
:class:`LinearRouter` gives the HF forward the same plans for the duration of a ``generate``:
it swaps every plain ``nn.Linear`` child of the model for a :class:`RoutedLinear` that shares its
parameters (the same pattern as the gated-LoRA wrappers) and restores the originals on exit.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ptp_ext import ops

from ptp.decode.lora import GatedLoRALinear
from ptp.decode.quant import QuantWeight, quantized_weights

__all__ = ["LinearPlan", "LinearRouter", "RoutedLinear"]


def _contiguous(w: torch.Tensor) -> torch.Tensor:
    return w if w.is_contiguous() else w.contiguous()


class LinearPlan:
    """One projection's kernel choice. ``plan(x, invariant)``: ``invariant`` says whether this
    call must be row-invariant (then an op of ``ptp_ext``, else BLAS).

    ``module`` is an ``nn.Linear``, a :class:`GatedLoRALinear` over one, or any other module
    (called as it is). ``quant`` maps ``nn.Linear`` -> :class:`QuantWeight` (the model's attached
    GGUF blocks); a layer whose weight changed since its blocks were checked keeps float32.
    """

    __slots__ = ("module", "linear", "lora", "qweight", "format")

    def __init__(self, module: nn.Module, quant: Optional[dict] = None):
        self.module = module
        self.lora = isinstance(module, GatedLoRALinear) and type(module.base) in (nn.Linear, RoutedLinear)
        base = module.base if self.lora else module
        if isinstance(base, RoutedLinear):
            base = base.layer
        self.linear: Optional[nn.Linear] = base if type(base) is nn.Linear else None
        qw: Optional[QuantWeight] = (quant or {}).get(self.linear) if self.linear is not None else None
        if qw is not None and not qw.matches(self.linear.weight):
            qw = None  # the weight changed since its blocks were checked: float32 path
        self.qweight = qw.qweight if qw is not None else None
        self.format = qw.format if qw is not None else None

    def base(self, x: torch.Tensor, invariant: bool) -> torch.Tensor:
        """The (base) layer alone: BLAS, or the row-invariant op over blocks or float weights."""
        lin = self.linear
        if not invariant:
            return F.linear(x, lin.weight, lin.bias)
        if self.qweight is not None and x.dtype == torch.float32:
            return ops.quant_linear(x, self.qweight, self.format, lin.bias)
        return ops.invariant_linear(x, _contiguous(lin.weight), lin.bias)

    def __call__(self, x: torch.Tensor, invariant: bool) -> torch.Tensor:
        lin = self.linear
        if lin is None:
            return self.module(x)
        if not self.lora:
            return self.base(x, invariant)
        m: GatedLoRALinear = self.module
        gate = m.gate
        if gate.index is None:
            return self.base(x, invariant)  # adapter off: exactly the base layer
        if (invariant and gate.suffix is not None and x.dim() == 3 and x.is_contiguous()
                and not torch.is_grad_enabled()):
            # aux rows a suffix of every batch row: one op, the base rows bitwise those of the
            # gate-off call (instead of ~10 small ops per layer)
            if self.qweight is not None and x.dtype == torch.float32:
                return ops.gated_lora_quant_linear(x, self.qweight, self.format, lin.bias, m.lora_A,
                                                   m.lora_B, m.scale, gate.suffix)
            return ops.gated_lora_linear(x, _contiguous(lin.weight), lin.bias, m.lora_A, m.lora_B,
                                         m.scale, gate.suffix)
        return m.add_delta(x, self.base(x, invariant))


class RoutedLinear(nn.Module):
    """An ``nn.Linear`` stand-in that asks its :class:`LinearRouter` which kernel to run. It
    shares the layer's parameters (``weight`` / ``bias`` are the same tensors)."""

    def __init__(self, layer: nn.Linear, router: "LinearRouter", plan: LinearPlan):
        super().__init__()
        # not a registered child: the model's modules() / state_dict() stay those of the model
        self.__dict__["layer"] = layer
        self.router = router
        self.plan = plan

    weight = property(lambda self: self.layer.weight)
    bias = property(lambda self: self.layer.bias)
    in_features = property(lambda self: self.layer.in_features)
    out_features = property(lambda self: self.layer.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plan(x, self.router.wants(x))


class LinearRouter:
    """Routes the linear layers of the HF forward through :class:`LinearPlan` inside the context.

    ``active`` (set by the decoder around its decoding calls): every call is row-invariant.
    Otherwise calls of at most ``small_rows`` rows still take the ops (drafters' own calls: not
    needed for exactness, but the ops read the weights once and beat BLAS there) and larger
    calls (the prefill) keep BLAS. Gated-LoRA wrappers get their plan too (``m.router``).
    """

    def __init__(self, model: nn.Module, small_rows: int = 32):
        self.model = model
        self.active = False
        self.small_rows = int(small_rows)
        self._quant = quantized_weights(model)
        self._swapped: list[tuple[nn.Module, str, nn.Linear]] = []
        self._lora: list[GatedLoRALinear] = []

    def wants(self, x: torch.Tensor) -> bool:
        """Whether a linear layer's call on ``x`` must take a row-invariant op."""
        return self.active or (x.dim() > 0 and x.numel() <= self.small_rows * x.shape[-1])

    def wants_rows(self, rows: int) -> bool:
        """:meth:`wants` for an input of ``rows`` rows (without the tensor)."""
        return self.active or rows <= self.small_rows

    def __enter__(self) -> "LinearRouter":
        for parent in list(self.model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    routed = RoutedLinear(child, self, LinearPlan(child, self._quant))
                    parent._modules[name] = routed
                    self._swapped.append((parent, name, child))
        for m in self.model.modules():
            if isinstance(m, GatedLoRALinear):
                m.router = (self, LinearPlan(m, self._quant))
                self._lora.append(m)
        return self

    def __exit__(self, *exc) -> None:
        for parent, name, child in reversed(self._swapped):
            parent._modules[name] = child
        for m in self._lora:
            m.router = None
        self._swapped.clear()
        self._lora.clear()
        self.active = False
