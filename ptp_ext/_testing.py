"""Input builders and the tolerance table, shared by tests and benchmarks.

Random data only (never zeros: zeros hide unwritten outputs and wrong indexing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# Absolute / relative tolerances for comparing an op with its float32 reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_attention_close(out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor):
    """flash-attention's rule: the kernel's max error against an fp32 reference is at most twice
    the low-precision reference's own error (plus a small floor for fp32)."""
    ref32 = ref_fp32.float()
    err = (out.float() - ref32).abs().max().item()
    base = (ref_lowp.float() - ref32).abs().max().item()
    floor = 2e-5 if out.dtype == torch.float32 else 1e-3
    assert math.isfinite(err), "non-finite attention output"
    assert err <= 2 * base + floor, f"attention error {err:.3g} > 2 * {base:.3g} + {floor:g}"


@dataclass
class AttentionInputs:
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    cache_lens: torch.Tensor
    tree_mask: Optional[torch.Tensor]
    scale: float


def random_tree_parents(num_nodes: int, generator: torch.Generator, branching: float = 0.5
                        ) -> list[int]:
    """Parents of a random tree with ``num_nodes`` nodes (node 0 the root, ``-1``): each new node
    continues the last node with probability ``1 - branching``, else hangs off a random earlier
    node, so trees have long chains and several branches."""
    parents = [-1]
    for i in range(1, num_nodes):
        if i == 1 or torch.rand((), generator=generator).item() >= branching:
            parents.append(i - 1)
        else:
            parents.append(int(torch.randint(0, i, (), generator=generator)))
    return parents


def tree_mask_from_parents(parents: list[int]) -> torch.Tensor:
    """``[T, T]`` bool: node i sees its ancestors and itself."""
    T = len(parents)
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parents[j]
    return m


def make_attention_inputs(batch: int, num_new: int, num_q_heads: int, num_kv_heads: int,
                          head_dim: int, max_cache_len: int, dtype: torch.dtype,
                          device="cpu", tree: bool = True, seed: int = 0) -> AttentionInputs:
    """Random StaticCache-style inputs; rows get different cache lengths (first row 0 if it fits)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_new, num_q_heads, head_dim, generator=g)
    k = torch.randn(batch, num_kv_heads, max_cache_len, head_dim, generator=g)
    v = torch.randn(batch, num_kv_heads, max_cache_len, head_dim, generator=g)
    hi = max_cache_len - num_new
    lens = torch.randint(0, hi + 1, (batch,), generator=g)
    if batch > 1:
        lens[0] = 0
        lens[-1] = hi
    mask = None
    if tree:
        mask = torch.stack([tree_mask_from_parents(random_tree_parents(num_new, g))
                            for _ in range(batch)])
    to = dict(device=device)
    return AttentionInputs(q.to(dtype=dtype, **to), k.to(dtype=dtype, **to),
                           v.to(dtype=dtype, **to), lens.to(torch.int32).to(**to),
                           None if mask is None else mask.to(**to), head_dim ** -0.5)
