#!/bin/sh
# Builds the C++ sample (llmfold_generate, ops linked statically) for x86-64 or aarch64.
#   samples/cpp/build.sh x86     [BUILDDIR]   default build/sample          (links the onnxruntime wheel)
#   samples/cpp/build.sh aarch64 [BUILDDIR]   default build/sample-aarch64  (cross build; links the aarch64
#                                             wheel's libonnxruntime.so from fetch_ort_aarch64.sh)
# Fetches what is missing first (ORT headers: custom_ops/fetch_ort_headers.sh; aarch64 runtime:
# custom_ops/tests/arm/fetch_ort_aarch64.sh into build/custom_ops-aarch64). Prints the binary's path.
# Exit 3 (message on stderr) when cmake or the cross compiler is missing.
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
ARCH="${1:?usage: $0 x86|aarch64 [BUILDDIR]}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
command -v cmake >/dev/null 2>&1 || { echo "missing cmake (apt-get install cmake)" >&2; exit 3; }
GEN=""
command -v ninja >/dev/null 2>&1 && GEN="-G Ninja"
sh "$REPO/custom_ops/fetch_ort_headers.sh" "$REPO/build" >/dev/null
case "$ARCH" in
  x86|x86_64|amd64)
    B="${2:-$REPO/build/sample}"
    EXTRA="" ;;
  aarch64|arm64)
    B="${2:-$REPO/build/sample-aarch64}"
    CXX="${LLMFOLD_CROSS_PREFIX:-aarch64-linux-gnu-}g++"
    command -v "$CXX" >/dev/null 2>&1 || { echo "missing $CXX (apt-get install g++-aarch64-linux-gnu)" >&2; exit 3; }
    PYTHON="$PY" sh "$REPO/custom_ops/tests/arm/fetch_ort_aarch64.sh" "$REPO/build/custom_ops-aarch64" >/dev/null
    EXTRA="-DCMAKE_TOOLCHAIN_FILE=$REPO/custom_ops/cmake/aarch64.cmake -DORT_LIB_DIR=$REPO/build/custom_ops-aarch64/ort-aarch64/lib" ;;
  *) echo "unknown architecture $ARCH: use x86 or aarch64" >&2; exit 2 ;;
esac
[ -f "$B/CMakeCache.txt" ] && GEN=""   # keep the generator of an existing build dir
# shellcheck disable=SC2086
cmake -S "$HERE" -B "$B" $GEN -DCMAKE_BUILD_TYPE=Release $EXTRA >/dev/null
cmake --build "$B" -j2 --target llmfold_generate >/dev/null
echo "$B/llmfold_generate"
