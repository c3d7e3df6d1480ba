"""Schema fuzzing: schemathesis draws requests, valid and invalid, from the server's own
/openapi.json and sends them to a real uvicorn server on the reference engine. No response may be
a 500, and every response must be one the document describes (status code, content type, body
schema). Bad input is rejected with a 4xx.

Runtime is bounded: few examples per operation, a 32-token context (any larger `max_tokens` is a
quick 400) and a 5 s request timeout (a huge `n` times many prompts ends as a 504, not a hang).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from server_harness import API_KEY, ServerThread, start_server

MAX_EXAMPLES = 25  # per operation and mode
BODY_OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
                   ("POST", "/detokenize")]
OPERATIONS = [*BODY_OPERATIONS, ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics")]


@pytest.fixture(scope="module")
def fuzz_server(server_ensemble: Path) -> Iterator[ServerThread]:
    yield from start_server(server_ensemble, engine="torch", api_key=API_KEY, max_model_len=32, max_queue=4,
                            request_timeout=5.0, max_refusals=0)  # every fuzzed body must reach the validators


@pytest.fixture(scope="module")
def api_schema(fuzz_server: ServerThread):
    """The schema as the running server publishes it. A 504 is the documented answer to a request
    that outlives --request-timeout (a big `n` on a busy machine), not a server error."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    schema.config.checks.not_a_server_error.expected_statuses = ["2xx", "3xx", "4xx", "504"]
    return schema


def test_every_operation_is_fuzzed(api_schema) -> None:
    published = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert published == set(OPERATIONS)


# Valid requests for every operation; invalid ones where there is a body to break.
RUNS = [(m, p, "positive") for m, p in OPERATIONS] + [(m, p, "negative") for m, p in BODY_OPERATIONS]


@pytest.mark.parametrize("method, path, mode", RUNS)
def test_fuzzed_requests_get_no_500_and_match_the_schema(api_schema, method: str, path: str, mode: str) -> None:
    strategy = api_schema[path][method].as_strategy(GenerationMode(mode))

    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        # Schema-valid requests may still be refused (a token id outside this vocabulary, weights
        # for another number of members, a prompt over the context): 400s by design, so
        # positive_data_acceptance does not apply. Every other check does, not_a_server_error first.
        case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30,
                               excluded_checks=[positive_data_acceptance])

    check()
