#!/usr/bin/env bash
# Wheels the lent GPU machine's image lacks (it has torch, transformers 5.17, pyarrow, but no pydantic, datasets,
# trl, gguf, orjson or bitsandbytes, and cannot fetch anything), for its Python 3.12; peft comes too, because
# transformers 5 needs peft >= 0.18 and the image's version is not known. About 50 MB. Carry the folder to the
# device with the `run` tool's carry=["wheelhouse"], then there:
#   python3 -m pip install --no-index --find-links wheelhouse pydantic datasets trl gguf orjson bitsandbytes \
#     "peft>=0.18" \
#     && python3 -m pip install --no-deps -e . \
#     && python3 -m pytest -m gpu tests/test_trainer_gpu.py && python3 benchmarks/train.py
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_28_x86_64 \
  --no-deps -d wheelhouse \
  pydantic pydantic-core typing-inspection annotated-types datasets dill multiprocess trl orjson gguf \
  bitsandbytes "peft>=0.18"
du -sh wheelhouse
