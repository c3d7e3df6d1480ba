"""Starting the engine a `ServerConfig` asks for, off the event loop (loading takes seconds to
minutes; the loop keeps answering `/health` with 503 meanwhile)."""

from __future__ import annotations

import asyncio

from ensemble.protocol import Engine
from server.config import ServerConfig


def _start(config: ServerConfig) -> Engine:
    if config.engine == "torch":
        import torch

        from ensemble.reference import ReferenceEngine

        dtype = torch.float32 if config.dtype == "auto" else getattr(torch, config.dtype)
        return ReferenceEngine(config.ensemble, dtype=dtype)
    from ensemble.vllm_engine import VLLMEngine

    args = vllm_engine_args(config)
    return VLLMEngine.from_folder(
        config.ensemble,
        tensor_parallel_size=config.tensor_parallel_size,
        max_model_len=config.max_model_len,
        dtype=config.dtype,
        enforce_eager=args.pop("enforce_eager", None),  # a VLLMEngineConfig field of its own
        engine_args=args,
        draft_member=config.draft_member,
        draft_tokens=config.draft_tokens,
        draft_max_batch=config.draft_max_batch,
        intel_openmp=config.intel_openmp,
    )


def vllm_engine_args(config: ServerConfig) -> dict:
    """`vllm.AsyncEngineArgs` fields the server sets beyond VLLMEngineConfig's own: vLLM's flags
    from the command line (`config.engine_args`) and the server flags that map onto them."""
    args: dict = dict(config.engine_args)
    if config.distributed_executor_backend is not None:
        args["distributed_executor_backend"] = config.distributed_executor_backend
    if config.kv_cache_gib is not None:
        args["kv_cache_memory_bytes"] = int(config.kv_cache_gib * (1 << 30))
    return args


async def load_engine(config: ServerConfig) -> Engine:
    """The engine for `config`, built in a worker thread."""
    return await asyncio.to_thread(_start, config)


def engine_max_running(engine: Engine, default: int = 256) -> int:
    """How many requests the engine runs at once, if it says; else `default`."""
    for value in (getattr(engine, "max_num_seqs", None), engine.info.get("max_num_seqs")):
        if isinstance(value, int) and value > 0:
            return value
    return default


async def engine_healthy(engine: Engine) -> str | None:
    """None when the engine can serve, else why not (engines may offer `check_health()`, sync or
    async, raising when they are dead, like vLLM's `AsyncLLM.check_health`)."""
    check = getattr(engine, "check_health", None)
    if check is None:
        return None
    try:
        result = check()
        if asyncio.iscoroutine(result):
            await result
    except Exception as err:  # noqa: BLE001 - any failure means "not healthy"
        return f"{type(err).__name__}: {err}"
    return None
