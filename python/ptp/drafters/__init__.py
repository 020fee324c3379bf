"""Drafters: the protocol and registry (:mod:`.base`) and the model-free lookup drafter."""
from .base import Draft, DraftRequest, Drafter, NoDrafter, drafter_names, make_drafter, option_value, register_drafter
from .lookup import LookupDrafter

__all__ = ["Draft", "DraftRequest", "Drafter", "NoDrafter", "LookupDrafter", "make_drafter", "option_value",
           "register_drafter", "drafter_names"]

from . import ptp_drafter  # noqa: E402,F401  (registers the "ptp" drafter name)
from . import mtp  # noqa: E402,F401  (registers "mtp" and "heads")
