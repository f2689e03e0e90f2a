#!/bin/bash
# Device kit, training campaign: one GPU call (about 9 minutes of work) from a plain checkout.
# Prepare here first (the pool with Pins is too large for one call: two shards over two calls):
#   python benchmarks/device_kit/prepare.py --pool ALIGNED_POOL --lfw ALIGNED_LFW --shards 2
#   call 1: carry [".gpu/whl", ".gpu/validation.bin", ".gpu/pool_0"], command: `ls .gpu` (stays warm)
#   call 2: carry [".gpu/pool_1"], command: `bash benchmarks/device_kit/run_campaign.sh`, timeout 600
#   (one call with carry [".gpu"] when the pool fits: prepare.py without --shards)
# It runs, at the same time on the one GPU:
#   A. the shipped model's recipe (vit_tiny_fiqa, ElasticFace-Arc+ + UNPG + quality token) on the
#      deduplicated pool, with single-image identities as extra classes (the default) and without
#      them (data.min_images_per_identity=2): the validation split says whether they help;
#   B. the method-comparison rows of protocol 'gpu' (benchmarks/method_comparison.py), 4 at a time,
#      until CAMPAIGN_MINUTES (default 7) is spent; rows left over run in a later call.
# Returns under $OUT: each run's log, and best-on-validation checkpoints packed as fp16 weights.
# Then, here: python benchmarks/method_comparison.py report --protocol gpu --packed OUT/compare --lfw ALIGNED_LFW
set -x
cd "$(dirname "$0")/../.."
KIT=${KIT:-.gpu}
python3 -c "import glob,zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob('$KIT/whl/*.whl')]"
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
MINUTES=${CAMPAIGN_MINUTES:-7}
# Dry run on a CPU machine first: CAMPAIGN_DRYRUN=1 OUT=/tmp/out bash benchmarks/device_kit/run_campaign.sh
DRY=""; PARALLEL=4
if [ -n "$CAMPAIGN_DRYRUN" ]; then  # two steps, a validation on 100 pairs, everything else as on the GPU
  DRY="--set train.device=cpu --set train.amp=off --set train.max_steps=2 --set val.every_steps=2
       --set val.max_pairs=100 --set data.workers=0 --set data.batch_size=32"; PARALLEL=1
else nvidia-smi -L; fi
if [ -d $KIT/pool ]; then POOL=$KIT/pool; else
  python3 benchmarks/device_kit/merge_shards.py $KIT/pool_* --out /tmp/pool || exit 1; POOL=/tmp/pool; fi
mkdir -p $OUT/compare $OUT/fiqa
VIT="--config pool_vit_tiny_fiqa --set data.kind=rec --set data.path=$POOL --set val.kind=bin
  --set val.path=$KIT/validation.bin --set data.batch_size=256 --set data.workers=3 --set train.epochs=40
  --set train.progress=false --set train.log_every=100 --set val.patience=0 --set train.checkpoint_every=100000"
timeout $((MINUTES * 60 + 60)) python3 -m training $VIT $DRY --run-dir /tmp/fiqa_all > $OUT/fiqa/all.log 2>&1 &
timeout $((MINUTES * 60 + 60)) python3 -m training $VIT --set data.min_images_per_identity=2 \
  $DRY --run-dir /tmp/fiqa_min2 > $OUT/fiqa/min2.log 2>&1 &
python3 benchmarks/method_comparison.py train --protocol gpu --pool $POOL --val-bin $KIT/validation.bin \
  --runs /tmp/cmp --parallel $PARALLEL --max-minutes $MINUTES $DRY ${CAMPAIGN_ROWS:+--rows $CAMPAIGN_ROWS} > $OUT/compare/campaign.log 2>&1
wait
for run in /tmp/fiqa_all /tmp/fiqa_min2; do
  [ -f $run/checkpoints/best.json ] && python3 benchmarks/device_kit/pack_best.py $run $OUT/fiqa/$(basename $run).pt
  cp $run/log.jsonl $OUT/fiqa/$(basename $run).jsonl 2>/dev/null
done
for run in /tmp/cmp/gpu/*; do
  [ -f $run/done.json ] && python3 benchmarks/device_kit/pack_best.py $run $OUT/compare/$(basename $run).pt
  cp $run/train.out $OUT/compare/$(basename $run).log 2>/dev/null
done
grep -h "done:" $OUT/fiqa/*.log $OUT/compare/*.log | tail -20
ls -la $OUT/compare $OUT/fiqa
