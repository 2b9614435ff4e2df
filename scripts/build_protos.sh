#!/usr/bin/env bash
# Builds the Python code for every .proto under protos/ into the git-ignored
# package pb/. The generated modules import each other as `orfeas.x.v1`;
# we rewrite that to `pb.orfeas.x.v1` so the code lives in one package
# (the layout text-generation-inference uses) without touching sys.path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
rm -rf pb
mkdir -p pb
mapfile -t protos < <(find protos -name '*.proto' | sort)
"$PYTHON" -m grpc_tools.protoc -Iprotos \
  --python_out=pb --grpc_python_out=pb --pyi_out=pb "${protos[@]}"
find pb -type d -exec touch {}/__init__.py \;
find pb -name '*.py' -o -name '*.pyi' | xargs sed -i -E 's/^from orfeas\./from pb.orfeas./'
echo "protos built into pb/: ${protos[*]}"
