#!/usr/bin/env bash
# The multi-GPU runs (2+ GPUs of one host): NCCL weight sync, FSDP2 against one GPU on the same
# data, and GRPO with the trainer on GPU 0 and a `posttrain serve` engine on GPU 1.
#
#   bash bench/multi_gpu.sh [sync] [fsdp] [disagg]      # default: all three
#
# Environment: SHAPES (default "qwen2.5-0.5b qwen2.5-1.5b") for sync and disagg; FSDP_SHAPE (1.5b);
# STEPS (GRPO steps, 3); TRAIN_DEVICE / SERVE_DEVICE (cuda:0 / cuda:1; cpu for a smoke test with SHAPES=tiny). NVLink multicast stays off (the machines' rule; harmless elsewhere).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
SHAPES=${SHAPES:-"qwen2.5-0.5b qwen2.5-1.5b"}
STEPS=${STEPS:-3}
TRAIN_DEVICE=${TRAIN_DEVICE:-cuda:0}
SERVE_DEVICE=${SERVE_DEVICE:-cuda:1}
parts=${*:-"sync fsdp disagg"}
cd "$(dirname "$0")/.."

if [[ $parts == *sync* ]]; then
  for shape in $SHAPES; do
    echo "== weight sync, $shape"
    $PY bench/weight_sync.py --shape "$shape" --modes shared,copy,checkpoint,broadcast
  done
fi

if [[ $parts == *fsdp* ]]; then
  # Same --tokens-per-step for both runs: the same mini-batches, so the same loss curve.
  for n in 1 2; do
    echo "== FSDP2, ${FSDP_SHAPE:-1.5b}, $n GPU(s)"
    $PY -m torch.distributed.run --nproc-per-node $n bench/fsdp_train.py --device cuda --shapes "${FSDP_SHAPE:-1.5b}" \
      --variants fsdp --steps 6 --warmup 1 --tokens-per-step 65536 --losses
  done
fi

if [[ $parts == *disagg* ]]; then
  port=8011
  for shape in $SHAPES; do
    echo "== GRPO, trainer $TRAIN_DEVICE, engine (posttrain serve) $SERVE_DEVICE, sync.mode=broadcast, $shape"
    model=/tmp/posttrain-random-$shape
    [[ -d $model ]] || $PY bench/random_model.py --shape "$shape" --out "$model" >/dev/null
    $PY -m posttrain serve --model "$model" --port $port --device "$SERVE_DEVICE" >"/tmp/serve-$shape.log" 2>&1 &
    server=$!
    for _ in $(seq 120); do
      $PY -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "http://127.0.0.1:$port/health" 2>/dev/null && break
      kill -0 $server 2>/dev/null || break
      sleep 1
    done
    out=/tmp/grpo-disagg-$shape
    rm -rf "$out"
    $PY -m posttrain grpo model.path="$model" model.device="$TRAIN_DEVICE" trainer.output_dir="$out" trainer.max_steps=$STEPS \
      rollout.backend=openai rollout.base_url="http://127.0.0.1:$port/v1" sync.mode=broadcast sync.dtype=bfloat16 \
      rollout.max_new_tokens=64 validation.every=0 validation.at_start=false validation.at_end=false \
      checkpoint.every=0 logging.progress_bar=false 2>&1 | tail -5
    $PY - "$out/metrics.jsonl" "$shape" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"sync/seconds"' in line]
for m in rows:
    print(f"{sys.argv[2]} step {m['step']}: sync/seconds {m['sync/seconds']:.3f}, sync/bytes {m['sync/bytes'] / 1e6:.0f} MB, "
          f"step time {m.get('time/step', float('nan')):.2f} s")
EOF
    kill $server; wait $server 2>/dev/null
    tail -3 "/tmp/serve-$shape.log"
    port=$((port + 1))
  done
fi
