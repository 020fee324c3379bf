"""The GGUF blocks behind a model's float32 linears, for ``ptp_ext.ops.quant_linear``.

transformers loads a GGUF checkpoint by dequantising every tensor to float32 (and reordering the
rows of q/k projections for rotary, for Llama). Those float32 weights are what the model is, and
each is exactly one block formula of the file, so a decoding call may read the blocks instead:
Q4_1 streams 4.5 bits per weight from memory and Q8_0 8.5, against 32 for the float32 copy, with
bitwise the same outputs (``quant_linear`` rebuilds the very float32 values and runs the same
arithmetic as ``invariant_linear``).

:func:`attach_gguf` matches the file's tensors to the model's ``nn.Linear`` layers and keeps a
layer's blocks only if their dequantisation equals the layer's weight **bitwise** (trying the
row orders transformers may have applied); any other layer stays on the float32 path. The
default model (``load_target("smollm2")``) and ``load_target("file.gguf")`` attach the file
themselves; for a model loaded with ``from_pretrained(dir, gguf_file=...)``, call
``attach_gguf(model, path)``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from ptp_ext.reference import QUANT_BLOCK_BYTES, dequantize_ref

from ptp.decode.lora import GatedLoRALinear

__all__ = ["attach_gguf", "quantized_weights", "QuantWeight"]

# GGUF tensor name (per block) -> HF module path suffix (Llama-family naming)
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ATTR = "_ptp_quant_weights"


class QuantWeight:
    """One linear's blocks: ``qweight uint8 [M, K / 32 * bytes]`` and the ``format``, plus the
    identity of the float32 weight they were checked against (storage and version counter):
    :meth:`matches` is False once that weight was modified in place, replaced or moved, and the
    layer then goes back to its float32 path."""

    __slots__ = ("qweight", "format", "_weight", "_ptr", "_version")

    def __init__(self, qweight: torch.Tensor, fmt: str, weight: torch.Tensor):
        self.qweight = qweight
        self.format = fmt
        self._record(weight)

    def _record(self, weight: torch.Tensor) -> None:
        self._weight, self._ptr, self._version = weight, weight.data_ptr(), weight._version

    def matches(self, weight: torch.Tensor) -> bool:
        return (weight is self._weight and weight.data_ptr() == self._ptr
                and weight._version == self._version and weight.device == self.qweight.device)

    def __deepcopy__(self, memo):
        # a deep copy of the model (its weights copied too) keeps the blocks for the copies
        import copy

        new = QuantWeight.__new__(QuantWeight)
        new.qweight = copy.deepcopy(self.qweight, memo)
        new.format = self.format
        valid = self.matches(self._weight)
        new._record(copy.deepcopy(self._weight, memo))
        if not valid:
            new._version = -1
        return new

    @property
    def nbytes(self) -> int:
        return self.qweight.numel()


def quantized_weights(model: nn.Module) -> dict:
    """``{nn.Linear: QuantWeight}`` attached to ``model`` (empty if none)."""
    return getattr(model, _ATTR, {})


def _row_orders(rows: torch.Tensor, config, kind: str) -> list[torch.Tensor]:
    """Candidate row orders of a GGUF tensor: as stored, and both interleavings of a rotary
    head's two halves (llama.cpp's converter permutes Llama q / k rows; transformers undoes it)."""
    out = [rows]
    heads = {"attn_q": getattr(config, "num_attention_heads", None),
             "attn_k": getattr(config, "num_key_value_heads", None)}.get(kind)
    if heads:
        M = rows.shape[0]
        if M % (2 * heads) == 0:
            half = M // heads // 2
            out.append(rows.reshape(heads, half, 2, -1).transpose(1, 2).reshape(rows.shape).contiguous())
            out.append(rows.reshape(heads, 2, half, -1).transpose(1, 2).reshape(rows.shape).contiguous())
    return out


def attach_gguf(model: nn.Module, path: str, verbose: bool = False) -> dict:
    """Attach the Q4_1 / Q8_0 blocks of the GGUF file ``path`` to ``model``'s matching float32
    linears (bitwise-checked); returns ``{nn.Linear: QuantWeight}`` (also kept on the model,
    where :class:`ptp.decode.fastpath.FastForward` finds it). Tensors of other types, other shapes or
    that do not reproduce the layer's weight bitwise are skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    wanted: list[tuple[str, nn.Module, str]] = []  # (gguf name, layer, kind)
    if layers is not None:
        for i, layer in enumerate(layers):
            for kind, sub in _BLOCK_NAMES.items():
                mod = layer
                for part in sub.split("."):
                    mod = getattr(mod, part, None)
                    if mod is None:
                        break
                if isinstance(mod, GatedLoRALinear):  # a self-speculative drafter's wrapper
                    mod = mod.base
                if type(mod) is nn.Linear:
                    wanted.append((f"blk.{i}.{kind}.weight", mod, kind))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is nn.Linear:
        name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
        wanted.append((name, head, "output"))
    found: dict = {}
    for name, mod, kind in wanted:
        t = tensors.get(name)
        if t is None or mod.weight.dtype != torch.float32:
            continue
        fmt = t.tensor_type.name.lower()
        if fmt not in QUANT_BLOCK_BYTES:
            continue
        M, K = mod.weight.shape
        raw = torch.from_numpy(t.data.copy()) if not t.data.flags.writeable else torch.from_numpy(t.data)
        raw = raw.reshape(-1).view(torch.uint8)
        if K % 32 or raw.numel() != M * K // 32 * QUANT_BLOCK_BYTES[fmt]:
            continue
        rows = raw.reshape(M, -1)
        w = mod.weight.detach().cpu()
        for cand in _row_orders(rows, cfg, kind):
            if torch.equal(dequantize_ref(cand, fmt), w):
                found[mod] = QuantWeight(cand.contiguous().to(mod.weight.device), fmt, mod.weight)
                break
        else:
            if verbose:
                print(f"ptp.decode.quant: {name} does not reproduce its layer's weights; kept float32")
    setattr(model, _ATTR, found)
    return found


def attached_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the attached blocks, bytes of the float32 weights they stand for)."""
    q = quantized_weights(model)
    return sum(v.nbytes for v in q.values()), sum(m.weight.numel() * 4 for m in q)


def maybe_attach_default(model: nn.Module, path: Optional[str]) -> None:
    """Attach ``path``'s blocks to a CPU model when ``PTP_QUANT_LINEAR`` is not ``0`` (best
    effort: a model that does not match, or without the gguf package, keeps its float32 path)."""
    if path is None or os.environ.get("PTP_QUANT_LINEAR", "1") == "0":
        return
    if next(model.parameters()).device.type != "cpu":  # quant_linear serves the CPU decoding calls
        return
    try:
        attach_gguf(model, path)
    except ImportError:  # no gguf package: float32 path
        return
