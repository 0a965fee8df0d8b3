"""What `bash run.sh wheels` puts in a wheelhouse for nodes without network, computed with this
interpreter alone.

    python3 install/wheelhouse.py requirements --extras test,dali-cuda12 --torch "torch==2.13.0+cpu"
        pyproject.toml's requirements and the named extras, one per line, torch pinned as given
    python3 install/wheelhouse.py prune DIR/requirements.txt --python 3.12 --without torch
        remove from DIR the wheels that only `--without` needs: what remains installs around a
        node's own torch

It runs before anything is installed, on Python 3.10 or later: tomllib, or the TOML reader and the
requirement parser pip carries with it.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
except ModuleNotFoundError:
    from pip._vendor.packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extras: list[str], torch: str) -> list[str]:
    """The project's requirements and those of `extras`, with torch replaced by `torch` (a pinned
    build)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    wanted = [
        *project["dependencies"],
        *(r for extra in extras for r in project["optional-dependencies"][extra]),
    ]
    return [torch if normalized(Requirement(r).name) == "torch" else r for r in wanted]


def wheel_requirements(wheel: Path) -> tuple[str, list[Requirement]]:
    """A wheel's project name and the requirements its METADATA lists."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        fields = Parser().parsestr(archive.read(metadata).decode())
    return normalized(fields["Name"]), [
        Requirement(r) for r in fields.get_all("Requires-Dist") or []
    ]


def needed(wheels: dict[str, list[Requirement]], roots: list[Requirement], python: str,
           without: set[str]) -> set[str]:
    """The projects `roots` need on Linux x86-64 under Python `python`, following each wheel's
    requirements (with the extras asked of it), never into `without`."""
    environment = {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    seen: set[tuple[str, str]] = set()
    pending = [(r, "") for r in roots]
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({**environment, "extra": extra}):
            continue
        name = normalized(requirement.name)
        if name in without:
            continue
        for asked in ("", *sorted(requirement.extras)):
            if (name, asked) not in seen:
                seen.add((name, asked))
                pending += [(r, asked) for r in wheels.get(name, [])]
    return {name for name, _ in seen}


def prune(folder: Path, roots: list[str], python: str, without: set[str]) -> list[Path]:
    """Remove the wheels in `folder` that `roots` do not need once `without` is left out; returns
    them."""
    wheels = {path: wheel_requirements(path) for path in sorted(folder.glob("*.whl"))}
    graph = {name: requires for name, requires in wheels.values()}
    keep = needed(graph, [Requirement(r) for r in roots], python, {normalized(n) for n in without})
    removed = [path for path, (name, _) in wheels.items() if name not in keep]
    for path in removed:
        path.unlink()
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="install/wheelhouse.py")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("requirements")
    listing.add_argument("--extras", default="")
    listing.add_argument(
        "--torch", required=True, help="the torch requirement, e.g. torch==2.13.0+cpu"
    )
    pruning = commands.add_parser("prune")
    pruning.add_argument(
        "requirements", type=Path, help="the wheelhouse's requirements.txt, in its folder"
    )
    pruning.add_argument("--python", required=True)
    pruning.add_argument("--without", action="append", default=[])
    args = parser.parse_args(argv)
    if args.command == "requirements":
        print("\n".join(requirements([e for e in args.extras.split(",") if e], args.torch)))
    else:
        roots = [line for line in args.requirements.read_text().splitlines() if line.strip()]
        removed = prune(args.requirements.parent, roots, args.python, set(args.without))
        print(f"[wheels] without {', '.join(args.without)}: removed {len(removed)} wheels "
              f"({', '.join(p.name.split('-')[0] for p in removed) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
