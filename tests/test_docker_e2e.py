"""`docker compose up` end to end: docker/e2e.sh against a real Docker engine (skipped without one).

The script builds the image, runs the bundled default job, reruns it on the same volumes, kills
nbr-index mid-job and starts it again, and gives the trainer bad input; see its header. .ci/run
starts an engine first (`bash docker/e2e.sh --start-engine`), so CI runs it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def why_no_engine() -> str | None:
    """Why no Docker engine and Compose can be used here, or None when they can."""
    if shutil.which("docker") is None:
        return "no docker command (`bash docker/e2e.sh --start-engine` installs and starts one as root)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=120)
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
        return f"no Docker engine answers ({reason}); `bash docker/e2e.sh --start-engine` starts one as root"
    has_v2 = subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    if not has_v2 and shutil.which("docker-compose") is None:
        return "neither `docker compose` nor docker-compose is installed"
    return None


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_compose_up_runs_the_job_to_the_end_and_refuses_bad_input(tmp_path):
    reason = why_no_engine()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k not in ("E2E_CASES", "E2E_EPOCHS")}  # every case, as shipped
    result = subprocess.run(["bash", str(ROOT / "docker/e2e.sh")], cwd=ROOT, capture_output=True, text=True,
                            env={**env, "E2E_WORK": str(tmp_path)})
    assert result.returncode == 0, f"docker/e2e.sh failed (logs in {tmp_path}):\n{result.stderr[-8000:]}"
    assert "e2e: all cases passed: default rerun kill bad-dataset missing-data" in result.stderr
