#!/usr/bin/env bash
# Here, before a device run: the wheels the device lacks (./wheels) and the COCO photos (./devdata),
# both git-ignored, to be carried: device run with carry ["wheels", "devdata"] (see bench/RESULTS.md).
#   bench/prepare_device.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
bench/fetch_wheels.sh "${1:-.venv/bin/python}"
SHARED=${LOCALTAG_SHARED_DATA:-../shared/data}
mkdir -p devdata
rm -rf devdata/coco128
cp -r "$SHARED/coco128" devdata/coco128
du -sh wheels devdata
