#!/usr/bin/env bash
# Wheels the lent GPU machine's image lacks (it has torch, transformers, peft, pyarrow, but no pydantic, datasets,
# trl, gguf or orjson, and cannot fetch anything), for its Python 3.12. Carry the folder to the device with the
# `run` tool's carry=["wheelhouse"], then there:
#   python3 -m pip install --no-index --find-links wheelhouse pydantic datasets trl gguf orjson \
#     && python3 -m pip install --no-deps -e . \
#     && python3 -m pytest -m gpu tests/test_trainer_gpu.py && python3 benchmarks/train.py
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --no-deps -d wheelhouse \
  pydantic pydantic-core typing-inspection annotated-types datasets dill multiprocess trl orjson gguf
du -sh wheelhouse
