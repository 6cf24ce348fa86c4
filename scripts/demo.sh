#!/usr/bin/env bash
# The main job end to end on a fresh machine: install edgekit, train the example digits CNN
# (scikit-learn's bundled digits, numpy only, a few seconds), convert it for a Raspberry Pi
# and print the report. Output lands in ./example (model and data) and ./out (the artifact).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[convert,examples]'
.venv/bin/python -m edgekit.converters.examples example
.venv/bin/edgekit convert example/digits_cnn.onnx --profile raspberrypi -o out \
  --calibration example/calibration.npz --validation example/validation.npz
