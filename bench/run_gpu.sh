#!/usr/bin/env bash
# The benchmark suite on CUDA: writes bench/results/<device>.json, .md and .png.
#
#   bash bench/run_gpu.sh            # from the repository root, in an environment with CUDA torch
#
# The device name (torch.cuda.get_device_name) and torch version go into the JSON and the table.
# On CUDA the suite also times the samplers captured in CUDA graphs (skipped on CPU), the
# float32 policy, and the DMD2 update against modelopt with max-allocated memory.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(torch.__version__, torch.cuda.get_device_name())
PY
name=$(python -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
python -m pytest bench --bench-device cuda -p no:cacheprovider -q \
    --benchmark-json "bench/results/${name}.json" --benchmark-columns=median,iqr,rounds
python bench/report.py "bench/results/${name}.json" --compact
echo "wrote bench/results/${name}.{json,md,png}"
