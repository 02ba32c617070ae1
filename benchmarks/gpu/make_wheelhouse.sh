#!/usr/bin/env bash
# Builds .whl/ in the repository's root (git-ignored) for the GPU machine of the `device` tool: Python 3.12 with
# torch, numpy, scipy, scikit-image, scikit-learn, pandas, matplotlib and seaborn already there, but none of
# nnU-Net's own packages. Run it here (it needs pip's network), then name .whl in `carry`; on the GPU machine,
# benchmarks/gpu/run_checks.sh installs it. SimpleITK's wheel alone is about 53 MB and the carried tree may be
# 64 MiB at most, so SimpleITK travels as an xz tarball of the unpacked wheel (about 28 MB).
#
# Versions: the ones this project was developed and tested with (nnunetv2 2.8.1, Python 3.11 here); change them
# together with setup.py.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-python3}
W=.whl
rm -rf "$W" && mkdir -p "$W"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
download() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$W" "$@"
}
# nnU-Net and what it imports that the GPU machine lacks (its Requires-Dist, less what the machine has)
download nnunetv2==2.8.1 dynamic_network_architectures==0.4.4 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 \
    nibabel==5.4.2 blosc2==4.14.1 ndindex==1.10.1 numexpr==2.14.2 connected-components-3d==4.1.1 yacs==0.1.8 \
    graphviz==0.21 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    unittest2==1.1.0 linecache2==1.0.0 traceback2==1.4.0 future==1.0.0 typing_extensions==4.16.0
# (nnunetv2 also lists imagecodecs, which nnunetv2 2.8.1 never imports; pydantic 2.14, which blosc2 imports,
# needs typing_extensions >= 4.16, newer than the machine may have)
# sdist-only: acvl-utils, and this project
"$PY" -m pip wheel -q --no-deps -w "$W" acvl_utils==0.2.6 .
# SimpleITK: unpacked and xz-compressed
tmp=$(mktemp -d)
download -d "$tmp" SimpleITK==2.5.7
mkdir "$tmp/site" && (cd "$tmp/site" && unzip -q "$tmp"/[sS]imple[iI][tT][kK]-*.whl)
tar -C "$tmp/site" -cJf "$W/simpleitk-site.tar.xz" .
rm -rf "$tmp"
du -sh "$W"; ls -la "$W"
