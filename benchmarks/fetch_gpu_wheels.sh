#!/usr/bin/env bash
# Downloads, here (package registries reachable), the wheels that the device machine's Python
# (3.12, with torch, timm, numpy, … but no open_clip) lacks, into .whl/ at the repository root,
# which git ignores locally. Carry it to the device (the device tool's `carry: [".whl"]`);
# benchmarks/pending_gpu.sh installs them there when the interpreter lacks open_clip.
# Versions: the ones this repository is tested with (timm too, so results do not depend on the
# image's timm).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl  # (an earlier pin's wheels beside the new ones would make pip refuse both)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 timm==1.0.31
# TorchCodec (the other JPEG decoder, crane.data.jpeg_decoders), the release that runs with
# torch 2.14 here: the device installs it only where it imports with its torch (pending_gpu.sh).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .whl/optional torchcodec==0.17.0
ls -l .whl .whl/optional
