#!/usr/bin/env bash
# Regenerate the Python wire code from every proto/*.proto: messages and gRPC stubs.
# Usage: proto/generate.sh [OUT_DIR]   (default: swarmtune/wire; tests pass a temp dir)
# Uses $PYTHON (default: python) with grpcio-tools installed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/../swarmtune/wire}"
python="${PYTHON:-python}"

mkdir -p "$out"
rm -f "$out"/*_pb2.py "$out"/*_pb2_grpc.py
(cd "$here" && "$python" -m grpc_tools.protoc -I. --python_out="$out" --grpc_python_out="$out" *.proto)

# protoc writes top-level imports ("import ledger_pb2 as ledger__pb2"), which only work with the
# output directory on sys.path; make them package-relative so swarmtune.wire imports anywhere.
sed -i.bak -E 's/^import ([A-Za-z0-9_]+_pb2) as /from . import \1 as /' "$out"/*_pb2.py "$out"/*_pb2_grpc.py
rm -f "$out"/*.bak

echo '"""Generated protobuf and gRPC code (do not edit: run proto/generate.sh)."""' > "$out/__init__.py"
