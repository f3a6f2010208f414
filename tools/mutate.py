"""Mutation testing before a release: does the test suite notice a broken library?

Each mutation in ``tools/mutations.py`` names a file, an exact snippet of it, a
replacement and the tests that should catch the change. For each one this script
copies the repository to a scratch directory (the working tree is never
modified), applies the mutation there, runs the selected tests against the
scratch copy and reports:

* ``caught``  the tests failed (or timed out) on the mutant;
* ``MISSED``  the tests passed on the mutant: a hole in the suite;
* ``ERROR``   the snippet was not found exactly once (the code moved: update the
  list), or the unmutated tests did not pass, or pytest could not run them.

Usage (``make mutate`` runs the first line)::

    .venv/bin/python tools/mutate.py                  # every mutation
    .venv/bin/python tools/mutate.py --only optim-tensor-lr,ess-formula
    .venv/bin/python tools/mutate.py --list

Exit status: 0 if every mutation was caught, 1 if some were missed, 2 on any error.
Not part of CI: it takes a few minutes (one pytest run per mutation).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mutations import MUTATIONS, Mutation

ROOT = Path(__file__).resolve().parents[1]
COPY = ("vcpo_optim", "tests", "examples", "pyproject.toml")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")


def pytest_cmd(selection: tuple[str, ...]) -> list[str]:
    # A fixed hypothesis seed makes the score reproducible: the same examples for every mutant.
    opts = ["-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0"]
    return [sys.executable, "-m", "pytest", *opts, *selection]


def run_tests(scratch: Path, selection: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """Run ``selection`` in ``scratch``: ``("pass" | "fail" | "timeout" | "error", seconds, tail)``."""
    env = {**os.environ, "PYTHONPATH": str(scratch), "OMP_NUM_THREADS": "1"}
    # No example database: a failure found on one mutant must not be replayed on the next.
    shutil.rmtree(scratch / ".hypothesis", ignore_errors=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            pytest_cmd(selection),
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    seconds = time.perf_counter() - t0
    tail = (proc.stdout + proc.stderr)[-1500:]
    # pytest: 0 all passed, 1 some failed; 2-5 interrupted, internal error, usage, nothing collected
    outcome = {0: "pass", 1: "fail"}.get(proc.returncode, "error")
    return outcome, seconds, tail


def check_baseline(
    scratch: Path, selections: list[tuple[str, ...]], timeout: float
) -> dict[tuple[str, ...], str]:
    """Outcome of every selection on the unmutated tree (``"pass"`` or why not).

    One pytest run over the union of the selections first (a pytest start per
    selection costs more than most of them take); only if that does not pass,
    or some selection holds an option (``-k ...``) that cannot be merged, each
    selection on its own, to name the ones that fail.
    """
    if selections and not any(a.startswith("-") for sel in selections for a in sel):
        union = tuple(dict.fromkeys(a for sel in selections for a in sel))
        outcome, _, _ = run_tests(scratch, union, timeout)
        if outcome == "pass":
            return dict.fromkeys(selections, "pass")
    baseline: dict[tuple[str, ...], str] = {}
    for selection in selections:
        outcome, _, tail = run_tests(scratch, selection, timeout)
        baseline[selection] = outcome
        if outcome != "pass":
            print(f"ERROR    unmutated tests do not pass ({outcome}): {' '.join(selection)}")
            print(tail)
    return baseline


def check(root: Path, m: Mutation) -> str | None:
    """Why ``m`` cannot be applied to the tree at ``root``, or ``None`` if it can."""
    path = root / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    count = path.read_text().count(m.original)
    if count != 1:
        return f"snippet found {count} times in {m.file} (must be exactly once): {m.original!r}"
    if m.original == m.replacement:
        return "the replacement equals the snippet"
    return None


def apply(root: Path, m: Mutation) -> str | None:
    """Write the mutant into the tree at ``root``; return an error message instead if impossible."""
    error = check(root, m)
    if error is None:
        path = root / m.file
        path.write_text(path.read_text().replace(m.original, m.replacement))
    return error


def main(argv: list[str] | None = None, mutations: list[Mutation] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated mutation ids")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    args = p.parse_args(argv)
    all_mutations = MUTATIONS if mutations is None else mutations

    ids = [m.id for m in all_mutations]
    if len(set(ids)) != len(ids):
        print("mutate: duplicate mutation ids", file=sys.stderr)
        return 2
    chosen = list(all_mutations)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(ids))
        if unknown:
            print(f"mutate: unknown mutation ids: {', '.join(unknown)}", file=sys.stderr)
            return 2
        chosen = [m for m in all_mutations if m.id in wanted]
    if args.list:
        for m in chosen:
            print(f"{m.id:32s} {m.file:36s} {m.what}")
        return 0

    results: list[dict[str, object]] = []
    # A snippet that is not found is an error, reported before anything runs.
    problems = {m.id: check(ROOT, m) for m in chosen}
    runnable = [m for m in chosen if problems[m.id] is None]
    for m in chosen:
        if problems[m.id] is not None:
            results.append({"id": m.id, "file": m.file, "status": "ERROR", "seconds": 0.0})
            print(f"{'ERROR':8s} {m.id:32s} {0.0:5.1f} s  {m.what}  ({problems[m.id]})", flush=True)
    if runnable:
        with tempfile.TemporaryDirectory(prefix="vcpo-mutate-") as tmp:
            scratch = Path(tmp) / "repo"
            scratch.mkdir()
            for name in COPY:
                src = ROOT / name
                if src.is_dir():
                    shutil.copytree(src, scratch / name, ignore=IGNORE)
                else:
                    shutil.copy2(src, scratch / name)
            probe = subprocess.run(
                [sys.executable, "-c", "import vcpo_optim; print(vcpo_optim.__file__)"],
                cwd=scratch,
                env={**os.environ, "PYTHONPATH": str(scratch)},
                capture_output=True,
                text=True,
                check=False,
            )
            if not probe.stdout.strip().startswith(str(scratch)):
                print(f"mutate: the scratch copy is not imported: {probe.stdout}{probe.stderr}")
                return 2

            # The unmutated selections must pass, or "caught" would mean nothing.
            baseline = check_baseline(
                scratch, list(dict.fromkeys(m.tests for m in runnable)), args.timeout
            )

            print(f"{len(runnable)} mutations, tests run from a scratch copy of {ROOT}")
            for m in runnable:
                path = scratch / m.file
                original = path.read_text() if path.is_file() else None
                if baseline[m.tests] != "pass":
                    status, seconds, detail = "ERROR", 0.0, "unmutated tests do not pass"
                else:
                    error = apply(scratch, m)
                    if error is not None:
                        status, seconds, detail = "ERROR", 0.0, error
                    else:
                        try:
                            outcome, seconds, tail = run_tests(scratch, m.tests, args.timeout)
                        finally:
                            path.write_text(original or "")
                        status = {"fail": "caught", "timeout": "caught", "pass": "MISSED"}.get(
                            outcome, "ERROR"
                        )
                        detail = "timed out" if outcome == "timeout" else ""
                        if outcome == "error":
                            detail = "pytest could not run: " + tail.strip().splitlines()[-1]
                results.append(
                    {"id": m.id, "file": m.file, "status": status, "seconds": round(seconds, 1)}
                )
                extra = f"  ({detail})" if detail else ""
                print(f"{status:8s} {m.id:32s} {seconds:5.1f} s  {m.what}{extra}", flush=True)

    caught = sum(r["status"] == "caught" for r in results)
    missed = [r["id"] for r in results if r["status"] == "MISSED"]
    errors = [r["id"] for r in results if r["status"] == "ERROR"]
    print(
        f"\nscore: {caught}/{len(results)} caught ({100.0 * caught / max(len(results), 1):.0f}%)"
        f"; missed: {', '.join(map(str, missed)) or 'none'}"
        f"; errors: {', '.join(map(str, errors)) or 'none'}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 2 if errors else 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
