"""Drafters: each fills a :class:`ptp.decode.draft.Draft` for the decoder.

``lookup`` (prompt lookup, no model), ``ptp`` / ``cptp`` (parallel token prediction: a gated-LoRA
adapter on the target reads auxiliary uniforms), ``masked`` (masked-input multi-token prediction
with a sampler head), ``heads`` (independent MTP heads on the target's hidden states) and
``auto`` (``ptp`` where the shipped adapter fits the model, else ``lookup``).
:func:`make_drafter` builds one by name or from a checkpoint directory; each drafter's options are
a dataclass of :mod:`ptp.drafters.options` (``docs/drafter-options.md``).
"""
from ptp.drafters.base import DrafterSpec, drafter_names, make_drafter, register_drafter
from ptp.drafters.lookup import LookupDrafter
from ptp.drafters.options import (HeadsOptions, LookupDrafterOptions, MaskedOptions, PTPOptions, parse_items,
                                  parse_spec)

__all__ = ["LookupDrafter", "make_drafter", "register_drafter", "drafter_names", "DrafterSpec", "parse_items",
           "parse_spec", "LookupDrafterOptions", "PTPOptions", "MaskedOptions", "HeadsOptions"]

# registers "ptp", "cptp" and "auto"; "masked"; "heads"
from ptp.drafters import ptp_drafter, masked, heads  # noqa: E402,F401
