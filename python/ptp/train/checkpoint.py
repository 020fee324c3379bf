"""Adapter checkpoints: ``adapter.safetensors`` (LoRA + u-embedding only) + ``config.json``.

``config.json`` holds the :class:`~ptp.ptp_model.PTPConfig` (``"ptp"``), the training settings,
the step reached and the exact command that produced it. ``trainer_state.pt`` (optimizer, step,
RNG) sits beside them for resuming and is not needed to use the adapter.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ptp.ptp_model import PTPConfig, PTPModel

ADAPTER = "adapter.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"


def save_adapter(model, out_dir: str, extra: Optional[dict[str, Any]] = None,
                 dtype: torch.dtype = torch.float32, drafter_type: Optional[str] = None) -> str:
    """Write the adapter tensors and config atomically (tmp file + rename); returns the dir.

    Also writes ``ptp_drafter.json`` (``{"type": drafter_type}``), which lets
    ``ptp.drafters.make_drafter(out_dir)`` find the registered drafter for the checkpoint.
    """
    drafter_type = drafter_type or getattr(model, "DRAFTER_TYPE", "ptp")
    os.makedirs(out_dir, exist_ok=True)
    # counts stay float32 (a float16 file would turn counts above 65504 into inf)
    tensors = {k: v.detach().to("cpu", torch.float32 if k == "token_counts" else dtype).contiguous()
               for k, v in model.adapter_state_dict().items()}
    tmp = os.path.join(out_dir, ADAPTER + ".tmp")
    save_file(tensors, tmp, metadata={"format": "ptp-adapter"})
    os.replace(tmp, os.path.join(out_dir, ADAPTER))
    meta = {getattr(model, "CONFIG_KEY", "ptp"): model.config.to_dict(), "type": drafter_type,
            **(extra or {})}
    with open(os.path.join(out_dir, CONFIG + ".tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out_dir, CONFIG + ".tmp"), os.path.join(out_dir, CONFIG))
    with open(os.path.join(out_dir, "ptp_drafter.json"), "w") as f:
        json.dump({"type": drafter_type}, f)
    return out_dir


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
    if key not in meta:
        raise ValueError(f"{ckpt_dir} is a {meta.get('type')!r} checkpoint, not {what}")
    tensors = _load_tensors(ckpt_dir, base.get_input_embeddings().weight.device)
    _check_base(base, tensors, check_tensor, ckpt_dir)
    model = build(meta[key])
    model.load_adapter_state_dict(tensors)
    return model.eval()


def load_mtp(base, ckpt_dir: str):
    """Wrap ``base`` with the masked-input drafter stored in ``ckpt_dir``."""
    from ptp.mtp_model import MTPConfig, MTPModel

    return _load_drafter(base, ckpt_dir, "mtp", "a masked-input drafter", "masks",
                         lambda cfg: MTPModel(base, MTPConfig(**cfg)))


def load_heads(base, ckpt_dir: str):
    """MTP heads stored in ``ckpt_dir`` on top of ``base``."""
    from ptp.mtp_model import HeadsConfig, MTPHeads

    return _load_drafter(base, ckpt_dir, "heads", "MTP heads", "bias",
                         lambda cfg: MTPHeads(base, HeadsConfig(**cfg)))


def load_adapter(base, ckpt_dir: str) -> PTPModel:
    """Wrap ``base`` (the target, any dtype/device) with the adapter stored in ``ckpt_dir``."""
    config, _ = read_config(ckpt_dir)
    model = PTPModel(base, config)
    dev = base.get_input_embeddings().weight.device
    model.load_adapter_state_dict({k: v.to(dev) for k, v in load_file(os.path.join(ckpt_dir, ADAPTER)).items()})
    return model.eval()
