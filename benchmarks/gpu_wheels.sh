#!/usr/bin/env bash
# The wheels a GPU machine needs (its image has torch, transformers, accelerate, peft, timm, but no
# diffusers, omegaconf, open-clip, bitsandbytes, deepspeed, tensorboard or matplotlib): the shared
# tool's set plus the two declared dependencies it leaves out (tensorboard for the run's logs,
# matplotlib for its report) with what they need to write logs and plots, at the versions of
# constraints.txt (not grpcio: only the TensorBoard server needs it, and it is 7 MB of the 64 MiB carry).
#   PY=.venv/bin/python bash benchmarks/gpu_wheels.sh      (then run with carry: [".whl"])
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
extra=()
for name in tensorboard tensorboard-data-server Markdown Werkzeug MarkupSafe absl-py protobuf \
            matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six; do
  pin=$(grep -iE "^${name}==" constraints.txt || true)
  extra+=("${pin:-$name}")
done
bash ../shared/tools/gpu-wheels.sh "${extra[@]}"
