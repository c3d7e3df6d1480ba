"""Loading tokenkit's modules without its dependency tree, for `scripts/tokenkit_parity.py`.

Where one of tokenkit's heavy imports (flax, optax, ...) is missing, an empty stand-in module is
registered under its name before tokenkit is imported (printed on stderr), and the two helpers
needed from `tokenkit/utils.py` (`get_large_negative_number`, `get_space_mask`) are taken from
that file's source by name: nothing of tokenkit is copied.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__tokenkit_parity_stub__ = True
    sys.modules[name] = module
    return module


def _unavailable(name: str):
    def fail(*_args, **_kwargs):
        raise RuntimeError(f"{name} is a stand-in registered by scripts/tokenkit_parity.py and was not expected to be called")
    return fail


def _functions_from_source(path: Path, names: list[str], env: dict) -> dict:
    """The named top-level functions of a Python file, defined in `env` (no module import)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    found = {n.name for n in wanted}
    if found != set(names):
        raise SystemExit(f"{path} lacks {sorted(set(names) - found)}: not the tokenkit this script was written against")
    code = compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec")
    exec(code, env)  # noqa: S102 - tokenkit's own function definitions, nothing else
    return {n: env[n] for n in names}


def load_tokenkit(root: Path) -> types.SimpleNamespace:
    """tokenkit's losses, align, multitask and model_kinds modules, and two helpers of its utils."""
    import jax
    import jax.numpy as jnp

    package = root / "tokenkit"
    if not (package / "training" / "losses.py").is_file():
        raise SystemExit(f"{root} is not a tokenkit checkout (no tokenkit/training/losses.py)")
    stubbed = []
    for top, names in (("optax", ["optax"]), ("flax", ["flax", "flax.training", "flax.training.common_utils"])):
        if importlib.util.find_spec(top) is None:  # used only by losses other than ALM
            for name in names:
                _stub(name, onehot=_unavailable(f"{name}.onehot"))
            stubbed += names
    pkg = _stub("tokenkit")
    pkg.__path__ = [str(package)]
    helpers = _functions_from_source(package / "utils.py", ["get_large_negative_number", "get_space_mask"],
                                     {"jax": jax, "jnp": jnp, "np": np})
    _stub("tokenkit.utils", **helpers)
    _stub("tokenkit.baseline_utils")
    models = _stub("tokenkit.models")
    models.__path__ = [str(package / "models")]
    _stub("tokenkit.models.param")
    _stub("tokenkit.byteify", ByteifyTokenizer=object, load_byteify_tokenizer=_unavailable("load_byteify_tokenizer"))
    stubbed += ["tokenkit.utils (2 functions from utils.py)", "tokenkit.baseline_utils", "tokenkit.models.param",
                "tokenkit.byteify"]
    print("tokenkit_parity: stand-ins for " + ", ".join(stubbed), file=sys.stderr)
    return types.SimpleNamespace(
        losses=importlib.import_module("tokenkit.training.losses"),
        align=importlib.import_module("tokenkit.align"),
        multitask=importlib.import_module("tokenkit.training.multitask"),
        constants=importlib.import_module("tokenkit.constants"),
        get_space_mask=helpers["get_space_mask"],
    )
