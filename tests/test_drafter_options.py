"""Drafter options (``ptp.drafters.options``): typed conversion from text, ranges, unknown and
renamed keys, presets as instances, the ``k=v`` parsers, the benchmark's default specs, and the
generated ``docs/drafter-options.md`` (must equal the generator's text). No model is built."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from ptp.drafters.base import drafter_entries
from ptp.drafters.docgen import markdown
from ptp.drafters.options import (PTP_PRESETS, RENAMED, HeadsOptions, LookupDrafterOptions, MaskedOptions,
                                  NoOptions, PTPOptions, parse_items, parse_spec)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "drafter-options.md")
CLASSES = [LookupDrafterOptions, PTPOptions, MaskedOptions, HeadsOptions, NoOptions]


@pytest.mark.parametrize("cls", CLASSES)
def test_every_field_has_help_and_a_valid_default(cls):
    opts = cls()
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f.name
        assert getattr(opts, f.name) == f.default
    assert opts.changed() == {} and opts.describe() == ""


def test_text_values_are_converted_by_the_field_type():
    o = PTPOptions.build(tree="yes", max_nodes="32", min_prob="0.25", num_slots="none", scheme=" quadratic ",
                         lookup_tokens="7", check_first="0", max_groups=None, draft_vocab="0")
    assert o.tree is True and o.max_nodes == 32 and o.min_prob == 0.25 and o.num_slots is None
    assert o.lookup_tokens == 7 and o.check_first is False and o.draft_vocab == 0 and o.scheme == "quadratic"
    with pytest.raises(ValueError, match="option tree needs scheme='quadratic'"):
        PTPOptions.build(o, scheme="linear")  # caught when built, not when drafting
    o = PTPOptions(tree=1, min_prob=0, num_slots="3")
    assert (o.tree, o.min_prob, o.num_slots) == (True, 0.0, 3) and isinstance(o.min_prob, float)
    assert o.describe() == "tree=1,num_slots=3"


@pytest.mark.parametrize("key,value,message", [
    ("tree", "maybe", r"option tree must be a bool \(1/0, true/false, yes/no, on/off\), got 'maybe'"),
    ("tree", 2, "option tree must be a bool"),
    ("max_nodes", "8.5", "option max_nodes must be an integer, got '8.5'"),
    ("max_nodes", True, "option max_nodes must be an integer, got True"),
    ("max_nodes", "none", "option max_nodes must be an integer, got 'none'"),
    ("max_nodes", 0, "option max_nodes must be >= 1, got 0"),
    ("num_slots", "x", "option num_slots must be an integer or none, got 'x'"),
    ("min_prob", "high", "option min_prob must be a number, got 'high'"),
    ("min_prob", 1.0, r"option min_prob must be < 1.0, got 1.0"),
    ("min_prob", -0.1, r"option min_prob must be >= 0.0, got -0.1"),
    ("scheme", "cubic", "option scheme must be one of quadratic, linear, separate, got 'cubic'"),
    ("lookup_groups", -1, "option lookup_groups must be >= 0, got -1"),
    ("draft_vocab", -5, "option draft_vocab must be >= 0, got -5"),
])
def test_bad_values_are_clear_errors(key, value, message):
    with pytest.raises(ValueError, match=message):
        PTPOptions.build(**{key: value})


def test_cross_field_checks():
    with pytest.raises(ValueError, match=r"option lookup_ngram must be <= lookup_max_ngram \(3\), got 4"):
        PTPOptions(lookup_ngram=4)
    assert PTPOptions(lookup_ngram=4, lookup_max_ngram=5).lookup_ngram == 4
    with pytest.raises(ValueError, match="option lookup_ngram needs verify='coupled'"):
        HeadsOptions(lookup_ngram=1, verify="rejection")
    with pytest.raises(ValueError, match="scheme='separate' takes num_slots and draft_vocab only, got max_groups=2"):
        PTPOptions(scheme="separate", max_groups=2)
    assert PTPOptions(scheme="separate", num_slots=3, draft_vocab=0).num_slots == 3
    with pytest.raises(ValueError, match="option tree needs scheme='quadratic'"):
        MaskedOptions(tree=True, scheme="linear")


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(ValueError, match="drafter 'heads' has no option 'scheme'; valid options: draft_vocab, "
                                         "lookup_branches, lookup_max_ngram, lookup_ngram, lookup_tokens, "
                                         "max_nodes, min_prob, top, tree, verify$"):
        HeadsOptions.build(scheme="linear")
    with pytest.raises(ValueError, match="drafter 'none' has no option 'x'; valid options: none"):
        NoOptions.build(x=1)
    with pytest.raises(TypeError, match="drafter 'masked' takes MaskedOptions, got PTPOptions"):
        MaskedOptions.build(PTPOptions())


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_renamed_keys_name_the_new_one(old):
    new, drafter = RENAMED[old]
    cls = {"lookup": LookupDrafterOptions, "heads": HeadsOptions, "masked": MaskedOptions}[drafter]
    assert new in cls.keys() and old not in cls.keys()
    with pytest.raises(ValueError, match=f"drafter '{drafter}': option '{old}' was renamed '{new}'"):
        cls.build(**{old: "1"})


def test_one_name_per_concept_across_drafters():
    """The shared parts give every drafter the same key, type and check for a concept."""
    for key in ("lookup_ngram", "lookup_max_ngram", "lookup_tokens", "lookup_branches", "max_nodes"):
        for cls in (LookupDrafterOptions, PTPOptions, MaskedOptions, HeadsOptions):
            assert key in cls.keys(), (cls, key)
    for key in ("tree", "top", "min_prob", "draft_vocab"):
        assert all(key in cls.keys() for cls in (PTPOptions, MaskedOptions, HeadsOptions))
    assert "num_slots" in MaskedOptions.keys() and "num_masks" not in MaskedOptions.keys()
    assert (LookupDrafterOptions().lookup_ngram, HeadsOptions().lookup_ngram, PTPOptions().lookup_ngram) == (1, 0, 0)


def test_presets_are_frozen_instances():
    assert set(PTP_PRESETS) == {"cpu", "gpu"}
    cpu = PTP_PRESETS["cpu"]
    assert cpu.describe() == "lookup_ngram=1,lookup_tokens=4,num_slots=4,max_groups=1,lookup_groups=0,min_gain=1.5"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cpu.max_groups = 2
    over = PTPOptions.build(cpu, num_slots="3")
    assert over.num_slots == 3 and over.max_groups == 1 and cpu.num_slots == 4
    assert over.describe(cpu) == "num_slots=3"


def test_parsers():
    assert parse_items(["tree=1", "max-nodes = 8", "scheme=linear"]) == {"tree": "1", "max_nodes": "8",
                                                                       "scheme": "linear"}
    with pytest.raises(ValueError, match="--drafter-option needs KEY=VALUE, got 'tree'"):
        parse_items(["tree"])
    with pytest.raises(ValueError, match="option 'tree' given twice"):
        parse_items(["tree=1", "tree=0"])
    assert parse_spec("heads:tree=1;lookup_ngram=1;min_prob=0.1") == (
        "heads", {"tree": "1", "lookup_ngram": "1", "min_prob": "0.1"})
    assert parse_spec("lookup") == ("lookup", {})
    assert parse_spec("ptp:tree=1,max_nodes=8") == ("ptp", {"tree": "1", "max_nodes": "8"})
    with pytest.raises(ValueError, match="drafter spec 'ptp:tree' needs KEY=VALUE"):
        parse_spec("ptp:tree")


def test_e2e_default_specs_are_valid_options():
    """Every drafter spec of the benchmark's default methods builds its options (no old keys)."""
    sys.path.insert(0, ROOT)
    from benchmarks.e2e import DEFAULT_METHODS

    entries = dict(drafter_entries())
    specs = [s for s in DEFAULT_METHODS.split(",") if s not in ("hf", "hf-pld")]
    assert len(specs) >= 10
    for spec in specs:
        name, opts = parse_spec(spec)
        for own in ("rows", "fast", "quant"):  # the benchmark's own switches
            opts.pop(own, None)
        entry = entries[name]
        base = entry.presets[opts.pop("preset")] if "preset" in opts else None
        entry.options.build(base, **opts)


def test_drafter_options_doc_is_current():
    """``docs/drafter-options.md`` is generated (``python -m ptp.drafters.docgen``): it must equal
    the generator's text, so the documented options cannot drift from the dataclasses."""
    text = markdown()
    for name, entry in drafter_entries():
        assert f"## `{name}`" in text
    for key in PTPOptions.keys() + HeadsOptions.keys() + LookupDrafterOptions.keys():
        assert f"| `{key}` |" in text
    assert "| `num_masks` (masked) | `num_slots` |" in text
    with open(DOC) as f:
        assert f.read() == text, "stale: run python -m ptp.drafters.docgen > docs/drafter-options.md"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")]))
    proc = subprocess.run([sys.executable, "-m", "ptp.drafters.docgen", "--check", DOC], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_check_drafter_options_without_a_model():
    """check_drafter_options (the CLI's check before the model loads) raises what make_drafter
    would for the options alone, and leaves to make_drafter what needs the model's device or a
    checkpoint's own options."""
    from ptp.drafters import make_drafter
    from ptp.drafters.base import check_drafter_options

    ckpt = os.path.join(ROOT, "python", "ptp", "drafters", "weights", "ptp-smollm2-135m-instruct")
    fine = [("lookup", {}), ("lookup", {"lookup_tokens": "3", "measured_costs": "true"}),
            ("ptp", {"preset": "cpu", "max_nodes": "6"}), ("ptp", {"preset": "auto", "tree": "1"}),
            ("auto", {"anything": "1"}), (ckpt, {"max_nodes": "4"})]
    for name, opts in fine:
        check_drafter_options(name, opts)
    bad = [("nosuch", {}, "unknown drafter"), ("mtp", {}, "renamed"),
           ("lookup", {"nope": "1"}, "has no option 'nope'"),
           ("lookup", {"lookup_tokens": "0"}, "must be >= 1"),
           ("lookup", {"measured_costs": "true", "row_cost": "0.1"}, "leave row_cost unset"),
           ("ptp", {"preset": "fast"}, "preset must be one of"),
           ("ptp", {"preset": "auto", "num_slots": "x"}, "must be an integer"),
           (ckpt, {"nope": "1"}, "has no option 'nope'")]
    for name, opts, match in bad:
        with pytest.raises(ValueError, match=match):
            check_drafter_options(name, opts)
        if name not in ("nosuch", "mtp") and name != ckpt and opts.get("preset") != "auto":
            with pytest.raises(ValueError, match=match):  # the same error when building it
                make_drafter(name, **opts)
