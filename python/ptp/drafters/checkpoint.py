"""Loading drafter checkpoints: ``adapter.safetensors`` + ``config.json`` (+ ``ptp_drafter.json``).

Inference needs only this module; writing checkpoints is :mod:`ptp.train.checkpoint`.
``config.json`` holds the drafter's config under its key (``"ptp"``, ``"masked"``, ``"heads"``),
the training settings, the step reached and the exact command that produced it.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from ptp.drafters.ptp_model import PTPConfig, PTPModel

ADAPTER = "adapter.safetensors"
CONFIG = "config.json"

# config keys / drafter types of checkpoints written by earlier versions
LEGACY_KEYS = {"masked": "mtp"}
LEGACY_TYPES = {"mtp": "masked"}

__all__ = ["ADAPTER", "CONFIG", "read_meta", "read_config", "load_adapter", "load_masked", "load_heads"]


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no drafter checkpoint config at {path}")
    with open(path) as f:
        return json.load(f)


def read_config(ckpt_dir: str) -> tuple[PTPConfig, dict]:
    meta = read_meta(ckpt_dir)
    if "ptp" not in meta:
        raise ValueError(f"{ckpt_dir} is a {meta.get('type')!r} checkpoint, not a PTP adapter")
    return PTPConfig(**meta["ptp"]), meta


def _load_tensors(ckpt_dir: str, device) -> dict[str, torch.Tensor]:
    path = os.path.join(ckpt_dir, ADAPTER)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter weights at {path}")
    return {k: v.to(device) for k, v in load_file(path).items()}


def _check_base(base, tensors: dict[str, torch.Tensor], key: str, ckpt_dir: str) -> None:
    hidden = base.get_input_embeddings().weight.shape[1]
    if key in tensors and tensors[key].shape[-1] != hidden:
        raise ValueError(f"{ckpt_dir} was trained for hidden size {tensors[key].shape[-1]}, "
                         f"the model has {hidden}: wrong --model for this drafter?")


def _load_drafter(base, ckpt_dir: str, key: str, what: str, check_tensor: str, build):
    meta = read_meta(ckpt_dir)
    if key not in meta and key in LEGACY_KEYS and LEGACY_KEYS[key] in meta:
        key = LEGACY_KEYS[key]  # written before the masked-input drafter was renamed from "mtp"
    if key not in meta:
        raise ValueError(f"{ckpt_dir} is a {meta.get('type')!r} checkpoint, not {what}")
    tensors = _load_tensors(ckpt_dir, base.get_input_embeddings().weight.device)
    _check_base(base, tensors, check_tensor, ckpt_dir)
    model = build(meta[key])
    model.load_adapter_state_dict(tensors)
    return model.eval()


def load_masked(base, ckpt_dir: str):
    """Wrap ``base`` with the masked-input drafter stored in ``ckpt_dir``."""
    from ptp.drafters.masked_model import MaskedConfig, MaskedModel

    return _load_drafter(base, ckpt_dir, "masked", "a masked-input drafter", "masks",
                         lambda cfg: MaskedModel(base, MaskedConfig(**cfg)))


def load_heads(base, ckpt_dir: str):
    """MTP heads stored in ``ckpt_dir`` on top of ``base``."""
    from ptp.drafters.heads_model import HeadsConfig, MTPHeads

    return _load_drafter(base, ckpt_dir, "heads", "MTP heads", "bias",
                         lambda cfg: MTPHeads(base, HeadsConfig(**cfg)))


def load_adapter(base, ckpt_dir: str) -> PTPModel:
    """Wrap ``base`` (the target, any dtype/device) with the adapter stored in ``ckpt_dir``."""
    config, _ = read_config(ckpt_dir)
    model = PTPModel(base, config)
    dev = base.get_input_embeddings().weight.device
    model.load_adapter_state_dict({k: v.to(dev) for k, v in load_file(os.path.join(ckpt_dir, ADAPTER)).items()})
    return model.eval()
