"""Sampling settings and the position-indexed uniform stream.

The uniform that samples the token at absolute position ``t`` (0-based over prompt + generated
tokens) of sequence ``s`` is ``u = U(seed, s, t)``: a counter-based hash (splitmix64 rounds in
int64 torch ops, top 53 bits -> float64 in [0, 1)), with no generator state. Plain sampling and
speculative sampling with the coupled verifier therefore consume the same uniforms, whatever the
batch composition or the number of tokens accepted per step. ``salt`` separates independent
streams (e.g. rejection-sampling acceptance tests) from the token stream (salt 0).

The sampling *distribution* is defined in one place only: ``ptp_ext`` (``verify_tree`` /
``ptp_ext.reference.sampling_probs``); nothing here touches logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingConfig", "uniforms"]


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= (1 << 63) else x


_GAMMA = _i64(0x9E3779B97F4A7C15)
_M1 = _i64(0xBF58476D1CE4E5B9)
_M2 = _i64(0x94D049BB133111EB)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser; int64 multiplication wraps modulo 2**64."""
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def uniforms(seed: int, sequence: torch.Tensor, position: torch.Tensor,
             salt: int = 0) -> torch.Tensor:
    """``U(seed, sequence, position)`` in [0, 1) as float64, broadcasting ``sequence``/``position``.

    A pure function: the same arguments give the same bits on any device and batch layout.
    """
    seq = torch.as_tensor(sequence, dtype=torch.int64)
    pos = torch.as_tensor(position, dtype=torch.int64, device=seq.device)
    key = _i64((seed + 0x9E3779B97F4A7C15 * (1 + salt)) & ((1 << 64) - 1))
    h = _mix(torch.full_like(seq, key))
    h = _mix(h + seq * _GAMMA)
    h = _mix(h + pos * _GAMMA)
    return _srl(h, 11).double() * (2.0 ** -53)
