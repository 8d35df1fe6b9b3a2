#!/usr/bin/env bash
# Usage: bash tools/cifar_dry_run.sh [WORK_DIR]   (deepkd installed; no download needed)
# One CIFAR-100 recipe for 1 epoch through the real CLI, on generated data in the real pickle format.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/deepkd-dryrun}; rm -rf $W; mkdir -p $W
python -c "from deepkd.data import cifar; cifar.write_python_format('$W/data/cifar-100-python', 2000, 500)"
deepkd train cifar100/teacher/resnet32x4 data.root=$W/data output_dir=$W/runs schedule.epochs=1 train.log_every=8 train.progress=lines
python - <<PY
import torch, pathlib
ckpt = torch.load("$W/runs/cifar100_resnet32x4_teacher/seed0/best.pt", weights_only=True)
folder = pathlib.Path("$W/cifar_teachers/resnet32x4_vanilla"); folder.mkdir(parents=True)
torch.save({"model": ckpt["model"], "epoch": 240}, folder / "ckpt_epoch_240.pth")  # community layout
PY
deepkd train cifar100/resnet32x4-resnet8x4/deepkd_dkd data.root=$W/data output_dir=$W/runs \
  schedule.epochs=1 teacher.weights=$W/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth \
  train.log_every=8 train.progress=lines train.gsnr_every=16
deepkd plot $W/runs/cifar100_resnet32x4_resnet8x4_deepkd_dkd
deepkd summary $W/runs
find $W/runs -type f | sort
