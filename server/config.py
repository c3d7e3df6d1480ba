"""The server's settings: one frozen dataclass, validated where it is built, with one-line errors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.clients import ClientKey

ENGINES = ("vllm", "torch")
DTYPES = ("auto", "float32", "bfloat16", "float16")
EXECUTOR_BACKENDS = ("mp", "ray")


class ConfigError(ValueError):
    """A server setting that cannot work; the message names it."""


@dataclass(frozen=True)
class ServerConfig:
    """How to serve one ensemble folder.

    Attributes:
        ensemble: the ensemble folder (``ensemble build`` output).
        host, port: where uvicorn listens (port 0: any free port).
        engine: ``vllm`` (continuous batching, paged KV cache) or ``torch`` (the reference engine).
        tensor_parallel_size: vLLM tensor parallelism (vllm engine only).
        max_model_len: prompt + completion limit; None = the engine's (shortest member context).
        dtype: weights/activations: ``auto`` (vLLM: float32 on a CPU, bfloat16 on a GPU with native
            bf16, see `ensemble.vllm_engine.engine_dtype`; float32 for the torch engine),
            ``float32``, ``bfloat16`` or ``float16``.
        api_key: when set, `/v1/*`, `/tokenize` and `/detokenize` need `Authorization: Bearer <key>`.
        client_keys: more keys, one per client, each with its own `max_running` budget
            (`server.clients`); any of them, or `api_key`, opens the API.
        max_running: sequences (prompts × n of each request) let into the engine at once; None = the
            engine's `max_num_seqs` when it exposes one, else 256.
        max_running_per_client: sequences each client may have running at once, unless its client
            key sets its own `max_running`; a client is a client key's name, else the request's
            address (`server.client_budgets`); None = only the server's limit.
        max_queue: requests that may wait for a running slot; more get 429.
        request_timeout: seconds from arrival to the last token (queue wait included); None = none.
        served_model_name: the `model` name clients use; None = the ensemble's name.
        trust_request_chat_template: accept a `chat_template` in chat requests (off by default,
            like vLLM: templates are code).
        shutdown_timeout: seconds in-flight requests get to finish on shutdown before being aborted.
        distributed_executor_backend: vLLM's worker backend across GPUs/hosts: ``mp`` (one host)
            or ``ray`` (a Ray cluster, for multi-node); None = vLLM's choice (vllm engine only).
        kv_cache_gib: GiB of KV cache vLLM reserves (its ``kv_cache_memory_bytes``); None = vLLM's
            default (a share of GPU memory; on a CPU, of *all* RAM, which fails on a busy host).
        max_body_mb: request bodies over this many MiB get a 413 before they are parsed.
        forwarded_allow_ips: proxies (comma-separated addresses or networks, uvicorn's
            ``forwarded_allow_ips``) whose ``X-Forwarded-For`` names the client's address; None =
            no proxy is trusted and a client's address is the connection's.
        max_refusals: refused requests (4xx but 429) a client may get per minute, in a burst or
            spread; past them its requests get a 429 before their body is read (`server.refusals`;
            a client is its client key's name, else its address); 0 = no limit.
        stream_stall_timeout: seconds a stream's client may go without taking an event before the
            stream is cut off and its sequences aborted; None = never.
        tokenizer_workers: threads that tokenize prompts (each with its own tokenizer copy); at
            most `max_queue` + `max_running` tokenizer jobs wait, more get a 429.
        engine_args: further ``vllm.AsyncEngineArgs`` fields (vllm engine only), as parsed from
            vLLM's own flags by `server.vllm_args` (e.g. ``{"max_num_seqs": 8}``).
        draft_member: speculative decoding (vllm engine only): this member drafts `draft_tokens`
            tokens per step and the whole ensemble verifies them, so the output distribution is
            the ensemble's (`ensemble.speculative`); None = off.
        draft_tokens: tokens the draft member proposes per step.
        draft_max_batch: the draft member drafts only in engine steps of at most this many
            requests (`ensemble.speculative.batch_schedule`); None = in every step.
        intel_openmp: on a CPU, preload Intel OpenMP into vLLM's engine process, as vLLM's CPU guide
            asks (`ensemble.vllm_engine_args.intel_openmp_preload`; an OpenMP runtime already in
            ``LD_PRELOAD`` is kept); False = PyTorch's own (vllm engine only).
        enable_auto_tool_choice: serve chat `tool_choice` "auto" (needs `tool_call_parser`).
        tool_call_parser: the vLLM tool-call parser that finds calls in free answers
            (`server.tool_parsing`; e.g. ``hermes``).
    """

    ensemble: str
    host: str = "127.0.0.1"
    port: int = 8000
    engine: str = "vllm"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str = "auto"
    api_key: str | None = None
    client_keys: tuple[ClientKey, ...] = ()
    max_running: int | None = None
    max_running_per_client: int | None = None
    max_queue: int = 64
    request_timeout: float | None = 600.0
    served_model_name: str | None = None
    trust_request_chat_template: bool = False
    shutdown_timeout: float = 5.0
    distributed_executor_backend: str | None = None
    kv_cache_gib: float | None = None
    max_body_mb: float = 16.0
    forwarded_allow_ips: str | None = None
    max_refusals: int = 60
    stream_stall_timeout: float | None = 30.0
    tokenizer_workers: int = 2
    engine_args: Mapping[str, Any] = field(default_factory=dict)
    draft_member: str | None = None
    draft_tokens: int = 3
    draft_max_batch: int | None = None
    intel_openmp: bool = True
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        folder = Path(self.ensemble).expanduser()
        if not str(self.ensemble):
            raise ConfigError("no ensemble folder given: pass --ensemble DIR or set CHORUS_ENSEMBLE")
        if not folder.is_dir():
            raise ConfigError(f"ensemble folder {folder} does not exist (build one with 'ensemble build')")
        object.__setattr__(self, "ensemble", str(folder.resolve()))
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _int_at_least("port", self.port, 0)
        if self.port > 65535:
            raise ConfigError(f"port must be at most 65535, got {self.port}")
        _int_at_least("tensor_parallel_size", self.tensor_parallel_size, 1)
        if self.engine == "torch" and self.tensor_parallel_size != 1:
            raise ConfigError("tensor_parallel_size > 1 needs the vllm engine")
        self._check_executor_backend()
        if self.kv_cache_gib is not None:
            _positive("kv_cache_gib", self.kv_cache_gib)
            if self.engine == "torch":
                raise ConfigError("kv_cache_gib needs the vllm engine (the torch engine keeps plain caches)")
        if self.max_model_len is not None:
            _int_at_least("max_model_len", self.max_model_len, 2)
        if self.max_running is not None:
            _int_at_least("max_running", self.max_running, 1)
        if self.max_running_per_client is not None:
            _int_at_least("max_running_per_client", self.max_running_per_client, 1)
        _int_at_least("max_queue", self.max_queue, 0)
        _int_at_least("tokenizer_workers", self.tokenizer_workers, 1)
        if self.request_timeout is not None:
            _positive("request_timeout", self.request_timeout, " of seconds")
        if self.api_key is not None:
            if not self.api_key.strip():
                raise ConfigError("api_key is empty or only whitespace: give a real key, or none to serve "
                                  "without authentication")
            object.__setattr__(self, "api_key", self.api_key.strip())
        object.__setattr__(self, "client_keys", tuple(self.client_keys))
        if not all(isinstance(c, ClientKey) for c in self.client_keys):
            raise ConfigError("client_keys must be ClientKey entries (server.clients.load_client_keys)")
        if self.api_key is not None and self.api_key in {c.key for c in self.client_keys}:
            raise ConfigError("the api_key is also a client's key: give each its own")
        if self.stream_stall_timeout is not None:
            _positive("stream_stall_timeout", self.stream_stall_timeout, " of seconds")
        _positive("max_body_mb", self.max_body_mb)
        _int_at_least("max_refusals", self.max_refusals, 0)
        object.__setattr__(self, "engine_args", dict(self.engine_args))
        if self.engine_args and self.engine != "vllm":
            raise ConfigError(f"vLLM engine arguments ({', '.join(self.engine_args)}) need the vllm engine")
        self._check_speculative()
        self._check_tool_parser()
        if not (math.isfinite(self.shutdown_timeout) and self.shutdown_timeout >= 0):
            raise ConfigError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout!r}")

    def _check_speculative(self) -> None:
        """The draft member or vLLM speculative config, checked before any engine starts."""
        from ensemble.manifest import EnsembleManifest, ManifestError
        from ensemble.speculative import SpeculativeError, check_speculative_config, draft_member_config

        _int_at_least("draft_tokens", self.draft_tokens, 1)
        if self.draft_max_batch is not None:
            _int_at_least("draft_max_batch", self.draft_max_batch, 1)
            if self.draft_member is None:
                raise ConfigError("--draft-max-batch needs --draft-member (with --speculative-config, put "
                                  "vLLM's num_speculative_tokens_per_batch_size in it)")
        try:
            if "speculative_config" in self.engine_args:
                if self.draft_member is not None:
                    raise ConfigError("give either --draft-member or --speculative-config, not both")
                check_speculative_config(self.engine_args["speculative_config"] or {})
            if self.draft_member is not None:
                if self.engine != "vllm":
                    raise ConfigError("--draft-member (speculative decoding) needs the vllm engine")
                draft_member_config(EnsembleManifest.load(self.ensemble), self.draft_member, self.draft_tokens,
                                    self.draft_max_batch)
        except (SpeculativeError, ManifestError) as err:
            raise ConfigError(str(err)) from None

    def _check_executor_backend(self) -> None:
        if self.distributed_executor_backend is None:
            return
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ConfigError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}, "
                              f"got {self.distributed_executor_backend!r}")
        if self.engine == "torch":
            raise ConfigError("distributed_executor_backend needs the vllm engine")
        try:
            from ensemble.vllm_engine_args import check_executor_backend

            check_executor_backend(self.distributed_executor_backend)
        except ImportError:
            raise ConfigError("distributed_executor_backend needs vLLM installed (pip install -e '.[cpu]' "
                              "or '.[gpu]')") from None
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _check_tool_parser(self) -> None:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser NAME (as vllm serve does)")
        if self.tool_call_parser:
            if not self.enable_auto_tool_choice:
                raise ConfigError("--tool-call-parser is used only with --enable-auto-tool-choice")
            from server.tool_parsing import check_tool_parser

            try:
                check_tool_parser(self.tool_call_parser)
            except ImportError:
                raise ConfigError("--tool-call-parser needs vLLM's tool parsers (pip install vllm)") from None
            except ValueError as err:
                raise ConfigError(str(err)) from None

    @property
    def max_body_bytes(self) -> int:
        """`max_body_mb` in bytes."""
        return int(self.max_body_mb * (1 << 20))

    @property
    def authenticated(self) -> bool:
        """Whether requests need a key (the server's own, or a client's)."""
        return bool(self.api_key or self.client_keys)

    @property
    def exposed(self) -> bool:
        """Whether the server listens beyond the loopback interface."""
        return self.host not in ("127.0.0.1", "localhost", "::1")


def _positive(name: str, value: object, unit: str = "") -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number{unit}, got {value!r}")


def _int_at_least(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
