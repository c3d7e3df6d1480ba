"""What is served for a downstream scorer NAME=PATH: an ensemble folder as it is, a model folder
(or `zoo:MODEL`) as a one-member ensemble built once under the run's work folder."""

from __future__ import annotations

import json
from pathlib import Path

from bench.errors import DownstreamError


def scorer_ensemble(name: str, spec: str, work_dir: Path) -> Path:
    """The ensemble folder to serve for scorer `name`: `spec` itself if it is an ensemble folder,
    else a one-member ensemble of the model folder (or `zoo:MODEL`) `spec`, built once in `work_dir`."""
    from ensemble.builder import build_ensemble
    from ensemble.manifest import MANIFEST_FILE, ManifestError, MemberSpec
    from transfer.config import resolve_model
    from transfer.errors import ConfigError

    path = Path(spec).expanduser()
    if (path / MANIFEST_FILE).is_file():
        return path
    try:
        model = resolve_model(spec)
    except (ConfigError, ValueError) as err:
        raise DownstreamError(
            f"scorer {name}: {spec} is neither an ensemble folder nor a model folder ({err})") from None
    out = work_dir / f"{name}-alone"
    if (out / MANIFEST_FILE).is_file():
        members = json.loads((out / MANIFEST_FILE).read_text()).get("members", [])
        if [(out / m.get("path", "")).resolve() for m in members] == [model.resolve()]:
            return out
    member = "".join(c for c in name if c.isascii() and (c.isalpha() or c == "_")) or "model"  # no digits
    try:
        return build_ensemble(out, [MemberSpec(member, str(model), 1.0)], name=name, overwrite=True)
    except ManifestError as err:
        raise DownstreamError(f"scorer {name}: ensemble build failed: {err}") from None

