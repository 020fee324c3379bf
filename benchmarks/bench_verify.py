"""Benchmark of ptp_ext.verify_tree against a reference-equivalent eager PyTorch implementation.

    PYTHONPATH=$PWD:$PWD/python python benchmarks/bench_verify.py --device cpu [--quick]
    PYTHONPATH=$PWD:$PWD/python python benchmarks/bench_verify.py --device cuda [--quick]

Correctness first (ours vs ptp_ext.reference.verify_tree_ref on small cases, exact token ids),
then a table: shape, eager PyTorch time, ours, ratio; on the GPU also the bytes that must move
(the logits, plus the draft rows read in rejection mode), GB/s, the fraction of the measured
copy bandwidth, and the time under CUDA-graph replay. Without a GPU, ``--device cuda`` prints
"skipped" and exits 0.

``make_verify_inputs`` (also used by tests/test_verify.py and tests/test_verify_cuda.py)
builds random trees whose draft tokens often match the target, so paths have varied lengths.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from ptp_ext._testing import random_tree_parents


@dataclass
class VerifyInputs:
    draft_tokens: torch.Tensor
    parents: torch.Tensor
    target_logits: torch.Tensor
    draft_probs: Optional[torch.Tensor]
    uniforms: Optional[torch.Tensor]
    mode: str
    temperature: float
    top_k: int
    top_p: float

    def args(self):
        return (self.draft_tokens, self.parents, self.target_logits, self.draft_probs,
                self.uniforms, self.mode, self.temperature, self.top_k, self.top_p)

    def to(self, device) -> "VerifyInputs":
        f = lambda t: None if t is None else t.to(device)  # noqa: E731
        return VerifyInputs(f(self.draft_tokens), f(self.parents), f(self.target_logits),
                            f(self.draft_probs), f(self.uniforms), self.mode, self.temperature,
                            self.top_k, self.top_p)


def make_parents(kind: str, num_nodes: int, g: torch.Generator) -> list[int]:
    """``chain``, ``tree`` (random branches), ``ragged`` (a tree of random size, -1 padded),
    ``wide`` (the root has several children, each with a short chain) or ``root`` (no drafts)."""
    if kind == "chain" or num_nodes <= 2:
        return list(range(-1, num_nodes - 1))
    if kind == "tree":
        return random_tree_parents(num_nodes, g, branching=0.5)
    if kind == "ragged":
        n = int(torch.randint(1, num_nodes, (), generator=g))
        return random_tree_parents(n, g, branching=0.4) + [-1] * (num_nodes - n)
    if kind == "wide":
        k = max(2, min(4, num_nodes // 3))
        parents = [-1] + [0] * min(k, num_nodes - 1)
        while len(parents) < num_nodes:
            parents.append(len(parents) - k)
        return parents
    if kind == "root":
        return [-1] * num_nodes
    raise ValueError(kind)


def make_verify_inputs(batch: int, num_nodes: int, vocab: int, dtype: torch.dtype, mode: str,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       kinds=("chain", "tree", "ragged", "wide"), seed: int = 0,
                       match_rate: float = 0.8, logit_scale: float = 3.0,
                       uniform_dtype: torch.dtype = torch.float32, device="cpu") -> VerifyInputs:
    """Random inputs; row b's tree is ``kinds[b % len(kinds)]``. Draft tokens are the parent's
    argmax with probability ``match_rate`` (else random); in rejection mode they are drawn from
    a draft distribution q that resembles the target (some zero entries included)."""
    g = torch.Generator().manual_seed(seed)
    B, N1, V = batch, num_nodes, vocab
    logits = torch.randn(B, N1, V, generator=g) * logit_scale
    parents = torch.tensor([make_parents(kinds[b % len(kinds)], N1, g) for b in range(B)],
                           dtype=torch.long).reshape(B, N1)
    par = parents.clamp_min(0)
    parent_logits = torch.gather(logits, 1, par.unsqueeze(-1).expand(B, N1, V))  # [B, N1, V]
    draft_probs = None
    if mode == "rejection":
        t = max(temperature, 0.5)
        z = parent_logits / t + 0.7 * torch.randn(B, N1, V, generator=g)
        # Zero some entries so q(x) = 0 paths and p > q residuals both occur.
        z = z.masked_fill(torch.rand(B, N1, V, generator=g) < 0.1, -math.inf)
        draft_probs = torch.softmax(z, dim=-1)
        draws = torch.multinomial(draft_probs.reshape(-1, V), 1, generator=g).reshape(B, N1)
        hit = parent_logits.argmax(-1)
        tokens = torch.where(torch.rand(B, N1, generator=g) < 0.3, hit, draws)
    else:
        hit = parent_logits.argmax(-1)
        rand = torch.randint(0, V, (B, N1), generator=g)
        tokens = torch.where(torch.rand(B, N1, generator=g) < match_rate, hit, rand)
    uniforms = None if mode == "greedy" else torch.rand(B, N1, generator=g, dtype=torch.float64)
    if uniforms is not None:
        uniforms = uniforms.to(uniform_dtype)
    to = dict(device=device)
    return VerifyInputs(tokens.to(**to), parents.to(**to), logits.to(dtype=dtype, **to),
                        None if draft_probs is None else draft_probs.to(**to),
                        None if uniforms is None else uniforms.to(**to), mode, temperature,
                        top_k, top_p)


# ---------------------------------------------------------------------------------------------
# Reference-equivalent eager PyTorch (batched): what one would write without the op.
# ---------------------------------------------------------------------------------------------
def _probs_batched(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    from ptp_ext.reference import sampling_probs

    return sampling_probs(logits, temperature, top_k, top_p)


def _pick_batched(u: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    cdf = probs.double().cumsum(-1)
    idx = (cdf <= u.double().unsqueeze(-1)).sum(-1)
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.where(idx < probs.shape[-1], idx, last)


def verify_tree_eager(draft_tokens, parents, target_logits, draft_probs, uniforms, mode,
                      temperature, top_k, top_p):
    """The reference semantics with batched tensor ops: all node outcomes at once, then the
    walk on device tensors (one step per depth, no host sync)."""
    B, N1, V = target_logits.shape
    dev = target_logits.device
    ar = torch.arange(N1, device=dev)
    valid = (parents >= 0) & (parents < ar)  # [B, N1] draft nodes in the tree
    child_of = valid.unsqueeze(1) & (parents.unsqueeze(1) == ar.view(1, N1, 1))  # [B, c, j]
    if mode != "rejection":
        t = 0.0 if mode == "greedy" else temperature
        P = _probs_batched(target_logits, t, top_k, top_p)
        depth = torch.zeros(B, N1, dtype=torch.long, device=dev)
        for _ in range(N1 - 1):  # depth by pointer doubling would be faster; N is small
            depth = torch.where(valid, depth.gather(1, parents.clamp_min(0)) + 1, depth)
        u = (torch.zeros(B, N1, device=dev) if mode == "greedy"
             else uniforms.double().gather(1, depth))
        target = _pick_batched(u, P)  # [B, N1]
        match = child_of & (draft_tokens.unsqueeze(1) == target.unsqueeze(-1))
        has = match.any(-1)
        child = torch.where(has, match.int().argmax(-1), torch.full_like(target, -1))
        token = target
    else:
        p = _probs_batched(target_logits, temperature, top_k, top_p).double()  # [B, N1, V]
        child = torch.full((B, N1), -1, dtype=torch.long, device=dev)
        # Siblings are tried in index order: process children by their rank among siblings.
        rank = (child_of.cumsum(-1) * child_of) - 1  # [B, c, j] rank of j among c's children
        for k in range(int(child_of.sum(-1).max()) if N1 > 1 else 0):
            sel = rank == k  # [B, c, j]
            has = sel.any(-1)
            j = sel.int().argmax(-1)  # [B, c]
            x = draft_tokens.gather(1, j)
            q = draft_probs.gather(1, j.unsqueeze(-1).expand(B, N1, V)).double()
            qx = q.gather(2, x.unsqueeze(-1)).squeeze(-1)
            px = p.gather(2, x.unsqueeze(-1)).squeeze(-1)
            acc = has & (child < 0) & (uniforms.double().gather(1, j) * qx < px)
            child = torch.where(acc, j, child)
            upd = has & (child < 0)
            r = (p - q).clamp_min(0.0)
            s = r.sum(-1, keepdim=True)
            p = torch.where((upd.unsqueeze(-1) & (s > 0)), r / s.clamp_min(1e-300), p)
        token = _pick_batched(uniforms[:, :1].double().expand(B, N1), p)
    # Walk: one step per depth.
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    accepted = torch.full((B, N1 + 1), -1, dtype=torch.long, device=dev)  # column N1: scratch
    accepted[:, 0] = 0
    num = torch.zeros(B, dtype=torch.long, device=dev)
    next_token = torch.zeros(B, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)
    for _ in range(N1):
        ch = child[rows, cur]
        stop = alive & (ch < 0)
        next_token = torch.where(stop, token[rows, cur], next_token)
        alive = alive & (ch >= 0)
        num = num + alive.long()
        accepted[rows, torch.where(alive, num, N1)] = ch
        cur = torch.where(alive, ch, cur)
    accepted = accepted[:, :N1].contiguous()
    return num, accepted, next_token


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------
def _bytes(inp: VerifyInputs) -> int:
    """Bytes that must move: every reachable node's logits row; rejection also reads the draft
    rows of the children (a rejected child's whole row, for the residual)."""
    B, N1, V = inp.target_logits.shape
    n = int(((inp.parents >= 0).sum() + B).item())
    b = n * V * inp.target_logits.element_size()
    if inp.mode == "rejection":
        b += (n - B) * V * 4
    return b


def correctness(device: str) -> bool:
    import ptp_ext
    from ptp_ext.reference import verify_tree_ref

    ok = True
    cases = [("greedy", 0.0, 0, 1.0), ("coupled", 0.7, 0, 1.0), ("coupled", 1.0, 50, 0.9),
             ("rejection", 1.0, 0, 1.0), ("rejection", 0.7, 5, 0.9)]
    for mode, t, k, p in cases:
        for dtype in (torch.float32, torch.bfloat16):
            inp = make_verify_inputs(4, 6, 1000, dtype, mode, t, k, p, seed=1, device=device)
            ours = ptp_ext.verify_tree(*inp.args())
            ref = verify_tree_ref(*inp.to("cpu").args())
            same = all(torch.equal(a.cpu(), r) for a, r in zip(ours, ref))
            ok &= same
            print(f"correctness {mode:9s} t={t} k={k} p={p} {str(dtype):15s}: "
                  f"{'ok' if same else 'MISMATCH'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA GPU")
        return 0
    import ptp_ext
    from benchmarks._timing import (copy_bandwidth_gbs, cpu_median_ms, cuda_median_ms,
                                    machine_line, rotating_copies)

    if args.device == "cuda" and not ptp_ext.with_cuda():
        print("skipped: ptp_ext built without CUDA")
        return 0
    print(machine_line())
    if not correctness(args.device):
        print("FAIL: mismatch against the reference")
        return 1
    gpu = args.device == "cuda"
    if gpu:
        bw = copy_bandwidth_gbs()
        print(f"measured copy bandwidth: {bw:.0f} GB/s")
        shapes = [(64, 9, "chain", 49152), (64, 9, "chain", 128256), (64, 64, "tree", 49152),
                  (64, 64, "tree", 128256), (1, 9, "chain", 128256), (64, 1, "root", 128256),
                  (16, 64, "tree", 128256)]
        modes = [("greedy", 0.0, 0, 1.0), ("coupled", 0.7, 0, 1.0), ("coupled", 0.7, 50, 0.9),
                 ("coupled", 1.0, 0, 0.9), ("rejection", 1.0, 0, 1.0)]
        dtypes = [torch.bfloat16]
    else:
        shapes = [(1, 9, "chain", 49152), (8, 9, "chain", 49152), (64, 9, "chain", 49152),
                  (8, 64, "tree", 49152), (4, 9, "chain", 128256), (64, 1, "root", 128256)]
        modes = [("greedy", 0.0, 0, 1.0), ("coupled", 0.7, 0, 1.0), ("coupled", 0.7, 50, 0.9),
                 ("rejection", 1.0, 0, 1.0)]
        dtypes = [torch.float32]
    if args.quick:
        shapes, modes = shapes[:3], modes[:2] + modes[-1:]
    hdr = (f"| B | N+1 | tree | V | dtype | mode | eager ms | ours ms | ratio |"
           + (" MB | GB/s | % copy bw | graph ms |" if gpu else ""))
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for B, N1, kind, V in shapes:
        for mode, t, k, p in modes:
            for dtype in dtypes:
                if mode == "rejection" and B * N1 * V * 4 > (6 << 30 if gpu else 1 << 30):
                    continue
                kinds = (kind,) if kind != "tree" else ("tree", "wide")
                make = lambda i: make_verify_inputs(B, N1, V, dtype, mode, t, k, p,  # noqa: E731
                                                    kinds=kinds, seed=i, device=args.device)
                if gpu:
                    inp = make(0)
                    nb = _bytes(inp)
                    sets = [inp] + rotating_copies(lambda i: make(i + 1), nb, max_copies=3)
                    ours = cuda_median_ms([lambda s=s: ptp_ext.verify_tree(*s.args())
                                           for s in sets])
                    graph = cuda_median_ms([lambda s=s: ptp_ext.verify_tree(*s.args())
                                            for s in sets], graph=True)
                    eager = cuda_median_ms([lambda: verify_tree_eager(*inp.args())], iters=10,
                                           warmup=2)
                    gbs = nb / (ours * 1e-3) / 1e9
                    extra = f" {nb / 1e6:.1f} | {gbs:.0f} | {100 * gbs / bw:.0f}% | {graph:.4f} |"
                else:
                    inp = make(0)
                    ours = cpu_median_ms(lambda: ptp_ext.verify_tree(*inp.args()))
                    eager = cpu_median_ms(lambda: verify_tree_eager(*inp.args()), 0.2)
                    extra = ""
                print(f"| {B} | {N1} | {kind} | {V} | {str(dtype)[6:]} | {mode} t={t} k={k} "
                      f"p={p} | {eager:.3f} | {ours:.4f} | {eager / ours:.1f}x |{extra}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
