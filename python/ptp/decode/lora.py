"""Gated LoRA: a low-rank adapter that acts only on the rows flagged as auxiliary.

For every wrapped ``nn.Linear`` ``W``: ``y = W x`` on all rows, then ``y[r] += s * B (A x[r])`` on
the auxiliary rows ``r`` only (a slice add when the aux rows are a common suffix of every batch
row, the layout of the decoder and the packed forwards; ``index_select`` + ``index_add``
otherwise; never a multiplication by a 0/1 gate), so real-token rows are *bit-identical* with
the adapter on and off. In the decoder's row-invariant CPU calls (:mod:`ptp.decode.linear`)
the suffix case is one op, ``ptp_ext.ops.gated_lora_linear`` (base rows bitwise the op's
``invariant_linear``, as the base layer computes them there). That makes a
self-speculative drafter (the target plus this adapter) verify exactly.

The rows travel with the forward through a :class:`LoRAGate` shared by all wrapped layers: set it
with ``with gate.rows(mask): model(...)`` where ``mask`` is a bool ``[batch, seq]`` tensor that
marks the auxiliary rows of the inputs of that forward. Outside the ``with`` block (or with an
all-False mask) the adapter is off and the model is exactly the base model.

Generic: used by the PTP drafter (auxiliary u-slots) and by the masked-input drafter (mask tokens).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn

__all__ = [
    "LoRAConfig",
    "LoRAGate",
    "GatedLoRALinear",
    "apply_gated_lora",
    "lora_parameters",
    "lora_state_dict",
    "load_lora_state_dict",
    "lora_num_parameters",
]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    """Rank, scaling (``alpha / rank``) and which ``nn.Linear`` names (last path component) to wrap."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def coerce(cls, value) -> "LoRAConfig":
        """A LoRAConfig from itself or from its JSON dict (``targets`` as a list)."""
        if isinstance(value, dict):
            d = dict(value)
            d["targets"] = tuple(d.get("targets", DEFAULT_TARGETS))
            return cls(**d)
        return value


def config_dict(config) -> dict:
    """JSON-ready ``asdict`` of a drafter config dataclass holding a ``lora`` field."""
    from dataclasses import asdict

    d = asdict(config)
    d["lora"]["targets"] = list(d["lora"]["targets"])
    return d


class LoRAGate:
    """The auxiliary-row flag shared by every :class:`GatedLoRALinear` of one model.

    ``index`` holds the flat row indices (into ``batch * seq``) of the current forward's
    auxiliary rows, or ``None`` when the adapter is off.
    """

    def __init__(self) -> None:
        self.index: Optional[torch.Tensor] = None
        # fast path: the aux rows are the same suffix ``[suffix:]`` of every batch row (the
        # decoder's and the packed forwards' layout): a slice add instead of a scatter
        self.suffix: Optional[int] = None

    @contextlib.contextmanager
    def rows(self, aux_mask: Optional[torch.Tensor]) -> Iterator[None]:
        """Turn the adapter on for the rows where ``aux_mask [batch, seq]`` (bool) is True."""
        previous = (self.index, self.suffix)
        self.suffix = None
        if aux_mask is None:
            self.index = None
        else:
            if aux_mask.dtype != torch.bool or aux_mask.dim() != 2:
                raise ValueError(
                    f"aux_mask must be bool [batch, seq], got {aux_mask.dtype} {list(aux_mask.shape)}")
            idx = aux_mask.reshape(-1).nonzero().squeeze(1)
            self.index = idx if idx.numel() else None
            if self.index is not None:
                first = int(aux_mask[0].long().argmax())
                if bool(aux_mask[:, first:].all()) and not bool(aux_mask[:, :first].any()):
                    self.suffix = first
        try:
            yield
        finally:
            self.index, self.suffix = previous

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        with self.rows(None):
            yield


class GatedLoRALinear(nn.Module):
    """``base(x)`` on every row plus ``scale * B(A x)`` on the gate's auxiliary rows only."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, gate: LoRAGate) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.gate = gate
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # (router, plan) while ptp.decode.linear.LinearRouter routes the model's linears: the
        # plan decides the kernel (one op for base + adapter where it can)
        self.router = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is not None:
            router, plan = self.router
            return plan(x, router.wants(x))
        if self.gate.index is None:
            return self.base(x)
        return self.add_delta(x, self.base(x))

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base layer's output on ``x``) plus the adapter's delta on the aux rows."""
        idx, s = self.gate.index, self.gate.suffix
        if s is not None and x.dim() == 3:
            tail = x[:, s:]
            delta = (tail.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
            if torch.is_grad_enabled() and (y.requires_grad or delta.requires_grad):
                head = y[:, :s]
                return torch.cat([head, y[:, s:] + (delta * self.scale).to(y.dtype)], dim=1)
            y[:, s:] += (delta * self.scale).to(y.dtype)
            return y
        if x.shape[:-1].numel() <= int(idx.max()):
            raise ValueError(
                f"LoRA gate rows exceed the input: {x.shape[:-1].numel()} rows, max index {int(idx.max())}")
        rows = x.reshape(-1, x.shape[-1]).index_select(0, idx)
        delta = (rows.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        flat = y.reshape(-1, y.shape[-1]).index_add(0, idx, (delta * self.scale).to(y.dtype))
        return flat.view_as(y)


def apply_gated_lora(model: nn.Module, config: LoRAConfig) -> LoRAGate:
    """Freeze ``model`` and wrap its target linears in place; returns the shared gate."""
    for p in model.parameters():
        p.requires_grad_(False)
    gate = LoRAGate()
    targets = set(config.targets)
    found = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, GatedLoRALinear(child, config.rank, config.scale, gate))
                found += 1
    if found == 0:
        raise ValueError(f"no nn.Linear named one of {sorted(targets)} in the model")
    return gate


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, GatedLoRALinear) for p in (m.lora_A, m.lora_B)]


def lora_num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in lora_parameters(model))


def lora_state_dict(model: nn.Module, prefix: str = "lora.") -> dict[str, torch.Tensor]:
    """The adapter tensors only, keyed ``<prefix><module path>.lora_A|lora_B``."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, GatedLoRALinear):
            out[f"{prefix}{name}.lora_A"] = m.lora_A.detach()
            out[f"{prefix}{name}.lora_B"] = m.lora_B.detach()
    return out


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], prefix: str = "lora.") -> None:
    """Inverse of :func:`lora_state_dict`; every adapter tensor must be present with its shape."""
    expected = lora_state_dict(model, prefix)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"adapter checkpoint lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for key, dst in expected.items():
            src = state[key]
            if src.shape != dst.shape:
                raise ValueError(f"{key}: expected shape {list(dst.shape)}, got {list(src.shape)}")
            dst.copy_(src.to(dst.dtype))
