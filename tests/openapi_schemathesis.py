"""schemathesis against tailor's own OpenAPI document: a bounded number of
generated requests per operation (examples, coverage, fuzzing and stateful
phases), with the admin key, failing on any 5xx and on any response that
breaks the documented schema.

usage: openapi_schemathesis.py BASE_URL ADMIN_KEY
"""

import sys

from schemathesis.cli import schemathesis

base_url, key = sys.argv[1:3]
sys.argv = [
    "st",
    "run",
    f"{base_url}/openapi.json",
    "--header", f"Authorization: Bearer {key}",
    "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
    "--max-examples", "20",
    "--seed", "7",
    "--max-time", "150",
    "--request-timeout", "60",
    "--workers", "1",
]
schemathesis()
