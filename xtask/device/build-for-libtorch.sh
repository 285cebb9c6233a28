#!/usr/bin/env bash
# Builds denoise-cli against another libtorch than the one tch expects: the PyTorch wheel of a
# lent GPU machine (2.11.0 in 2026-11), whose C++ ABI differs from 2.13's. Not for users: a
# user's machine gets libtorch 2.13 from `cargo xtask setup`.
#
#   xtask/device/build-for-libtorch.sh 2.11.0 [3.12]   # torch version, the device's Python
#
# Downloads that wheel (headers and libraries only are used), builds in a scratch copy of the
# committed tree with torch-sys patched to compile against it: generated wrappers of ops that
# libtorch lacks are replaced by a throw. Writes .gpu/denoise-cli.gz (stripped, gzipped).
set -euo pipefail
VER=${1:?torch version, e.g. 2.11.0}
PYV=${2:-3.12}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
W=${WORK:-/tmp/denoise-libtorch-$VER}
mkdir -p "$W"
cd "$W"
if [ ! -d torch/lib ]; then
  pip download "torch==$VER" --no-deps --python-version "$PYV" \
    --platform manylinux_2_28_x86_64 --only-binary=:all: -d wheel
  unzip -q wheel/torch-*.whl 'torch/lib/*' 'torch/include/*' 'torch/version.py'
fi
TS=$(grep -A1 '^name = "torch-sys"' "$ROOT/Cargo.lock" | sed -n 's/^version = "\(.*\)"/\1/p')
if [ ! -d torch-sys ]; then
  (cd "$ROOT" && cargo fetch -q)
  cp -r "$(ls -d "$HOME"/.cargo/registry/src/*/torch-sys-"$TS" | head -1)" torch-sys
fi
rm -rf repo
mkdir repo
(cd "$ROOT" && git archive HEAD) | tar -x -C repo
printf '\n[patch.crates-io]\ntorch-sys = { path = "%s/torch-sys" }\n' "$W" >> repo/Cargo.toml
export LIBTORCH="$W/torch" LIBTORCH_BYPASS_VERSION_CHECK=1 CARGO_TARGET_DIR="$W/target"
for attempt in 1 2 3; do
  if (cd repo && cargo build --release -p denoise-cli 2> "$W/build.log"); then
    break
  fi
  [ "$attempt" = 3 ] && { tail -30 "$W/build.log"; exit 1; }
  # Every wrapper that failed: its statements, up to the PROTECT block's closing line, become
  # one throw (bottom up, so the line numbers of the others stay right).
  python3 - "$W" <<'PY'
import re, sys
w = sys.argv[1]
log = open(f"{w}/build.log").read()
lines = sorted({int(n) for n in re.findall(r"torch_api_generated\.cpp:(\d+):\d+: error", log)})
if not lines:
    sys.exit("the build failed for another reason: see build.log")
path = f"{w}/torch-sys/libtch/torch_api_generated.cpp"
src = open(path).read().split("\n")
for n in reversed(lines):
    end = n - 1
    while src[end].strip() != ")":
        end += 1
    src[n - 1:end] = ['    throw std::runtime_error("not in this libtorch");']
open(path, "w").write("\n".join(src))
print(f"stubbed {len(lines)} wrapper(s)")
PY
done
strip -o "$W/denoise-cli" "$W/target/release/denoise-cli"
mkdir -p "$ROOT/.gpu"
gzip -9 -c "$W/denoise-cli" > "$ROOT/.gpu/denoise-cli.gz"
echo "wrote $ROOT/.gpu/denoise-cli.gz ($(du -h "$ROOT/.gpu/denoise-cli.gz" | cut -f1)); check it here:"
echo "  LD_LIBRARY_PATH=$W/torch/lib $W/denoise-cli doctor"
