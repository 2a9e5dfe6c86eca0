#!/usr/bin/env bash
# Wheels of what the GPU machine lacks for benchmarks/gpu_check.py, into the ignored folder wheels/.
#
# The GPU machine reaches no package registry and has torch, transformers, accelerate and pytest but not
# diffusers or bitsandbytes; what it gets travels with the working tree, 64 MiB in all. The versions are
# requirements.txt's pins. bitsandbytes' manylinux wheel (43 MB) holds a native library for every CUDA and ROCm
# release; this keeps only the CUDA ones named (default 130,132: the machine's torch is built for CUDA 13.0, and
# bitsandbytes falls back to the nearest library of the same major version), which brings it to about 8 MB.
#
#   bash benchmarks/gpu_wheels.sh [CUDA_LIBS=130,132]
#
# then, on the GPU machine (the device tool's run, with carry ["wheels"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site wheels/*.whl &&
#   PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
keep=${1:-130,132}
python=${PYTHON:-python3}
dest=wheels
pin() { grep -i "^$1==" requirements.txt | cut -d= -f3; }

rm -rf "$dest" && mkdir -p "$dest"
# ftfy, wcwidth, unidecode, emoji: DALL·E mini's text normalizer (pure Python, about 0.9 MB together)
for name in diffusers bitsandbytes accelerate ftfy wcwidth unidecode emoji; do
    version=$(pin "$name")
    [ -n "$version" ] || { echo "no pin for $name in requirements.txt" >&2; exit 1; }
    # the GPU machine is x86-64 Linux with Python 3.12; all are py3-none wheels
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform any \
        -d "$dest" "$name==$version"
done

"$python" - "$dest" "$keep" <<'EOF'
"""Rewrite the bitsandbytes wheel without the native libraries the GPU machine cannot use (RECORD updated)."""
import glob, re, sys, zipfile

dest, keep = sys.argv[1], {f"libbitsandbytes_cuda{v}.so" for v in sys.argv[2].split(",")}
(wheel,) = glob.glob(f"{dest}/bitsandbytes-*.whl")
native = re.compile(r"bitsandbytes/libbitsandbytes_(cuda|rocm|xpu)\w*\.so$")
with zipfile.ZipFile(wheel) as src:
    items = [(i, src.read(i)) for i in src.infolist()]
dropped = {i.filename for i, _ in items if native.search(i.filename) and i.filename.split("/")[-1] not in keep}
kept_libs = sorted(i.filename.split("/")[-1] for i, _ in items if native.search(i.filename) and i.filename not in dropped)
if not kept_libs:
    sys.exit(f"none of {sorted(keep)} is in {wheel}")
with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as out:
    for info, data in items:
        if info.filename in dropped:
            continue
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if line.split(b",")[0].decode() not in dropped)
        out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
print(f"bitsandbytes: kept {', '.join(kept_libs)} and the CPU library; dropped {len(dropped)} native libraries")
EOF

ls -l "$dest"
# What travels: tracked and untracked-not-ignored files, plus the carried wheels; at most 64 MiB.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
wheels=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
total=$((tree + wheels))
limit=$((64 * 1024 * 1024))
printf 'working tree %.1f MiB + wheels %.1f MiB = %.1f MiB of 64 MiB\n' \
    "$(echo "$tree / 1048576" | bc -l)" "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
[ "$total" -le "$limit" ] || { echo "too large to travel: keep fewer CUDA libraries" >&2; exit 1; }
