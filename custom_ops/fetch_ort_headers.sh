#!/bin/sh
# Fetch ONNX Runtime C/C++ headers (Debian trixie's libonnxruntime-dev, ORT 1.21) into <builddir>/ortdev
# without touching the system's apt sources. Idempotent: does nothing when the headers are present.
# Usage: custom_ops/fetch_ort_headers.sh <builddir>     (headers end up in <builddir>/ortdev/usr/include/onnxruntime)
set -eu
B="${1:?usage: $0 <builddir>}"
mkdir -p "$B"
B="$(cd "$B" && pwd)"
INC="$B/ortdev/usr/include/onnxruntime"
if [ -f "$INC/onnxruntime_lite_custom_op.h" ]; then
  echo "ORT headers present: $INC"
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "error: apt-get not found; put ORT headers in $INC by hand" >&2; exit 2; }
mkdir -p "$B/apt/lists/partial"
echo 'deb http://deb.debian.org/debian trixie main' > "$B/apt/sources.list"
o="-oDir::Etc::SourceList=$B/apt/sources.list -oDir::Etc::SourceParts=/dev/null -oDir::State::Lists=$B/apt/lists -oDir::Cache=$B/apt/cache -oDebug::NoLocking=1"
mkdir -p "$B/apt/cache/archives/partial"
# shellcheck disable=SC2086
apt-get $o -q update >/dev/null
# shellcheck disable=SC2086
(cd "$B/apt" && rm -f libonnxruntime-dev_*.deb && apt-get $o -q download libonnxruntime-dev)
dpkg -x "$B"/apt/libonnxruntime-dev_*.deb "$B/ortdev"
[ -f "$INC/onnxruntime_lite_custom_op.h" ] || { echo "error: onnxruntime_lite_custom_op.h missing after extraction" >&2; exit 2; }
echo "ORT headers installed: $INC"
