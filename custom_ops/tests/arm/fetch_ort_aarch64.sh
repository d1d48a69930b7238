#!/bin/sh
# Downloads the onnxruntime 1.31.1 manylinux_2_28_aarch64 wheel (no install) and extracts its
# libonnxruntime.so.* into <builddir>/ort-aarch64/lib (it needs only glibc/libstdc++ at run time).
# Idempotent. Usage: fetch_ort_aarch64.sh <builddir>   (PYTHON=... selects the python with pip)
set -eu
B="${1:?usage: $0 <builddir>}"
VER=1.31.1
mkdir -p "$B"
B="$(cd "$B" && pwd)"
OUT="$B/ort-aarch64"
LIB="$OUT/lib"
if ls "$LIB"/libonnxruntime.so.* >/dev/null 2>&1 && [ -f "$OUT/VERSION" ] && [ "$(cat "$OUT/VERSION")" = "$VER" ]; then
  echo "ORT aarch64 present: $LIB"
  exit 0
fi
PY="${PYTHON:-python3}"
mkdir -p "$OUT/wheel" "$LIB"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
  --platform manylinux_2_28_aarch64 -d "$OUT/wheel" "onnxruntime==$VER"
WHL="$(ls "$OUT"/wheel/onnxruntime-$VER-*manylinux_2_28_aarch64*.whl | head -n 1)"
"$PY" - "$WHL" "$LIB" <<'PYEOF'
import os, sys, zipfile
whl, lib = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if os.path.basename(n).startswith("libonnxruntime.so")]
    if not names:
        sys.exit("no libonnxruntime.so.* in " + whl)
    for n in names:
        with z.open(n) as src, open(os.path.join(lib, os.path.basename(n)), "wb") as dst:
            dst.write(src.read())
        print("extracted", os.path.basename(n))
PYEOF
# Link-time name and the SONAME (libonnxruntime.so.<major>) the loader looks for.
so="$(ls "$LIB"/libonnxruntime.so.*.* | head -n 1)"
ln -sf "$(basename "$so")" "$LIB/libonnxruntime.so"
ln -sf "$(basename "$so")" "$LIB/libonnxruntime.so.${VER%%.*}"
echo "$VER" > "$OUT/VERSION"
echo "ORT aarch64 installed: $LIB"
