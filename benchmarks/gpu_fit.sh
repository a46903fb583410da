#!/usr/bin/env bash
# One benchmark fit on the GPU machine: the h100 recipe for STEPS optimizer steps on unshuffled lines,
# then its table row.   benchmarks/gpu_fit.sh MODEL_DIR DATA_DIR BACKEND STEPS LOG_DIR
set -euo pipefail
model=$1 data=$2 backend=$3 steps=$4 logs=$5
python3 -m dsocr_lightning fit --config configs/h100.yaml \
  --model.model_name_or_path "$model" --model.backend "$backend" --model.adapter_dir null \
  --model.generation.max_new_tokens 32 \
  --data.source "$data" --data.source_type imagefolder --data.train_split train --data.val_split test \
  --data.image_column image --data.shuffle false \
  --trainer.max_steps "$steps" --trainer.val_check_interval $((4 * steps)) \
  --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir "$logs"
python3 benchmarks/summarize.py "$backend" "$logs/lightning_logs/version_0"
