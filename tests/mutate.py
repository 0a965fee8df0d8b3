"""Puts realistic bugs back into a copy of the tree, one at a time, and runs the fast suite against
each: a bug the suite lets through is a behaviour no fast test holds. The bugs are listed by module
in tests/mutants.toml; list new ones for every module a change touches, and run them before merging.

    python tests/mutate.py                                  every listed bug
    python tests/mutate.py --module train/trainer.py        the bugs of some modules
    python tests/mutate.py --list                           what is listed, nothing run
    python tests/mutate.py --check                          every entry still matches its module
    python tests/mutate.py --bugs new.toml                  a list of one's own (a blind round)

Each bug is one text replacement that must match exactly once (a stale entry is reported, not run).
The suite runs with -x, the tests an entry names first on their own, so a caught bug costs seconds;
one that survives costs a whole fast suite (about 3 minutes on 2 cores). The copy is a git
repository of its own (the set-up tests list its files through git). Exit status 0 when every bug
run was caught.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
LIST = Path(__file__).with_name("mutants.toml")
STALE_CHECK = "tests/test_layout.py::test_every_listed_bug_still_matches_its_module"


@dataclass(frozen=True)
class Mutant:
    module: str
    bug: str
    """what a user would see, in a line"""
    find: str
    replace: str
    tests: tuple[str, ...] = ()
    """test files run first (the rest of the fast suite follows)"""


@dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    verdict: str  # "caught", "survived" or "stale"
    seconds: float
    detail: str = ""


def read_mutants(path: Path = LIST) -> list[Mutant]:
    with open(path, "rb") as f:
        entries = tomllib.load(f)["mutant"]
    return [Mutant(**{**e, "tests": tuple(e.get("tests", ()))}) for e in entries]


def tree_copy(into: Path) -> Path:
    """The working tree as git sees it (tracked and untracked files, nothing ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
        capture_output=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    # a repository of its own: the tests that set up a fresh clone list its files through git
    subprocess.run(["git", "init", "-q"], cwd=into, check=True)
    subprocess.run(["git", "add", "-A"], cwd=into, check=True)
    return into


def run_one(mutant: Mutant, python: str, timeout_s: float) -> Outcome:
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="maeflow-mutant-") as folder:
        tree = tree_copy(Path(folder))
        module = tree / mutant.module
        text = module.read_text()
        found = text.count(mutant.find)
        if found != 1:
            return Outcome(mutant, "stale", 0.0, f"the text to replace is found {found} times")
        module.write_text(text.replace(mutant.find, mutant.replace))
        # the bug is a change to the module's text, which the entries' own check would report
        pytest = [python, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                  "--deselect", STALE_CHECK]
        # the entry's own tests first, on their own (a caught bug costs seconds), then the rest
        for targets in ([*mutant.tests], ["tests"]) if mutant.tests else (["tests"],):
            try:
                done = subprocess.run([*pytest, *targets], cwd=tree, capture_output=True,
                                      text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return Outcome(mutant, "caught", time.monotonic() - began, "the suite timed out")
            if done.returncode != 0:
                failed = [line for line in done.stdout.splitlines()
                          if line.startswith(("FAILED", "ERROR"))]
                return Outcome(mutant, "caught", time.monotonic() - began,
                               failed[0] if failed else done.stdout[-300:])
        return Outcome(mutant, "survived", time.monotonic() - began)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", help="only this module's bugs (repeatable)")
    parser.add_argument("--bugs", type=Path, default=LIST, help="the list of bugs (a TOML file)")
    parser.add_argument("--list", action="store_true", help="list the bugs, run nothing")
    parser.add_argument("--check", action="store_true",
                        help="check that each entry's text is found once in its module")
    parser.add_argument("--jobs", type=int, default=1, help="bugs run side by side")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the suite")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per bug's suite")
    args = parser.parse_args(argv)
    mutants = [m for m in read_mutants(args.bugs) if not args.module or m.module in args.module]
    if args.list:
        for m in mutants:
            print(f"{m.module}: {m.bug}")
        return 0
    if args.check:
        stale = [m for m in mutants if (REPO / m.module).read_text().count(m.find) != 1]
        for m in stale:
            print(f"stale: {m.module}: {m.bug}")
        return int(bool(stale))
    by_module: dict[str, list[Outcome]] = defaultdict(list)
    with ThreadPoolExecutor(args.jobs) as pool:
        for outcome in pool.map(lambda m: run_one(m, args.python, args.timeout), mutants):
            by_module[outcome.mutant.module].append(outcome)
            print(f"{outcome.verdict:8} {outcome.seconds:5.0f} s  {outcome.mutant.module}: "
                  f"{outcome.mutant.bug}  {outcome.detail}", flush=True)
    print("\nkill rate by module:")
    for module, outcomes in sorted(by_module.items()):
        run = [o for o in outcomes if o.verdict != "stale"]
        caught = sum(o.verdict == "caught" for o in run)
        print(f"  {module}: {caught}/{len(run)}"
              + (f" ({len(outcomes) - len(run)} stale)" if len(run) < len(outcomes) else ""))
    return int(any(o.verdict == "survived" for outcomes in by_module.values() for o in outcomes))


if __name__ == "__main__":
    sys.exit(main())
