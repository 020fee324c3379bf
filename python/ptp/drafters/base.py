"""The registry of drafter names (the Draft contract itself is :mod:`ptp.decode.draft`).

Drafters register a factory under a name with their option dataclass
(:mod:`ptp.drafters.options`) and presets; :func:`make_drafter` builds one by name or from a
checkpoint directory whose ``ptp_drafter.json`` names its type, from keyword options (values or
text) and/or an options instance, and records what it built in ``drafter.spec``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from ptp.decode.draft import Drafter, NoDrafter
from ptp.drafters.options import DrafterOptions, NoOptions

__all__ = ["register_drafter", "make_drafter", "check_drafter_options", "drafter_names", "drafter_entries",
           "device_preset", "DrafterEntry", "DrafterSpec"]


@dataclass(frozen=True)
class DrafterEntry:
    """A registered drafter: ``factory(model, tokenizer, path_or_none, options) -> Drafter``;
    ``options`` its option dataclass (``None``: the factory takes the keyword options of the drafter
    it picks, as ``auto`` does: ``factory(model, tokenizer, path, options, **kw)``)."""

    factory: Callable[..., Drafter]
    options: Optional[type]
    presets: Mapping[str, DrafterOptions] = field(default_factory=dict)
    summary: str = ""


@dataclass(frozen=True)
class DrafterSpec:
    """What :func:`make_drafter` built: the name (or checkpoint path) asked for, the options, the
    preset they started from, and ``description`` (``ptp preset=cpu,num_slots=3``)."""

    name: str
    options: Optional[DrafterOptions]
    preset: Optional[str]
    description: str


_REGISTRY: dict[str, DrafterEntry] = {}


def register_drafter(name: str, factory: Callable[..., Drafter], options: Optional[type] = NoOptions,
                     presets: Optional[Mapping[str, DrafterOptions]] = None, summary: Optional[str] = None) -> None:
    """Register a drafter type by name (``summary``: a line for the docs; default: the options
    class's docstring)."""
    if summary is None:
        summary = " ".join((options.__doc__ or "").split()) if options is not None else ""
    _REGISTRY[name] = DrafterEntry(factory, options, dict(presets or {}), summary)


def drafter_names() -> list[str]:
    return sorted(_REGISTRY)


def drafter_entries() -> list[tuple[str, DrafterEntry]]:
    return sorted(_REGISTRY.items())


def device_preset(model) -> str:
    """The preset of the device ``model``'s weights are on: ``cpu`` or ``gpu``."""
    return "cpu" if model.get_input_embeddings().weight.device.type == "cpu" else "gpu"


def _resolve(name: str) -> tuple[str, Optional[str]]:
    """(registered type, checkpoint path or None) of a name or checkpoint directory."""
    if name == "mtp":
        raise ValueError("the masked-input drafter is now called 'masked' ('mtp' was renamed: "
                         "MTP heads are 'heads')")
    if name in _REGISTRY:
        return name, None
    meta = os.path.join(name, "ptp_drafter.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            kind = json.load(f).get("type")
        from ptp.drafters.checkpoint import LEGACY_TYPES

        kind = LEGACY_TYPES.get(kind, kind)
        if kind not in _REGISTRY:
            raise ValueError(f"{meta}: drafter type {kind!r} is not registered (known: {drafter_names()})")
        return kind, name
    raise ValueError(f"unknown drafter {name!r}: not one of {drafter_names()} and not a checkpoint "
                     f"directory with a ptp_drafter.json")


def _options(kind: str, entry: DrafterEntry, model, options: Optional[DrafterOptions],
             kw: dict) -> tuple[DrafterOptions, Optional[str]]:
    """The drafter's options: ``options`` (or the preset ``kw["preset"]``, or the defaults) with
    the other keywords over it; and the preset's name."""
    preset = kw.pop("preset", None)
    if preset is None:
        return entry.options.build(options, **kw), None
    if not entry.presets:
        raise ValueError(f"drafter {kind!r} has no presets (option 'preset')")
    if options is not None:
        raise ValueError(f"drafter {kind!r}: give a preset or an options instance, not both")
    pname = str(preset).strip().lower()
    if pname == "auto":
        if model is None:
            raise ValueError("preset=auto picks the preset of the model's device: pass the model")
        pname = device_preset(model)
    if pname not in entry.presets:
        raise ValueError(f"option preset must be one of {', '.join(sorted(entry.presets) + ['auto'])}, "
                         f"got {preset!r}")
    return entry.options.build(entry.presets[pname], **kw), pname


def check_drafter_options(name: str, options: Mapping[str, object]) -> None:
    """The ``ValueError`` :func:`make_drafter` would raise for ``name`` and text or value
    ``options``, found without a model (the CLI calls it before loading one): an unknown drafter
    or option, a value of the wrong type or out of range, and, for a registered drafter without
    a preset, the constraints between options. With a preset of the model's device
    (``preset=auto``) or a checkpoint directory each given option is checked alone; the rest when
    the drafter is built. ``auto`` passes its options to the drafter it picks for the device:
    checked then."""
    kind, path = _resolve(name)
    entry = _REGISTRY[kind]
    if entry.options is None:
        return
    kw = dict(options)
    preset = kw.pop("preset", None)
    entry.options.check_keys(kw)
    if path is None and (preset is None or str(preset).strip().lower() != "auto"):
        _options(kind, entry, None, None, {**kw, "preset": preset} if preset is not None else kw)
        return
    entry.options.check_values(kw)


def make_drafter(name_or_path: Optional[str], model=None, tokenizer=None, *,
                 options: Optional[DrafterOptions] = None, **kw) -> Drafter:
    """A drafter by registered name, or from a checkpoint directory whose ``ptp_drafter.json``
    names its registered ``type``. ``options``: an instance of the drafter's option dataclass;
    keywords (values or text, ``preset=NAME`` for a drafter with presets) override it. The result
    carries ``spec`` (:class:`DrafterSpec`)."""
    name = name_or_path or "none"
    kind, path = _resolve(name)
    entry = _REGISTRY[kind]
    if entry.options is None:  # auto: the drafter it picks takes the options (and sets spec)
        return entry.factory(model, tokenizer, path, options, **kw)
    opts, preset = _options(kind, entry, model, options, kw)
    drafter = entry.factory(model, tokenizer, path, opts)
    base = entry.presets[preset] if preset is not None else None
    text = ",".join(filter(None, [f"preset={preset}" if preset else "", opts.describe(base)]))
    drafter.spec = DrafterSpec(name, opts, preset, f"{name} {text}" if text else name)
    return drafter


register_drafter("none", lambda model, tokenizer, path, options: NoDrafter(), NoOptions)
