#!/usr/bin/env bash
# Build inputs of the hosts, from package registries only (nothing vendored, nothing committed):
#   build/hosts/include/          ONNX Runtime 1.29 C/C++ headers (API 29) from the npm package
#                                 com.github.asus4.onnxruntime@0.4.9 (Plugins/iOS~/.../Headers)
#   build/hosts/libonnxruntime.so.1 -> the onnxruntime wheel's capi/libonnxruntime.so.<version>
#                                 (SONAME libonnxruntime.so.1), the library the Python runtime uses
# Usage: runtime/cpp/fetch_deps.sh [OUT_DIR] [PYTHON]   (defaults: build/hosts, .venv/bin/python)
# ORT_LIB=/path/to/libonnxruntime.so.X links another build (a CUDA one, say) instead of the wheel's.
set -euo pipefail
OUT=${1:-build/hosts}
PYTHON=${2:-.venv/bin/python}
NPM_PACKAGE=com.github.asus4.onnxruntime@0.4.9
HEADERS='package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64_x86_64-simulator/onnxruntime.framework/Headers'
mkdir -p "$OUT"
if [ ! -f "$OUT/include/onnxruntime_cxx_api.h" ]; then
    command -v npm >/dev/null || { echo "error: npm is needed to fetch the ONNX Runtime headers (apt-get install npm)" >&2; exit 2; }
    work=$(mktemp -d "$OUT/.npm.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent "$NPM_PACKAGE" >/dev/null)
    tar -xzf "$work"/*.tgz -C "$work" --wildcards "$HEADERS/*.h"
    rm -rf "$OUT/include.partial" && mkdir -p "$OUT/include.partial"
    cp "$work/$HEADERS"/*.h "$OUT/include.partial/"
    grep -q '#define ORT_API_VERSION' "$OUT/include.partial/onnxruntime_c_api.h"
    rm -rf "$OUT/include" && mv "$OUT/include.partial" "$OUT/include"
fi
if [ -n "${ORT_LIB:-}" ]; then
    lib=$(readlink -f "$ORT_LIB")
else
    capi=$("$PYTHON" -c "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))")
    lib=$(ls "$capi"/libonnxruntime.so.* 2>/dev/null | head -n 1)
fi
[ -f "$lib" ] || { echo "error: no libonnxruntime.so.<version> found (pip install onnxruntime, or set ORT_LIB)" >&2; exit 2; }
ln -sfn "$lib" "$OUT/libonnxruntime.so.1"
echo "headers: $OUT/include (ORT_API_VERSION $(grep -o 'define ORT_API_VERSION [0-9]*' "$OUT/include/onnxruntime_c_api.h" | grep -o '[0-9]*$')); library: $OUT/libonnxruntime.so.1 -> $lib"
