#!/bin/bash
# Pack what a lent GPU machine (device tool: Python 3.12 with torch and numpy, no network) lacks to run
# benchmarks/bench_gpu_short.py: the wheels of our other dependencies and the sample folder, as one archive
# .gpudata/bundle.tar.xz (≈ 45 MB, git-ignored; the device takes at most 64 MiB with the working tree). Run from the
# repository root with the dev environment built (`make venv`) and a fetched sample folder:
#     bash benchmarks/gpu/pack.sh /path/to/samples
# then on the device: `bash benchmarks/gpu/run.sh [bench_gpu_short.py flags]` with `.gpudata` carried.
set -euo pipefail
SAMPLES=${1:?usage: pack.sh SAMPLES_DIR}
PY=.venv/bin/python
WORK=$(mktemp -d)
mkdir -p "$WORK/whl" "$WORK/site" "$WORK/data/fetched" .gpudata
PLAT=""
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLAT="$PLAT --platform ${p}_x86_64"
done
for pkg in pydantic pydantic_core annotated-types typing-inspection typing-extensions cryptography cffi pycparser \
  monai nibabel pydicom pynrrd imagecodecs; do
  version=$($PY -m pip show "$pkg" 2>/dev/null | sed -n 's/^Version: //p')
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
    -d "$WORK/whl" "$pkg${version:+==$version}"
done
for w in "$WORK"/whl/*.whl; do unzip -q -o "$w" -d "$WORK/site"; done
# imagecodecs: keep the JPEG and zlib codecs the sample SVS needs (44 MB of codecs -> 8 MB)
keep='__init__.py imagecodecs.py _imagecodecs.py _shared.abi3.so _shared_cython.abi3.so _imcd.abi3.so _jpeg8.abi3.so
_zlib.abi3.so _deflate.abi3.so'
for f in "$WORK"/site/imagecodecs/*; do
  case " $(echo $keep) " in *" $(basename "$f") "*) ;; *) rm -rf "$f" ;; esac
done
needed=$(for f in "$WORK"/site/imagecodecs/*.so; do ldd "$f" | awk '/imagecodecs.libs/ {print $1}'; done | sort -u)
for f in "$WORK"/site/imagecodecs.libs/*; do
  echo "$needed" | grep -qx "$(basename "$f")" || rm -f "$f"
done
find "$WORK/site" -type d -name tests -prune -exec rm -rf {} +
rm -rf "$WORK"/site/pydicom/data/test_files
cp -r "$SAMPLES"/{ct,mri,pathology,labels,manifest.json,NOTICE.md} "$WORK/data/fetched/"
gunzip "$WORK"/data/fetched/ct/*.nii.gz  # xz packs the raw CT volumes a quarter smaller than gzip did
tar -C "$WORK" -cf - site data | xz -6 -T2 > .gpudata/bundle.tar.xz
rm -rf "$WORK"
ls -l .gpudata/bundle.tar.xz
