"""Drafter options: one typed, frozen dataclass per drafter, built from shared parts.

* :class:`LookupOptions` (prompt lookup's continuations, in every drafter that can draft by
  lookup), :class:`TreeOptions` (greedy best-first draft trees), :class:`DraftVocabOptions` and
  :class:`SlotOptions` (drafting on the verify call's slot rows) are the shared parts;
* :class:`LookupDrafterOptions`, :class:`PTPOptions`, :class:`MaskedOptions`,
  :class:`HeadsOptions` are the drafters' (fields flattened by inheritance: one key per concept,
  the same key in every drafter that has it); :data:`PTP_PRESETS` are PTP's presets, as instances.

Each field's metadata holds its help text and its range. Values may be given as text
(``--drafter-option k=v``, benchmark specs ``ptp:k=v;k2=v2``: :func:`parse_items`,
:func:`parse_spec`): the field's type converts them (``none`` for an optional field's unset
value). Unknown keys are errors listing the valid ones; a key of an earlier version is an error
naming its new key (:data:`RENAMED`). ``python -m ptp.drafters.docgen`` prints
``docs/drafter-options.md`` from these dataclasses.

This module imports neither torch nor the drafters (the registry imports it).
"""
import dataclasses
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping, Optional, Union

__all__ = ["DrafterOptions", "LookupOptions", "TreeOptions", "DraftVocabOptions", "SlotOptions",
           "LookupDrafterOptions", "PTPOptions", "MaskedOptions", "HeadsOptions", "NoOptions", "PTP_PRESETS",
           "RENAMED", "option", "like", "parse_items", "parse_spec"]

# old option key -> (new key, the drafter that used the old key): the options of one concept had
# a different name in each drafter
RENAMED = {
    "min_ngram": ("lookup_ngram", "lookup"),
    "lookup": ("lookup_ngram", "heads"),
    "max_ngram": ("lookup_max_ngram", "lookup"),
    "max_draft_tokens": ("lookup_tokens", "lookup"),
    "lookup_depth": ("lookup_tokens", "heads"),
    "num_branches": ("lookup_branches", "lookup"),
    "num_masks": ("num_slots", "masked"),
}

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def option(default: Any, help: str, *, min: Optional[float] = None, max: Optional[float] = None,
           below: Optional[float] = None, choices: Optional[tuple] = None) -> Any:
    """A dataclass field with its help and range: ``min <= value <= max``, ``value < below``,
    ``value in choices`` (``None`` of an optional field is always allowed)."""
    return field(default=default, metadata={"help": help, "min": min, "max": max, "below": below,
                                            "choices": choices})


def like(owner: type, name: str, default: Any = dataclasses.MISSING, help: Optional[str] = None,
         **limits) -> Any:
    """The field ``name`` of ``owner`` with another default, help or range (a drafter whose
    default differs from the shared part's)."""
    src = {f.name: f for f in fields(owner)}[name]
    meta = {**src.metadata, **limits}
    if help is not None:
        meta["help"] = help
    return field(default=src.default if default is dataclasses.MISSING else default, metadata=meta)


def _split_optional(tp) -> tuple[type, bool]:
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _type_name(tp) -> str:
    base, optional = _split_optional(tp)
    name = {bool: "bool", int: "int", float: "float", str: "str"}[base]
    return f"{name} or none" if optional else name


def _coerce(key: str, tp, value: Any) -> Any:
    """``value`` (its type, or text) as the field's type ``tp``; a clear error otherwise."""
    base, optional = _split_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() == "none"):
        if optional:
            return None
        raise ValueError(f"option {key} must be {_type_name(tp)}, got None")
    text = value.strip() if isinstance(value, str) else None
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"option {key} must be a bool (1/0, true/false, yes/no, on/off), got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            if text is not None:
                return int(text)
        except ValueError:
            pass
        raise ValueError(f"option {key} must be an integer{' or none' if optional else ''}, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            if text is not None:
                return float(text)
        except ValueError:
            pass
        raise ValueError(f"option {key} must be a number, got {value!r}")
    if text is None:
        raise ValueError(f"option {key} must be a string, got {value!r}")
    return text


def _check_range(f: dataclasses.Field, value: Any) -> None:
    if value is None:
        return
    m = f.metadata
    if m.get("choices") is not None and value not in m["choices"]:
        raise ValueError(f"option {f.name} must be one of {', '.join(map(str, m['choices']))}, got {value!r}")
    if m.get("min") is not None and value < m["min"]:
        raise ValueError(f"option {f.name} must be >= {m['min']}, got {value!r}")
    if m.get("max") is not None and value > m["max"]:
        raise ValueError(f"option {f.name} must be <= {m['max']}, got {value!r}")
    if m.get("below") is not None and not value < m["below"]:
        raise ValueError(f"option {f.name} must be < {m['below']}, got {value!r}")


@dataclass(frozen=True)
class DrafterOptions:
    """Base of the option dataclasses: converts and checks every field on construction."""

    DRAFTER: ClassVar[str] = "drafter"  # the registered name, for messages and the docs

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, self._field_value(f, hints, getattr(self, f.name)))
        self.check()

    @staticmethod
    def _field_value(f: dataclasses.Field, hints: dict, value: Any) -> Any:
        """``value`` (or its text) converted to field ``f``'s type and checked against its range."""
        value = _coerce(f.name, hints[f.name], value)
        _check_range(f, value)
        return value

    @classmethod
    def check_values(cls, values: Mapping[str, Any]) -> None:
        """Each of ``values`` (keys checked by :meth:`check_keys`) converted and range-checked on
        its own, without the constraints between fields (:meth:`check`)."""
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in values:
                cls._field_value(f, hints, values[f.name])

    def check(self) -> None:
        """Constraints between fields (after each field's own check)."""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def check_keys(cls, keys) -> None:
        """Unknown and renamed keys: an error that lists the valid keys / names the new one."""
        valid = cls.keys()
        for key in keys:
            if key in valid:
                continue
            new = RENAMED.get(key, (None,))[0]
            if new in valid:
                raise ValueError(f"drafter {cls.DRAFTER!r}: option {key!r} was renamed {new!r} "
                                 f"(docs/drafter-options.md)")
            listed = ", ".join(sorted(valid)) if valid else "none (it takes no options)"
            raise ValueError(f"drafter {cls.DRAFTER!r} has no option {key!r}; valid options: {listed}")

    @classmethod
    def build(cls, options: "Optional[DrafterOptions]" = None, **overrides) -> "DrafterOptions":
        """``options`` (an instance, default: the defaults) with ``overrides`` (values or text)."""
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"drafter {cls.DRAFTER!r} takes {cls.__name__}, got {type(options).__name__}")
        cls.check_keys(overrides)
        base = options if options is not None else cls()
        return dataclasses.replace(base, **overrides) if overrides else base

    def changed(self, base: "Optional[DrafterOptions]" = None) -> dict[str, Any]:
        """The fields whose value differs from ``base`` (default: the class defaults)."""
        ref = base if base is not None else type(self)()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(ref, f.name)}

    def describe(self, base: "Optional[DrafterOptions]" = None) -> str:
        """``k=v,...`` of :meth:`changed` (bools as 1/0)."""
        return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.changed(base).items())


@dataclass(frozen=True)
class NoOptions(DrafterOptions):
    """Plain decoding through the same machinery: no drafts, no options."""

    DRAFTER: ClassVar[str] = "none"


@dataclass(frozen=True)
class LookupOptions(DrafterOptions):
    """Prompt lookup (shared): drafts what followed earlier occurrences of the row's last tokens."""

    lookup_ngram: int = option(0, "prompt lookup: the shortest n-gram matched (the row's last "
                                  "n..lookup_max_ngram tokens, longest first, are looked up in its "
                                  "earlier tokens); 0 = off", min=0)
    lookup_max_ngram: int = option(3, "the longest n-gram prompt lookup matches", min=1)
    lookup_tokens: Optional[int] = option(None, "tokens of each lookup continuation (none: as deep "
                                                "as the drafter's own drafts)", min=1)
    lookup_branches: int = option(1, "continuations (the most recent longest distinct matches) "
                                     "merged into a draft tree as trie paths", min=1)

    def check(self) -> None:
        super().check()
        if self.lookup_ngram > self.lookup_max_ngram:
            raise ValueError(f"option lookup_ngram must be <= lookup_max_ngram ({self.lookup_max_ngram}), "
                             f"got {self.lookup_ngram}")


@dataclass(frozen=True)
class TreeOptions(DrafterOptions):
    """Greedy best-first draft trees (shared)."""

    tree: bool = option(False, "greedy: draft a best-first tree (the max_nodes likeliest paths of "
                               "each depth's top candidates) instead of a chain; sampling drafts "
                               "coupled chains")
    max_nodes: int = option(16, "draft nodes of a tree", min=1)
    top: int = option(4, "candidates per tree node (the top tokens of its depth)", min=1)
    min_prob: float = option(0.0, "cut a draft (chain or tree) where its path probability, by the "
                                  "drafter's own estimate, falls below this; 0 = off",
                             min=0.0, below=1.0)


@dataclass(frozen=True)
class DraftVocabOptions(DrafterOptions):
    """The draft vocabulary (shared by the drafters with an LM-head pass)."""

    draft_vocab: Optional[int] = option(None, "greedy drafts over the K tokens most frequent in "
                                              "the drafter's training answers (none: 8,192 when the "
                                              "checkpoint stores their counts, else the full "
                                              "vocabulary; 0 = the full vocabulary)", min=0)


@dataclass(frozen=True)
class SlotOptions(LookupOptions, TreeOptions, DraftVocabOptions):
    """Drafting on the verify call (shared by PTP and the masked-input drafter): groups of slot
    rows hang after draft nodes; the accepted node's group drafts the next step."""

    num_slots: Optional[int] = option(None, "slot rows per group, i.e. tokens a group drafts (none: "
                                            "the checkpoint's)", min=1)
    scheme: str = option("quadratic", "quadratic: a slot group after every draft node (the first "
                                      "max_groups); linear: after the last node only",
                         choices=("quadratic", "linear"))
    max_groups: Optional[int] = option(None, "quadratic: groups after the first G nodes only, root "
                                             "included (none: every node)", min=1)
    lookup_groups: Optional[int] = option(None, "slot groups of a row whose draft came from lookup "
                                                "(0: none, and a step whose rows all drafted by "
                                                "lookup runs without the adapter; none: as any row)",
                                          min=0)
    min_gain: float = option(0.0, "pause a row's slot groups for `rest` steps when the steps that "
                                  "carried them commit fewer tokens than this (EMA); 0 = off", min=0.0)
    rest: int = option(16, "steps a row's slot groups stay paused (min_gain)", min=1)
    lookup_tokens: Optional[int] = like(LookupOptions, "lookup_tokens", help=(
        "tokens of a lookup chain (none: as the slots' drafts) and of each continuation merged "
        "into a tree (none: num_slots)"))

    def check(self) -> None:
        super().check()
        if self.tree and self.scheme != "quadratic":
            raise ValueError(f"option tree needs scheme='quadratic' (a group after each of the first "
                             f"nodes), got scheme={self.scheme!r}")


@dataclass(frozen=True)
class LookupDrafterOptions(LookupOptions):
    """Prompt lookup (model-free): the continuation of the most recent longest match, or a trie of
    ``lookup_branches`` of them."""

    DRAFTER: ClassVar[str] = "lookup"
    lookup_ngram: int = like(LookupOptions, "lookup_ngram", 1, min=1,
                             help="the shortest n-gram matched (the row's last n..lookup_max_ngram "
                                  "tokens, longest first)")
    # measured on CPU (SmolLM2-135M, 2 threads, 8 dev prompts): 4-token chains beat 8-token ones
    # (1.41 vs 1.47 tokens per call, but a cheaper target call): 17.3 vs 16.4 tok/s
    lookup_tokens: int = like(LookupOptions, "lookup_tokens", 4, help="tokens of each continuation")
    max_nodes: int = like(TreeOptions, "max_nodes", 8, help="draft nodes of the trie (lookup_branches > 1)")
    row_cost: Optional[float] = option(None, "cost of one more row in a target call, as a fraction of a "
                                             "1-row call: the draft length maximises the expected tokens "
                                             "per call cost, learnt from the acceptance per depth and match "
                                             "class (none: on the CPU the step costs measured on a 2-core "
                                             "CPU, 1.26x a 1-row step for 2 rows, 1.78x for 4, 4.44x for 9; "
                                             "0 on a GPU; 0 = always lookup_tokens)", min=0.0)
    heads: Optional[str] = option(None, "MTP heads draft where lookup drafts nothing: a greedy chain of "
                                        "the heads (Q8_0 copies of their weights, a 2,048-token draft "
                                        "vocabulary), cut where its path probability falls below "
                                        "heads_min_prob; 'default' = the shipped heads when they fit the "
                                        "model (else off), or a heads checkpoint directory; none = off. "
                                        "CPU only; auto sets 'default' on a CPU")
    heads_tokens: int = option(2, "the most tokens a heads chain drafts", min=1)
    heads_min_prob: float = option(0.4, "cut a heads chain where its path probability (the heads' own "
                                        "estimate) falls below this", min=0.0, below=1.0)
    measured_costs: bool = option(False, "price the rows by this machine's own step times: every "
                                         "batch-1 step is timed by its row count, and the 2-core "
                                         "table's extra-row costs are scaled by the measured ones (the "
                                         "table stays their prior); needs the table (row_cost unset). "
                                         "Tokens never change; target-call counts then vary between runs")

    def check(self) -> None:
        super().check()
        if self.measured_costs and self.row_cost is not None:
            raise ValueError(f"option measured_costs prices rows by measured step times, which replaces "
                             f"row_cost: leave row_cost unset (got row_cost={self.row_cost})")


@dataclass(frozen=True)
class PTPOptions(SlotOptions):
    """Parallel token prediction (``ptp``, ``cptp``): a gated-LoRA adapter on the target drafts k
    tokens from k u-slots in one forward."""

    DRAFTER: ClassVar[str] = "ptp"
    scheme: str = like(SlotOptions, "scheme", choices=("quadratic", "linear", "separate"), help=(
        "quadratic: a slot group after every draft node (the first max_groups) of the verify call; "
        "linear: after the last node only; separate: a drafter call before each verify call "
        "(takes num_slots and draft_vocab only)"))
    check_first: bool = option(False, "drop a group's drafts when its slot 0 mispredicted the token "
                                      "verification picked")

    def check(self) -> None:
        super().check()
        if self.scheme == "separate":
            extra = {k: v for k, v in self.changed().items() if k not in ("scheme", "num_slots", "draft_vocab")}
            if extra:
                raise ValueError(f"scheme='separate' takes num_slots and draft_vocab only, got "
                                 f"{', '.join(f'{k}={v}' for k, v in extra.items())}")


@dataclass(frozen=True)
class MaskedOptions(SlotOptions):
    """Masked-input multi-token prediction: k learned mask rows per group, a sampler head."""

    DRAFTER: ClassVar[str] = "masked"


@dataclass(frozen=True)
class HeadsOptions(LookupOptions, TreeOptions, DraftVocabOptions):
    """Independent MTP heads on the target's final hidden state (chain or best-first tree);
    prompt lookup's continuations join the draft as trie branches."""

    DRAFTER: ClassVar[str] = "heads"
    top: int = like(TreeOptions, "top", 8)
    lookup_tokens: int = like(LookupOptions, "lookup_tokens", 8, help="tokens of each lookup continuation")
    verify: str = option("coupled", "coupled: drafts picked with the decoder's uniforms (token-identical "
                                    "to plain sampling); rejection: drafts sampled from the heads' q, "
                                    "verified by rejection sampling (the target's distribution)",
                         choices=("coupled", "rejection"))

    def check(self) -> None:
        super().check()
        if self.lookup_ngram > 0 and self.verify == "rejection":
            raise ValueError("option lookup_ngram needs verify='coupled' (lookup branches make a tree; "
                             "rejection sampling here verifies one chain drafted from the heads' q)")


# PTP's per-device settings (``preset=cpu|gpu|auto``; explicit options override them), measured on
# SmolLM2-135M-Instruct with the shipped adapters, greedy, 13 Spec-Bench dev prompts x 128 tokens:
# * cpu: every row of a call costs compute (2-core AMD EPYC: a 5-8 row verify call with the slots
#   costs ~1.5 one-row calls even with gated_lora_quant_linear). One group of 4 slots after the
#   root, prompt lookup's chain (up to 4 tokens) instead whenever the text repeats, and no slots
#   on those lookup steps (a call without the adapter), and a row's slots paused for 16 steps
#   when its slot steps commit under 1.5 tokens each (prose with little to copy, sampling with
#   adapters trained at T = 0): 2.63x HF generate greedy before min_gain
#   (benchmarks/results/archive/2026-12-05-cpu-ptp-cpu-preset.md); at T = 0.7 min_gain takes it from
#   2.24x to 2.58x (2026-12-05-cpu-ptp-min-gain-t07.md).
# * gpu: rows are nearly free in a small model's call: the best-first tree over the slots with
#   lookup's continuation merged in (2.9-3.1 tokens per call on the CPU measurements; the GPU
#   wall clock is not measured yet).
PTP_PRESETS: dict[str, PTPOptions] = {
    "cpu": PTPOptions(max_groups=1, lookup_ngram=1, num_slots=4, lookup_groups=0, lookup_tokens=4, min_gain=1.5),
    "gpu": PTPOptions(tree=True, lookup_ngram=1),
}


def parse_items(items: list[str], what: str = "--drafter-option") -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}`` (text values; ``-`` in a key reads as ``_``): the
    drafter's option dataclass converts the values."""
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ValueError(f"{what} needs KEY=VALUE, got {item!r}")
        if key in out:
            raise ValueError(f"{what}: option {key!r} given twice")
        out[key] = value.strip()
    return out


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """A benchmark spec ``name[:k=v;k2=v2]`` -> (drafter name or path, text options); ``,``
    separates options too (inside a comma-separated method list, use ``;``)."""
    name, _, opts = spec.partition(":")
    items = [kv for kv in re.split(r"[;,]", opts) if kv.strip()]
    return name, parse_items(items, what=f"drafter spec {spec!r}")
