#!/usr/bin/env bash
# Build (once) llama.cpp's own `llama-server` from the llama.cpp source that the llama-cpp-python
# sdist vendors, and print its path: the baseline of bench/parallel.py.  Bench-only: `make up`
# and `make test` never build it.  Cached like the wheel (scripts/llama-wheel.sh), keyed by the
# same version; CPU build, no RPC, no curl.
set -euo pipefail

version="${MYCO_LLAMA_VERSION:-0.3.36}"
python="${1:-python3}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/mycoswarm/llama-server-$version"
if [ ! -x "$cache/llama-server" ]; then
  tmp="$cache.tmp.$$"
  mkdir -p "$tmp"
  echo ">> llama-server $version: fetching the llama-cpp-python sdist" >&2
  "$python" -m pip download --no-deps --no-binary :all: -d "$tmp" \
    "llama-cpp-python==$version" >&2
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  src=$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
  echo ">> building llama-server (several minutes on 2 cores)" >&2
  cmake -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >&2
  cmake --build "$tmp/build" --target llama-server -j "$(nproc)" >&2
  mkdir -p "$cache"
  mv "$tmp/build/bin/llama-server" "$cache/"
  rm -rf "$tmp"
fi
echo "$cache/llama-server"
