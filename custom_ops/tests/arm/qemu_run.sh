#!/bin/sh
# Runs an aarch64 binary under qemu-aarch64-static in a private mount namespace with an empty
# directory over /sys/devices/system/cpu: ORT's cpuinfo otherwise parses the x86 host's CPU sysfs
# under qemu-user and crashes; with the empty dir it warns "cpuinfo_initialize failed" and runs.
# Needs root (unshare -m); without it the binary runs unwrapped and a note goes to stderr.
# Usage: qemu_run.sh [--cpu CPU] [--libdir DIR] BINARY [ARGS...]
#   --cpu     qemu CPU model (default max; cortex-a72 has neither dotprod nor i8mm)
#   --libdir  directory put on the target's LD_LIBRARY_PATH (e.g. the extracted libonnxruntime)
# The environment reaches the target as is (e.g. LLMFOLD_KERNELS=neon).
set -eu
CPU=max
LIBDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU="$2"; shift 2 ;;
    --libdir) LIBDIR="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: $0 [--cpu CPU] [--libdir DIR] BINARY [ARGS...]" >&2; exit 2; }
QEMU="${QEMU:-qemu-aarch64-static}"
SYSROOT="${LLMFOLD_AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}"
set -- "$QEMU" -cpu "$CPU" -L "$SYSROOT" ${LIBDIR:+-E LD_LIBRARY_PATH="$LIBDIR"} "$@"
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null 2>&1; then
  EMPTY="$(mktemp -d)"
  trap 'rmdir "$EMPTY" 2>/dev/null || true' EXIT
  # exec inside the namespace; the bind mount disappears with it.
  unshare -m --propagation private sh -c 'd="$1"; shift; mount --bind "$d" /sys/devices/system/cpu && exec "$@"' sh "$EMPTY" "$@"
  exit $?
fi
echo "qemu_run.sh: not root, running without the /sys/devices/system/cpu mask" >&2
exec "$@"
