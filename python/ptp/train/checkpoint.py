"""Writing adapter checkpoints (loading: :mod:`ptp.drafters.checkpoint`): ``adapter.safetensors`` (LoRA + u-embedding only) + ``config.json``.

``config.json`` holds the :class:`~ptp.drafters.ptp_model.PTPConfig` (``"ptp"``), the training settings,
the step reached and the exact command that produced it. ``trainer_state.pt`` (optimizer, step,
RNG) sits beside them for resuming and is not needed to use the adapter.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from ptp.drafters.checkpoint import ADAPTER, CONFIG, load_adapter, load_heads, load_masked, read_config, read_meta  # noqa: F401
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


