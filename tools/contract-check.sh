#!/usr/bin/env bash
# The API against its own OpenAPI document, by schemathesis (PyPI): starts a
# demo server on loopback over a temporary data directory, generates
# requests from /openapi.json, and checks that no answer is a 5xx and that
# every answer's status, media type and body are as documented. Bounded:
# MAX_EXAMPLES per operation (default 40) and MAX_SECONDS in all (default
# 300); the server stops with the script. Not part of CI (it needs Python).
#
#   pip install schemathesis && tools/contract-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
max_examples="${MAX_EXAMPLES:-40}"
max_seconds="${MAX_SECONDS:-300}"
port="${PORT:-18181}"
command -v st >/dev/null || { echo "contract-check: needs schemathesis (pip install schemathesis)" >&2; exit 2; }
cargo build --release --bin commission-ledger
data="$(mktemp -d)"
log="$data/serve.log"
./target/release/commission-ledger --data "$data/ledger" serve --demo \
    --listen "127.0.0.1:$port" --public-per-minute 1000000 --public-burst 1000000 >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 50); do
    grep -q "^listening" "$log" && break
    sleep 0.2
done
key="$(grep -m1 '^cl_' "$log")"
# The demo program and one of its affiliates, so that reads reach the ledger.
cat >"$data/schemathesis.toml" <<'EOF'
[parameters]
"path.program" = "demo-hosting"
"path.affiliate" = "alice"
EOF
# The live tail never ends by itself: left out. Run in the temporary
# directory, where schemathesis leaves its cache.
cd "$data"
timeout "$max_seconds" st --config-file "$data/schemathesis.toml" run \
    "http://127.0.0.1:$port/openapi.json" \
    -H "Authorization: Bearer $key" \
    --exclude-path /v1/events/stream \
    --checks not_a_server_error,response_schema_conformance,content_type_conformance,status_code_conformance \
    --max-examples "$max_examples" --workers 2 --phases coverage,fuzzing,stateful
