"""tools/mutate.py: a mutation whose snippet is not found is an error, never a silent skip."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def mutate():
    sys.path.insert(0, str(TOOLS))
    try:
        spec = importlib.util.spec_from_file_location("vcpo_mutate_tool", TOOLS / "mutate.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(TOOLS))


def test_check_and_apply(mutate, tmp_path: Path) -> None:
    Mutation = mutate.Mutation
    (tmp_path / "m.py").write_text("x = 1\ny = x + 1\nz = x + 1\n")
    ok = Mutation("ok", "m.py", "x = 1", "x = 2", ("t",), "")
    twice = Mutation("twice", "m.py", "x + 1", "x - 1", ("t",), "")
    absent = Mutation("absent", "m.py", "w = 3", "w = 4", ("t",), "")
    nofile = Mutation("nofile", "n.py", "x", "y", ("t",), "")
    assert mutate.check(tmp_path, ok) is None
    assert "2 times" in mutate.check(tmp_path, twice)
    assert "0 times" in mutate.check(tmp_path, absent)
    assert "does not exist" in mutate.check(tmp_path, nofile)
    assert mutate.apply(tmp_path, twice) is not None
    assert (tmp_path / "m.py").read_text() == "x = 1\ny = x + 1\nz = x + 1\n"  # untouched
    assert mutate.apply(tmp_path, ok) is None
    assert (tmp_path / "m.py").read_text() == "x = 2\ny = x + 1\nz = x + 1\n"


def test_missing_snippet_is_an_error_and_nothing_runs(mutate, tmp_path, capsys) -> None:
    bogus = mutate.Mutation(
        "bogus", "vcpo_optim/ess.py", "this snippet is not in ess.py", "x", ("tests",), "moved"
    )
    out = tmp_path / "r.json"
    assert mutate.main(["--json", str(out)], mutations=[bogus]) == 2
    printed = capsys.readouterr().out
    assert "ERROR" in printed and "0 times" in printed and "errors: bogus" in printed
    assert json.loads(out.read_text())[0]["status"] == "ERROR"


def test_the_mutation_list_is_well_formed(mutate) -> None:
    ids = [m.id for m in mutate.MUTATIONS]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    for m in mutate.MUTATIONS:
        assert m.original != m.replacement and m.tests and m.what
        args = list(m.tests)
        for i, arg in enumerate(args):
            if arg.startswith("-") or (i and args[i - 1] == "-k"):
                continue  # an option (-k EXPR), not a path
            assert (TOOLS.parent / arg.split("::")[0]).exists(), arg


def test_every_snippet_occurs_exactly_once_in_its_file(mutate) -> None:
    """The mutation list follows the code: a snippet the code no longer has is caught here,
    in every test run, not only when someone runs make mutate."""
    root = TOOLS.parent
    drift = [
        (m.id, m.file, (root / m.file).read_text().count(m.original))
        for m in mutate.MUTATIONS
        if (root / m.file).read_text().count(m.original) != 1
    ]
    assert not drift, f"(id, file, occurrences) of snippets not found exactly once: {drift}"


def test_baseline_runs_the_union_once_and_splits_only_on_failure(
    mutate, monkeypatch, tmp_path, capsys
) -> None:
    calls: list[tuple[str, ...]] = []
    failing = {"b.py"}

    def fake(scratch, selection, timeout):
        calls.append(selection)
        return ("fail" if failing & set(selection) else "pass"), 0.0, "tail"

    monkeypatch.setattr(mutate, "run_tests", fake)
    sels = [("a.py",), ("a.py", "c.py::t"), ("b.py",)]
    failing.clear()
    assert mutate.check_baseline(tmp_path, sels, 1.0) == dict.fromkeys(sels, "pass")
    assert calls == [("a.py", "c.py::t", "b.py")]  # one run, duplicates merged
    calls.clear()
    failing.add("b.py")
    out = mutate.check_baseline(tmp_path, sels, 1.0)
    assert out == {sels[0]: "pass", sels[1]: "pass", sels[2]: "fail"}
    assert calls == [("a.py", "c.py::t", "b.py"), *sels]
    assert "unmutated tests do not pass (fail): b.py" in capsys.readouterr().out
    calls.clear()
    failing.clear()
    with_option = [("a.py", "-k", "x"), ("b.py",)]
    assert mutate.check_baseline(tmp_path, with_option, 1.0) == dict.fromkeys(with_option, "pass")
    assert calls == with_option  # an option is never merged into a union
