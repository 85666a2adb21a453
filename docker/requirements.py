"""Print the requirements that pyproject.toml declares, one per line, for the image's dependency layer.

    python3 docker/requirements.py pyproject.toml --extra cpu                      # everything
    python3 docker/requirements.py pyproject.toml --extra cpu --only torch torchvision

The Dockerfile installs these before it copies the code, so that a code change rebuilds only the
last layer; pyproject.toml stays the one place that pins versions. Everything means the build
system's requirements (the code layer builds without isolation, offline), the project's
dependencies and those of ``--extra``. An extra that pyproject.toml does not declare is
reported on stderr and skipped, as pip does for ``pip install '.[extra]'``. Standard library
only: it runs with the base image's python3 before the venv has anything in it.
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib


def requirement_name(requirement: str) -> str:
    """The normalised project name of a PEP 508 requirement ("faiss_cpu>=1.15" -> "faiss-cpu")."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_requirements(pyproject: dict, extra: str | None) -> list[str]:
    requirements = list(pyproject.get("build-system", {}).get("requires", []))
    project = pyproject["project"]
    requirements += project.get("dependencies", [])
    if extra:
        extras = project.get("optional-dependencies", {})
        if extra in extras:
            requirements += extras[extra]
        else:
            print(f"warning: pyproject.toml declares no extra {extra!r} (it has: {', '.join(extras)})",
                  file=sys.stderr)
    return requirements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--extra", default=None, help="optional-dependencies group to include")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="print only the requirements on these projects")
    args = parser.parse_args()
    with open(args.pyproject, "rb") as fh:
        requirements = declared_requirements(tomllib.load(fh), args.extra)
    if args.only is not None:
        wanted = {requirement_name(name) for name in args.only}
        requirements = [r for r in requirements if requirement_name(r) in wanted]
        missing = wanted - {requirement_name(r) for r in requirements}
        if missing:
            sys.exit(f"error: pyproject.toml has no requirement on {', '.join(sorted(missing))}")
    print("\n".join(requirements))


if __name__ == "__main__":
    main()
