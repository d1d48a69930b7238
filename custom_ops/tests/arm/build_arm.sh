#!/bin/sh
# Cross-builds the aarch64 kernel tests (static, for qemu-aarch64-static):
#   <builddir>/llmfold_kernel_test   the common kernel test (custom_ops/tests/kernel_test.cpp)
#   <builddir>/arm_kernel_check      ARM sweep: every path + both A4 multipliers vs ref, guard pages,
#                                    dispatch queries (--active, --paths, --unsafe-run NAME)
#   <builddir>/arm_insn_count        driver for count_insns.py (instructions per MAC)
# With --ort-lib it also cross-builds libllmfold_ops.so (needs ORT headers, see fetch_ort_headers.sh),
# and with --ort-runtime (a dir holding the aarch64 libonnxruntime.so, see fetch_ort_aarch64.sh)
#   <builddir>/ort_driver            runs a model with the custom op library (see ort_driver.cpp)
# With --asan: only llmfold_kernel_test, ASan+UBSan, dynamically linked (run it with
#   qemu-aarch64-static -L /usr/aarch64-linux-gnu and ASAN_OPTIONS=detect_leaks=0: LeakSanitizer
#   cannot run under qemu-user).
# Usage: build_arm.sh <builddir> [--asan | --ort-lib ORT_INCLUDE_DIR [--ort-runtime ORT_LIB_DIR]]
# Exit 3 (message on stderr) when the cross compiler or cmake is missing.
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
OPS="$(cd "$HERE/../.." && pwd)"
B="${1:?usage: $0 <builddir> [--asan | --ort-lib ORT_INCLUDE_DIR [--ort-runtime ORT_LIB_DIR]]}"
shift
ASAN=OFF
ORT_LIB=OFF
ORT_INC=""
ORT_RT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --ort-lib) ORT_LIB=ON; ORT_INC="${2:?--ort-lib needs the ORT include dir}"; shift 2 ;;
    --ort-runtime) ORT_RT="${2:?--ort-runtime needs a directory}"; shift 2 ;;
    --asan) ASAN=ON; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
CXX="${LLMFOLD_CROSS_PREFIX:-aarch64-linux-gnu-}g++"
for tool in "$CXX" cmake; do
  command -v "$tool" >/dev/null 2>&1 || { echo "missing $tool (apt-get install g++-aarch64-linux-gnu cmake)" >&2; exit 3; }
done
mkdir -p "$B"
B="$(cd "$B" && pwd)"
GEN=""
command -v ninja >/dev/null 2>&1 && GEN="-G Ninja"
[ -f "$B/CMakeCache.txt" ] && GEN=""   # keep the generator of an existing build dir
if [ "$ASAN" = ON ]; then
  # shellcheck disable=SC2086
  cmake -S "$OPS" -B "$B" $GEN -DCMAKE_TOOLCHAIN_FILE="$OPS/cmake/aarch64.cmake" \
    -DLLMFOLD_SANITIZE=ON -DLLMFOLD_STATIC_TESTS=OFF -DLLMFOLD_BUILD_ORT_LIB=OFF >/dev/null
  cmake --build "$B" -j2 --target llmfold_kernel_test >/dev/null
  echo "built: $B/llmfold_kernel_test (ASan+UBSan)"
  exit 0
fi
# shellcheck disable=SC2086
cmake -S "$OPS" -B "$B" $GEN -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_TOOLCHAIN_FILE="$OPS/cmake/aarch64.cmake" -DLLMFOLD_STATIC_TESTS=ON \
  -DLLMFOLD_BUILD_ORT_LIB=$ORT_LIB ${ORT_INC:+-DORT_INCLUDE_DIR="$ORT_INC"} >/dev/null
cmake --build "$B" -j2 >/dev/null
for prog in arm_kernel_check arm_insn_count; do
  "$CXX" -std=c++17 -O2 -march=armv8-a -Wall -Wextra -DLLMFOLD_HAVE_ARM_KERNELS -I"$OPS/kernels" \
    "$HERE/$prog.cpp" "$B/libllmfold_kernels.a" -static -o "$B/$prog"
done
echo "built: $B/llmfold_kernel_test $B/arm_kernel_check $B/arm_insn_count"
[ "$ORT_LIB" = ON ] && echo "built: $B/libllmfold_ops.so"
if [ "$ORT_LIB" = ON ] && [ -n "$ORT_RT" ]; then
  "$CXX" -std=c++17 -O2 -march=armv8-a -Wall -I"$ORT_INC" "$HERE/ort_driver.cpp" \
    -L"$ORT_RT" -l:libonnxruntime.so -Wl,-rpath-link,"$ORT_RT" -o "$B/ort_driver"
  echo "built: $B/ort_driver"
fi
exit 0
