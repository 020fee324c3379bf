"""Benchmark helpers that decide what is measured (benchmarks/e2e.py)."""
from __future__ import annotations

import collections

import pytest

from benchmarks.e2e import parse_method, row_switch, select_questions


def _questions():
    cats = ["qa"] * 10 + ["math"] * 3 + ["coding"] * 1 + ["rag"] * 6
    return [{"question_id": i, "category": c} for i, c in enumerate(cats)]


def test_select_categories_covers_every_category_once():
    qs = _questions()
    got = select_questions(qs, 4)
    assert collections.Counter(q["category"] for q in got) == {"qa": 1, "math": 1, "coding": 1,
                                                               "rag": 1}
    ids = [q["question_id"] for q in got]
    assert ids == sorted(ids) == [0, 10, 13, 14]  # the first of each, in file order


def test_select_categories_round_robin_and_limits():
    qs = _questions()
    got = select_questions(qs, 9)
    count = collections.Counter(q["category"] for q in got)
    assert count == {"qa": 3, "math": 3, "coding": 1, "rag": 2}  # coding has only one
    assert len({q["question_id"] for q in got}) == 9
    assert select_questions(qs, 0) == qs and select_questions(qs, 100) == qs


def test_select_stride_and_bad_choice():
    qs = _questions()
    assert [q["question_id"] for q in select_questions(qs, 5, "stride")] == [0, 4, 8, 12, 16]
    with pytest.raises(ValueError, match="unknown selection"):
        select_questions(qs, 5, "random")


def test_parse_method_options():
    # text values: the drafter's option dataclass converts (and checks) them
    assert parse_method("ptp:num_slots=4,scheme=linear,min_prob=0.5") == (
        "ptp", {"num_slots": "4", "scheme": "linear", "min_prob": "0.5"})
    assert parse_method("ptp:num_slots=4;scheme=linear") == ("ptp", {"num_slots": "4", "scheme": "linear"})
    assert parse_method("lookup") == ("lookup", {})


def test_row_switch():
    assert row_switch("auto") is None and row_switch("on") is True and row_switch("off") is False
    assert row_switch(0) is False and row_switch(True) is True
    name, opts = parse_method("none:rows=off")
    assert name == "none" and row_switch(opts["rows"]) is False
    with pytest.raises(ValueError, match="auto, on or off"):
        row_switch("sometimes")


def test_heads_tree_sim_decode_walk():
    from benchmarks.experiments.heads_tree_sim import decode_walk

    # one sequence of 6 anchors: steps at 0 (accepts 2 -> 3 tokens), 3 (0 -> 1), 4 (3 -> capped at 2)
    assert decode_walk([2, 9, 9, 0, 3, 9], [6]) == (6, 3)
    # two sequences back to back: the walk restarts at each; nothing accepted -> one call per token
    assert decode_walk([0, 0, 1, 0, 0], [2, 3]) == (5, 4)
    # a predictable run is one step in decoding but counts at each of its positions in the
    # all-positions mean: 7 tokens / 4 calls = 1.75 against 1 + 6 / 7 = 1.857
    acc = [3, 2, 1, 0, 0, 0, 0]
    assert decode_walk(acc, [7]) == (7, 4) and 7 / 4 < 1 + sum(acc) / len(acc)
    t, c = decode_walk([1, 0, 1, 0], [4])
    assert (t, c) == (4, 2)
    assert decode_walk([], []) == (0, 0)


def test_heads_tree_sim_accepted_depth():
    from benchmarks.experiments.heads_tree_sim import accepted_depth

    # root -> 5 -> 6 -> 1, root -> 7 -> 8, root -> 5 -> 9
    tokens, parents = [0, 5, 6, 7, 1, 8, 9], [-1, 0, 1, 0, 2, 3, 1]
    assert accepted_depth(tokens, parents, [5, 6, 1, 4]) == 3
    assert accepted_depth(tokens, parents, [5, 9, 2, 2]) == 2
    assert accepted_depth(tokens, parents, [7, 8, 0, 0]) == 2
    assert accepted_depth(tokens, parents, [7, 3, 0, 0]) == 1
    assert accepted_depth(tokens, parents, [2, 5, 6, 1]) == 0  # a path must start at the root
    assert accepted_depth(tokens, parents, [5, 6]) == 2  # no deeper than the truth
    assert accepted_depth([0], [-1], [1, 2]) == 0


def test_benchmark_scripts_do_not_shadow_modules_transformers_probes():
    """``python benchmarks/X.py`` puts ``benchmarks/`` first on ``sys.path``, so a script named like
    a package transformers probes for (``kernels``: transformers 5.25 then imports our script as
    the hub-kernels package and fails while loading the model) breaks every benchmark. No script
    stem may be one of the package names in transformers' ``import_utils`` probes, nor shadow an
    installed top-level module."""
    import importlib.util
    import os
    import re

    import transformers.utils.import_utils as iu

    with open(iu.__file__) as f:
        probed = set(re.findall(r'_is_package_available\(\s*"([A-Za-z0-9_.\-]+)"', f.read()))
    assert "torch" in probed  # the pattern still finds the probes
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    stems = {n[:-3] for n in os.listdir(root) if n.endswith(".py") and not n.startswith("__")}
    assert "e2e" in stems
    assert not stems & probed, sorted(stems & probed)
    shadowing = sorted(s for s in stems if importlib.util.find_spec(s) is not None
                       and not (importlib.util.find_spec(s).origin or "").startswith(root))
    assert not shadowing, shadowing


def test_vs_llamacpp_skips_cleanly_without_llama_cpp(monkeypatch, capsys):
    """Without llama-cpp-python the comparison says why and exits 0 before loading anything."""
    import ptp.models
    from benchmarks import vs_llamacpp

    def no_load(*a, **k):
        raise AssertionError("the model must not load when llama.cpp is absent")
    monkeypatch.setattr(ptp.models, "load_target", no_load)
    monkeypatch.setattr(vs_llamacpp, "llama_cpp_available", lambda: False)
    assert vs_llamacpp.main(["--per-category", "1"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "pip install llama-cpp-python" in out


def test_vs_llamacpp_refuses_a_busy_machine_and_bad_arguments(monkeypatch):
    from benchmarks import vs_llamacpp

    monkeypatch.setattr(vs_llamacpp, "llama_cpp_available", lambda: True)
    assert vs_llamacpp.main(["--max-load", "-1"]) == 3  # any load average is above -1
    with pytest.raises(SystemExit, match="must be >= 1"):
        vs_llamacpp.main(["--per-category", "0"])
    with pytest.raises(SystemExit, match="--temperature must be >= 0"):
        vs_llamacpp.main(["--temperature", "-1"])
    with pytest.raises(SystemExit, match="not an executable"):
        vs_llamacpp.find_llama_bench("/nonexistent/llama-bench")


def test_vs_llamacpp_llama_bench_at_prompt_depths(tmp_path):
    """llama-bench runs once over the prompts' distinct depths and its JSON rows map back to
    them; a failing binary or a missing depth gives None (the report then leaves it out)."""
    import stat
    import sys

    from benchmarks.vs_llamacpp import llama_bench_depths

    fake = tmp_path / "llama-bench"
    log = tmp_path / "argv.txt"
    fake.write_text(f"""#!{sys.executable}
import json, sys
open({str(log)!r}, "w").write(" ".join(sys.argv[1:]))
a = sys.argv[1:]
depths = [int(d) for d in a[a.index("-d") + 1].split(",")]
drop = {str(tmp_path / "drop")!r}
import os
if os.path.exists(drop):
    depths = depths[:-1]
print(json.dumps([{{"n_depth": d, "avg_ts": 1000.0 / (d + 10)}} for d in depths]))
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    got = llama_bench_depths(str(fake), "m.gguf", 2, [30, 10, 30, 90], n=64, reps=3)
    assert got == {10: 50.0, 30: 25.0, 90: 10.0}
    argv = log.read_text().split()
    assert argv[argv.index("-d") + 1] == "10,30,90" and argv[argv.index("-n") + 1] == "64"
    assert argv[argv.index("-r") + 1] == "3" and argv[argv.index("-t") + 1] == "2"
    (tmp_path / "drop").write_text("")
    assert llama_bench_depths(str(fake), "m.gguf", 2, [10, 30]) is None
    assert llama_bench_depths(str(tmp_path / "absent"), "m.gguf", 2, [10]) is None


def test_vs_llamacpp_per_category_selection():
    from benchmarks.vs_llamacpp import per_category

    qs = _questions()
    got = per_category(qs, 2)
    assert [q["question_id"] for q in got] == [0, 1, 10, 11, 13, 14, 15]
    assert collections.Counter(q["category"] for q in got) == {"qa": 2, "math": 2, "coding": 1, "rag": 2}


def test_step_costs_benchmark_on_a_tiny_model():
    """bench_step_costs: the cycling drafter's row counts, the per-row-count groups (tokens
    checked against plain decoding inside), the ratios and the report's rows."""
    from benchmarks.bench_step_costs import CyclingDrafter, measure, report, step_costs
    from ptp.models import tiny_model

    d = CyclingDrafter(3, token=5)
    from ptp.decode.draft import DraftRequest
    from ptp.decode.sampling import SamplingConfig
    req = DraftRequest([[1, 2, 3]], [0], 16, SamplingConfig())
    drafts = [d.propose(req) for _ in range(4)]
    assert d.rows == [1, 2, 3, 1] and drafts[0] is None and drafts[3] is None
    assert drafts[2].tokens[0, 1:].tolist() == [5, 5] and drafts[2].parents[0].tolist() == [-1, 0, 1]
    with pytest.raises(ValueError):
        CyclingDrafter(0, token=1)

    model = tiny_model("llama", vocab_size=61, seed=0)
    prompts = [list(range(3, 12)), list(range(5, 30))]
    times = measure(model, None, prompts, max_new=12, max_rows=3, token=60, long_prompt=20)
    assert set(times["short"]) == {1, 2, 3} and set(times["long"]) == {1, 2, 3}
    assert 8 <= sum(len(v) for g in times.values() for v in g.values()) <= 2 * 11  # a step per commit
    costs = step_costs(times["short"])
    assert costs[1][1] == 1.0 and all(c[0] > 0 for c in costs.values())
    lines = report(times, 3)
    assert len(lines) == 2 + 3 and lines[2].startswith("| 1 | ") and lines[2].endswith("| 1.000 |")
    with pytest.raises(ValueError, match="no 1-row steps"):
        step_costs({2: [0.1]})


def test_fit_lookup_prior_replay():
    """fit_lookup_prior: every lookup along an answer scored against the answer's next tokens."""
    from benchmarks.fit_lookup_prior import replay, table

    period = [11, 12, 13, 14, 15]
    model = replay([([1, 2] + period, period * 3)], depth=4)  # the answer repeats the prompt
    rates = table(model, 4)
    assert rates and all(r == (1.0, 1.0, 1.0, 1.0) for r in rates.values())  # every lookup right
    model = replay([([1, 2, 3], [4, 1, 5, 1, 6, 1, 7])], depth=2)  # after 1, never the same token
    rates = table(model, 2)
    assert rates and all(r[0] == 0.0 for r in rates.values())
    assert sum(model.reached.values()) >= 3


def test_ab_decode_refuses_bad_arguments():
    from benchmarks import ab_decode

    for argv in (["none", "--reps", "0"], ["none", "--per-category", "0"], ["none", "--temperature", "-1"]):
        with pytest.raises(SystemExit, match="must be"):
            ab_decode.main(argv)
    with pytest.raises(SystemExit):
        ab_decode.main([])  # at least one method
