#!/usr/bin/env bash
# Build (once) and print the path of a llama-cpp-python wheel compiled with RPC.
#
# pip's own wheel cache does not key on CMAKE_ARGS, so a wheel built without RPC would be
# silently reused.  We keep our own cache outside the clone, keyed by version and build flags:
#   ${MYCO_WHEEL_CACHE:-~/.cache/mycoswarm/wheels}/llama-cpp-python-<version>-<flags hash>/
#
# Build flags: MYCO_LLAMA_CMAKE_ARGS overrides them.  Default: -DGGML_RPC=on, plus -DGGML_CUDA=on
# when an NVIDIA toolkit (nvcc) *and* an NVIDIA GPU (nvidia-smi -L) are both present.
set -euo pipefail

version="${MYCO_LLAMA_VERSION:-0.3.36}"
python="${1:-python3}"

if [ -n "${MYCO_LLAMA_CMAKE_ARGS:-}" ]; then
  flags="$MYCO_LLAMA_CMAKE_ARGS"
else
  flags="-DGGML_RPC=on"
  if command -v nvcc >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    flags="$flags -DGGML_CUDA=on"
  fi
fi

pytag=$("$python" -c 'import sys, platform; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")')
key=$(printf '%s|%s|%s' "$version" "$flags" "$pytag" | sha256sum | cut -c1-12)
cache="${MYCO_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mycoswarm/wheels}/llama-cpp-python-$version-$key"

wheel=$(ls "$cache"/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo ">> building llama-cpp-python $version with CMAKE_ARGS='$flags' (about 8 minutes on 2 cores, once)" >&2
  echo ">> wheel cache: $cache" >&2
  tmp="$cache.tmp.$$"
  mkdir -p "$tmp"
  # -v streams the cmake/compiler output so a long build is never silent.
  CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$python" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python -v \
    -w "$tmp" "llama-cpp-python==$version" >&2
  mkdir -p "$cache"
  mv "$tmp"/llama_cpp_python-*.whl "$cache"/
  rm -rf "$tmp"
  wheel=$(ls "$cache"/llama_cpp_python-*.whl | head -n 1)
fi
echo "$wheel"
