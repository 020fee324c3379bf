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


def save_adapter(model: PTPModel, out_dir: str, extra: Optional[dict[str, Any]] = None,
                 dtype: torch.dtype = torch.float32, drafter_type: str = "ptp") -> str:
    """Write the adapter tensors and config atomically (tmp file + rename); returns the dir.

    Also writes ``ptp_drafter.json`` (``{"type": drafter_type}``), which lets
    ``ptp.drafters.make_drafter(out_dir)`` find the registered drafter for the checkpoint.
    """
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.adapter_state_dict().items()}
    tmp = os.path.join(out_dir, ADAPTER + ".tmp")
    save_file(tensors, tmp, metadata={"format": "ptp-adapter"})
    os.replace(tmp, os.path.join(out_dir, ADAPTER))
    meta = {"ptp": model.config.to_dict(), **(extra or {})}
    with open(os.path.join(out_dir, CONFIG + ".tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out_dir, CONFIG + ".tmp"), os.path.join(out_dir, CONFIG))
    with open(os.path.join(out_dir, "ptp_drafter.json"), "w") as f:
        json.dump({"type": drafter_type}, f)
    return out_dir


def read_config(ckpt_dir: str) -> tuple[PTPConfig, dict]:
    with open(os.path.join(ckpt_dir, CONFIG)) as f:
        meta = json.load(f)
    return PTPConfig(**meta["ptp"]), meta


def load_adapter(base, ckpt_dir: str) -> PTPModel:
    """Wrap ``base`` (the target, any dtype/device) with the adapter stored in ``ckpt_dir``."""
    config, _ = read_config(ckpt_dir)
    model = PTPModel(base, config)
    dev = base.get_input_embeddings().weight.device
    model.load_adapter_state_dict({k: v.to(dev) for k, v in load_file(os.path.join(ckpt_dir, ADAPTER)).items()})
    return model.eval()
