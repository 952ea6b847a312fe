#!/usr/bin/env bash
# What bench/gpu.sh needs on a GPU node that cannot reach the internet (a cluster's compute node, a
# lent machine), in one folder to copy there (paths relative to the repository):
#     bash bench/offline_pack.sh [PACK [DATA]]      # here, PACK (default pack/: git ignores it) from DATA
#                                                   # (default ../shared/data) and the package index
#     WHEELS=PACK/wheels XLGEN_CACHE=PACK/cache bash bench/gpu.sh PACK/data      # there
#   PACK/data    the files of DATA that gpu.sh reads: SQuAD (training: its stand-in offline), the 141
#                GUM summaries, the raw text the tiny tokenizers are trained on (12 MB; XQuAD and
#                the real systems' predictions left out)
#   PACK/cache   the tiny models built from it ($XLGEN_CACHE): the benchmarks use their tokenizers,
#                and a first build takes over a minute on 2 cores, longer than some steps' limits
#   PACK/wheels  the pinned transformers of requirements.txt (PACKAGES: others) for the node's Python
#                (PYVER, default 3.12; x86-64 Linux); gpu.sh installs them ahead of the node's own
#                packages, which keep its CUDA build of torch
# About 50 MB in all. PACK is written beside itself first (PACK.part), then renamed.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${1:-pack}
DATA=${2:-../shared/data}
PYVER=${PYVER:-3.12}
PACKAGES=${PACKAGES:-transformers}
PY=${PYTHON:-$(command -v python || command -v python3)}
for need in squad summarization text; do
    [ -d "$DATA/$need" ] || { echo "error: bench/offline_pack.sh: $DATA has no $need/ (a data directory as ../shared/data)" >&2; exit 2; }
done
pins=()
for package in $PACKAGES; do
    pin=$(grep -o -i -E "^$package==[^ #]+" requirements.txt) ||
        { echo "error: bench/offline_pack.sh: PACKAGES: $package is not pinned in requirements.txt" >&2; exit 2; }
    pins+=("$pin")
done
part="$PACK.part"
rm -rf "$part"
mkdir -p "$part/data/squad"
cp "$DATA"/squad/*.json* "$part/data/squad/"
cp -r "$DATA/summarization" "$DATA/text" "$part/data/"
XLGEN_CACHE="$part/cache" "$PY" -c "import sys, models
for name in ('tiny-mt5', 'tiny-mbart', 'tiny-nllb'):
    models.load_tokenizer(name, sys.argv[1])" "$part/data"
platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$platform")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${platforms[@]}" \
    -d "$part/wheels" "${pins[@]}"
rm -rf "$PACK"
mv "$part" "$PACK"
du -sh "$PACK"/*
du -sh "$PACK"
