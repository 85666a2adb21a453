"""The files a newcomer meets first: the README's commands, CI, and the compose services."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> dict[str, str]:
    """The two commands of the README's quick start, by their labels."""
    text = (ROOT / "README.md").read_text()
    found = dict(re.findall(r"<!-- (main-job|tests) -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S))
    assert set(found) == {"main-job", "tests"}, "README must label its two quick-start commands"
    return found


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert readme_commands()["tests"].strip() in ci_lines


def test_main_job_runs_the_trainer_on_its_default():
    assert readme_commands()["main-job"].strip().endswith("trainer run")


def _click_parses(group, argv: list[str]) -> None:
    """Raise if ``argv`` is not a valid invocation of ``group`` (no command is run)."""
    import click

    ctx = click.Context(group, info_name=argv[0])
    command = group.get_command(ctx, argv[1])
    assert command is not None, f"{argv[0]} has no command {argv[1]!r}"
    command.make_context(argv[1], list(argv[2:]), parent=ctx)


def with_compose_defaults(arg: str) -> str:
    """``arg`` with each ``${VARIABLE:-default}`` replaced by its default, as Compose does when
    the variable is unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", arg)


@pytest.mark.parametrize("compose_file", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_services_invoke_real_commands(compose_file):
    from nbr_index.cli import main as nbr_index_main
    from trainer.cli import main as trainer_main

    clis = {"nbr-index": nbr_index_main, "trainer": trainer_main}
    services = yaml.safe_load((ROOT / compose_file).read_text())["services"]
    assert set(services) == {"nbr-index", "trainer"}
    for service in services.values():
        argv = service["command"]
        argv = shlex.split(argv) if isinstance(argv, str) else argv
        _click_parses(clis[argv[0]], [with_compose_defaults(arg) for arg in argv])


def test_compose_services_share_one_store_volume():
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    mounts = [set(s["volumes"]) for s in services.values()]
    assert "store:/store" in mounts[0] & mounts[1]


def test_faiss_comes_only_from_its_own_extras_so_gpu_never_pulls_faiss_cpu():
    """faiss-cpu and faiss-gpu provide the same module: the base install needs neither (the torch
    backend is the default), `.[cpu]` and `.[gpu]` each bring one, the tests' `.[dev]` faiss-cpu."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {Requirement(r).name for r in requirements}

    extras = project["optional-dependencies"]
    assert not {n for n in names(project["dependencies"]) if n.startswith("faiss")}
    assert names(extras["cpu"]) == {"faiss-cpu"} and names(extras["gpu"]) == {"faiss-gpu-cu12"}
    assert names(extras["tensorboard"]) == {"tensorboard"}
    assert {"faiss-cpu", "tensorboard", "pytest", "ruff"} <= names(extras["dev"])


def test_the_built_wheel_carries_every_file_the_packages_read(tmp_path):
    """A non-editable install (the Docker image's) has only what the wheel carries: the native
    tile kernel's C++ source must be in it, or every rebuild there fails to find it."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("storage", "nbr_index", "trainer"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("and_nbr-*.whl")
    carried = set(zipfile.ZipFile(wheel).namelist())
    assert "nbr_index/tile_kernel.cpp" in carried
    read_at_run_time = {str(path.relative_to(source)) for path in source.rglob("*")
                        if path.is_file() and path.suffix not in (".py", ".pyc")
                        and path.parts[len(source.parts)] in ("storage", "nbr_index", "trainer")}
    assert read_at_run_time <= carried, f"not in the wheel: {sorted(read_at_run_time - carried)}"


def test_the_tree_passes_the_linter():
    """`ruff check .` (configured in pyproject.toml, installed by `.[dev]`) finds nothing."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it comes with `pip install -e '.[dev]'`)")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
