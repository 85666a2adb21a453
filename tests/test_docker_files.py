"""The Docker files without an engine: the dependency list the image installs, the trainer's
healthcheck, compose files that Compose itself accepts, and the README's table of settings."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path):
    """Import a script that is not part of a package (docker/healthcheck.py is copied into the image)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = load_script(ROOT / "docker/healthcheck.py")

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
[project]
name = "x"
dependencies = ["torch>=2.14.1", "Faiss_CPU>=1.15", "torchvision>=0.29.1 ; sys_platform == 'linux'"]
[project.optional-dependencies]
gpu = ["faiss-gpu-cu12>=1.8"]
"""


def requirements(tmp_path, *args) -> subprocess.CompletedProcess:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    return subprocess.run([sys.executable, str(ROOT / "docker/requirements.py"), str(tmp_path / "pyproject.toml"), *args],
                          capture_output=True, text=True)


def test_requirements_lists_build_system_dependencies_and_the_extra(tmp_path):
    result = requirements(tmp_path, "--extra", "gpu")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines() == ["setuptools>=68", "torch>=2.14.1", "Faiss_CPU>=1.15",
                                          "torchvision>=0.29.1 ; sys_platform == 'linux'", "faiss-gpu-cu12>=1.8"]


def test_requirements_only_picks_projects_by_normalised_name(tmp_path):
    result = requirements(tmp_path, "--only", "torch", "torchvision", "faiss-cpu")
    assert result.stdout.splitlines() == ["torch>=2.14.1", "Faiss_CPU>=1.15", "torchvision>=0.29.1 ; sys_platform == 'linux'"]


def test_requirements_warns_about_an_unknown_extra_and_refuses_an_unknown_project(tmp_path):
    unknown_extra = requirements(tmp_path, "--extra", "cpu")
    assert unknown_extra.returncode == 0
    assert unknown_extra.stderr.strip() == "warning: pyproject.toml declares no extra 'cpu' (it has: gpu)"
    assert "faiss-gpu-cu12>=1.8" not in unknown_extra.stdout
    unknown_project = requirements(tmp_path, "--only", "torch", "jax")
    assert unknown_project.returncode == 1
    assert unknown_project.stderr.strip() == "error: pyproject.toml has no requirement on jax"


def test_process_start_is_when_the_process_started():
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = healthcheck.process_start(child.pid)
    finally:
        child.kill()
        child.wait()
    # Boot time has whole seconds, clock ticks are 10 ms: at most about a second early.
    assert before - 1.1 <= started <= time.time()


def test_healthcheck_counts_only_a_file_written_after_the_main_process_started(tmp_path):
    config = tmp_path / "config.yaml"
    assert not healthcheck.written_since_start(str(config))
    config.write_text("written by this run")
    assert healthcheck.written_since_start(str(config))
    earlier = healthcheck.process_start() - 5  # left by a run before this container started
    os.utime(config, (earlier, earlier))
    assert not healthcheck.written_since_start(str(config))


def compose_command() -> list[str] | None:
    """Compose v2 where present, else docker-compose 1.29, as docker/e2e.sh chooses; None if neither."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def compose_config(*files: str, env: dict | None = None) -> dict:
    import yaml

    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed (docker/e2e.sh installs them)")
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("AND_")}
    result = subprocess.run([*command, *(a for f in files for a in ("-f", f)), "config"], cwd=ROOT,
                            capture_output=True, text=True, env={**clean_env, **(env or {})})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_accepts_both_files_and_interpolates_the_settings():
    default = compose_config("compose.yaml")["services"]
    assert default["trainer"]["command"][:2] == ["trainer", "run"]
    assert default["nbr-index"]["depends_on"] == {"trainer": {"condition": "service_healthy"}}
    gpu = compose_config("compose.yaml", "compose.gpu.yaml",
                         env={"AND_DATASET": "imagefolder", "AND_DATA_DIR": "/srv/images", "AND_WORLD_SIZE": "4"})
    trainer = gpu["services"]["trainer"]
    argv = trainer["command"]
    assert argv[argv.index("--dataset") + 1] == "imagefolder" and argv[argv.index("--world-size") + 1] == "4"
    assert argv[argv.index("--device") + 1] == "cuda" and argv[argv.index("--store") + 1] == "/store/imagefolder"
    assert any(str(v).startswith("/srv/images:/data") or (isinstance(v, dict) and v.get("source") == "/srv/images")
               for v in trainer["volumes"])
    assert trainer["healthcheck"]["test"][-1] == "/runs/imagefolder/config.yaml"
    assert gpu["services"]["nbr-index"]["build"]["args"]["EXTRA"] == "gpu"


def compose_defaults(path: str) -> dict[str, str]:
    """{VARIABLE: default} of every ``${VARIABLE:-default}`` in a compose file."""
    return dict(re.findall(r"\$\{(AND_\w+):-([^}]*)\}", (ROOT / path).read_text()))


def test_readme_documents_every_compose_setting_with_its_default():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(AND_\w+)` \|(.*)$", readme, re.M))
    for path in ("compose.yaml", "compose.gpu.yaml"):
        for variable, default in compose_defaults(path).items():
            assert variable in rows, f"README's Docker table lacks {variable} ({path})"
            assert f"`{default}`" in rows[variable], f"README gives {variable} another default than {path}: {default}"
