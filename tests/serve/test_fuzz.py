"""Issue 16: schemathesis fuzzes the running API from its own OpenAPI document. No answer may be a 500, and every
answer (the errors too) must match what the document says: its status is listed for the route, its body matches
the listed schema, its content type and headers are the listed ones; data the schema forbids is refused with a
4xx, and a method a route does not have answers 405 with an Allow header."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (allow_header_conformance, content_type_conformance,
                                               negative_data_rejection, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance,
                                               unsupported_method)

# Not "positive data acceptance": a file the schema allows (any bytes) is rarely a radiograph, and refusing it with
# a documented 4xx is the service doing its job. Not the stateful checks: the API keeps no resources.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection, unsupported_method, allow_header_conformance]
EXAMPLES = 40  # per route and generation mode


def fuzz(url: str) -> list[str]:
    """Every route of ``url``'s OpenAPI document, fuzzed; the routes fuzzed."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    fuzzed = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def call(case):
            case.call_and_validate(checks=CHECKS)

        call()
        fuzzed.append(f"{operation.method.upper()} {operation.path}")
    return fuzzed


def test_no_fuzzed_request_gets_a_500_or_an_answer_the_document_does_not_describe(direct_url):
    assert set(fuzz(direct_url)) == {"POST /v1/predict", "POST /v1/explain", "GET /v1/model", "GET /healthz"}
