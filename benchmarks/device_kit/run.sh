#!/bin/bash
# Device kit: one GPU call from a plain checkout, nothing installed. Prepare the kit here first:
#   python benchmarks/device_kit/prepare.py --pool ALIGNED_POOL --lfw ALIGNED_LFW
# then, with the device tool: run `bash benchmarks/device_kit/run.sh`, carry [".gpu"], timeout ~480 s.
# It runs the core GPU checks (AMP agreement, SDPA kernels, step throughput), trains vit_tiny_fiqa on
# the pool for 40 epochs with validation on LFW fold 5 (~2 min on an H200), and returns the best
# checkpoint as fp16 weights in $OUT (under the 16 MB a returned file may have).
set -x
cd "$(dirname "$0")/../.."
python3 -c "import glob,zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob('.gpu/whl/*.whl')]"
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch,timm,pydantic;print(torch.__version__,timm.__version__,pydantic.__version__)"
timeout 150 python3 benchmarks/gpu_core_check.py --out $OUT > $OUT/gpu_core_check.log 2>&1; echo "core rc=$?"; grep -v "^{'margin" $OUT/gpu_core_check.log | tail -12
timeout 240 python3 -m training --config pool_vit_tiny_fiqa --set data.kind=rec --set data.path=.gpu/pool \
  --set val.kind=bin --set val.path=.gpu/validation.bin --set data.batch_size=256 --set data.workers=12 \
  --set train.epochs=40 --set train.progress=false --set train.log_every=50 --set val.patience=0 \
  --set train.checkpoint_every=100000 --run-dir /tmp/run > $OUT/train.log 2>&1; echo "train rc=$?"
grep -E "validation|done|best|Error|error" $OUT/train.log | tail -45
cp /tmp/run/log.jsonl $OUT/train_log.jsonl
python3 benchmarks/device_kit/pack_best.py /tmp/run $OUT/vit_tiny_fiqa_pool.pt
