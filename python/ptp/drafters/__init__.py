"""Drafters: the protocol and registry (:mod:`.base`) and the model-free lookup drafter."""
from .base import Draft, DraftRequest, Drafter, NoDrafter, drafter_names, make_drafter, register_drafter
from .lookup import LookupDrafter

__all__ = ["Draft", "DraftRequest", "Drafter", "NoDrafter", "LookupDrafter", "make_drafter",
           "register_drafter", "drafter_names"]
