#!/usr/bin/env bash
# One device call: Ray (its wheel joined from two parts carried into /tmp/ray.part.*) and the
# process backend on one GPU. Checks first (K=0 equals sync, weights reach the replicas), then
# the TRL-shaped workload's speed, sync vs async K=1, per backend. Usage on the device:
#   bash bench/gpu_ray_async.sh $OUT
set -u
OUT=${1:-/tmp/out}
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled
if [ -f /tmp/ray.part.aa ] && [ -f /tmp/ray.part.ab ]; then
  cat /tmp/ray.part.aa /tmp/ray.part.ab > /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl 2>&1 | tail -2
fi
python3 -c "import ray; print('ray', ray.__version__)" || echo "ray: not importable"
# correctness on the GPU for each backend (3 steps: sync, async K=0 must equal it, async K=1)
for backend in process ray; do
  extra=(--override cluster.backend=$backend)
  [ $backend = ray ] && extra+=(--override rollout.gpus_per_replica=0.4)
  timeout 200 python bench/async_gpu_check.py --steps 3 "${extra[@]}" --json $OUT/check_$backend.json \
    > $OUT/check_$backend.log 2>&1; echo "check $backend rc=$?"
  grep -E '"(s_per_step|staleness_max|vs_sync_learning_keys_equal|weights_pushed_every_step)"' $OUT/check_$backend.log
done
# speed: the TRL-shaped workload, sync vs async K=1 (local threads, child process, Ray actor)
for spec in "local:sync,async:1:" "process:async:1:" "ray:async:1:rollout.gpus_per_replica=0.4"; do
  backend=${spec%%:*}; rest=${spec#*:}; more=${rest##*:}; modes=${rest%:*}
  args=(--workload trl --steps 10 --modes $modes --heldout 0 --override cluster.backend=$backend)
  [ -n "$more" ] && args+=(--override $more)
  timeout 240 python bench/async_grpo.py "${args[@]}" --json $OUT/trl_$backend.json > $OUT/trl_$backend.log 2>&1
  echo "trl $backend rc=$?"
  python3 -c "
import json,sys
for r in json.load(open('$OUT/trl_$backend.json')): print('$backend', r['mode'], 's/step %.2f gen %.2f train %.2f wait %.2f' % (r['s_per_step'], r['generate_s'], r['train_s'], r['wait_s']))
" 2>/dev/null || tail -5 $OUT/trl_$backend.log
done
