#!/usr/bin/env bash
# Two training steps of each shipped recipe family (resnet32x4 -> resnet8x4) on the synthetic set, one line
# per recipe: the step and a hash of the student's weights. Run it on two checkouts (before and after a change
# of shape) and diff the outputs: equal hashes mean bit-identical training.
#
#   tools/two_step_hashes.sh SRC OUT [METHOD ...]   # SRC: a checkout's src/ (PYTHONPATH), OUT: a scratch folder
#   PYTHON=.venv/bin/python tools/two_step_hashes.sh /path/to/old/src /tmp/old; ... ; diff /tmp/{old,new}/hashes.txt
#
# The teacher is a resnet32x4 at seed 0's initial weights (no download), written once by the current python.
set -euo pipefail
SRC=$(cd "$1" && pwd); OUT=$2; PY=${PYTHON:-python}; shift 2
METHODS=("$@"); [ ${#METHODS[@]} -gt 0 ] || METHODS=(kd dkd dtkd deepkd_kd deepkd_dkd deepkd_dkd_topk mlkd crld dot fitnet reviewkd)
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$SRC OMP_NUM_THREADS=1
TEACHER=$OUT/teacher_resnet32x4.safetensors
"$PY" - "$TEACHER" <<'PY'
import sys, torch
from safetensors.torch import save_file
from deepkd.models import create_model
torch.manual_seed(0)
save_file({k: v.contiguous() for k, v in create_model("resnet32x4", num_classes=100).state_dict().items()}, sys.argv[1])
PY
DATA="data={dataset: synthetic, batch_size: 16, eval_batch_size: 64, synthetic: {num_train: 256, num_test: 64}}"
: > "$OUT/hashes.txt"
for m in "${METHODS[@]}"; do
  recipe=cifar100/resnet32x4-resnet8x4/$m
  if ! "$PY" -m deepkd.cli train "$recipe" "$DATA" teacher.weights="$TEACHER" train.stop_after_steps=2 \
      train.device=cpu train.progress=none output_dir="$OUT/runs" experiment="$m" seed=0 > "$OUT/$m.log" 2>&1; then
    echo "$m failed: $(tail -1 "$OUT/$m.log")" | tee -a "$OUT/hashes.txt"; continue
  fi
  "$PY" - "$OUT/runs/$m/seed0/last.pt" "$m" <<'PY' | tee -a "$OUT/hashes.txt"
import hashlib, sys, torch
state = torch.load(sys.argv[1], weights_only=False)
digest = hashlib.sha256()
for key in sorted(state["model"]):
    digest.update(key.encode()); digest.update(state["model"][key].cpu().numpy().tobytes())
print(sys.argv[2], "step", state["step"], digest.hexdigest()[:16])
PY
done
