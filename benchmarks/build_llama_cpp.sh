#!/usr/bin/env bash
# Build llama.cpp from the source vendored in the llama-cpp-python sdist (PyPI), for the slow
# interoperability tests: MAMBA_LLAMA_CPP=<printed path> python -m pytest -m slow tests/test_llama_cpp.py
set -euo pipefail
dest=${1:-/tmp/llama-cpp-build}
mkdir -p "$dest" && cd "$dest"
pip download --no-deps --no-binary :all: llama-cpp-python -d . >/dev/null
tar xzf llama_cpp_python-*.tar.gz
src=$(ls -d "$dest"/llama_cpp_python-*/vendor/llama.cpp)
cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
cmake --build "$src/build" -j"$(nproc)" --target llama-perplexity >/dev/null
echo "$src"
