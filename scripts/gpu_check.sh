#!/usr/bin/env bash
# The CUDA path in one command, <= 8 minutes on one H200 with only requirements.txt installed and no
# internet:
#   1. clip, lit and 3t for 40 steps each in bf16 on small towers (vit-tiny + tiny text, 32 px);
#   2. 3t again, killed at step 22 and restarted by torchrun (--max-restarts 1), which resumes from the
#      step-20 checkpoint: its final weights against the straight run's, beside the difference between
#      two straight runs (bf16 kernels need not be bitwise repeatable on a GPU);
#   3. eval.py on the 3t checkpoint;
#   4. the ViT-B/16 + base text 3t step (bench.py --gpu-step) at two batch sizes, without and with
#      --grad-checkpointing: samples/s, bf16 MFU, peak memory.
# Then one compact table. Without a CUDA device it says so and exits 0 without running anything.
#
#     bash scripts/gpu_check.sh            # figures under $OUT/gpu_check (or a temporary folder)
#
# GPU_CHECK_ON_CPU=1 runs steps 1-3 on the CPU with tiny towers in fp32 instead (tests/test_gpu_check.py: the
# script's own plumbing, and a resume that must be bitwise there).
#
# One GPU runs one rank, so NCCL between ranks is not exercised here (NCCL refuses two ranks on one
# GPU); the 2-process gloo tests cover the collectives' arithmetic.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch" || { echo "gpu_check: $PY cannot import torch; pip install -r requirements.txt"; exit 1; }
ON_CPU=${GPU_CHECK_ON_CPU:-0}
if [ "$ON_CPU" != 1 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device present; nothing was run"
  exit 0
fi
export PYTHONUNBUFFERED=1
RES=${OUT:-$(mktemp -d)}/gpu_check
WORK=$(mktemp -d)
mkdir -p "$RES"
STEPS=40
SMALL=(--image-arch vit-tiny --image-size 32 --text-arch tiny --batch-size 256 --train-samples 20000
       --tower3-steps 100 --eval-images 500 --precision bf16)
if [ "$ON_CPU" = 1 ]; then
  STEPS=16
  SMALL=(--image-arch vit-micro --image-size 16 --text-arch micro --batch-size 16 --train-samples 400
         --tower3-steps 10 --tower3-batch-size 16 --eval-images 20 --precision fp32)
fi
SMALL+=(--steps $STEPS --save-every $((STEPS / 4)) --log-every $((STEPS / 4)) --quiet --cache-dir "$WORK/cache")
train() {   # train NAME ARGS...: one torchrun process; wall time into $RES/NAME.wall
  local name=$1; shift
  local start=$SECONDS
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$@" > "$RES/$name.log" 2>&1 \
    || { echo "gpu_check: $name failed, see $RES/$name.log"; tail -20 "$RES/$name.log"; exit 1; }
  echo $((SECONDS - start)) > "$RES/$name.wall"
  echo "gpu_check: $name done in $((SECONDS - start)) s"
}

for mode in clip lit 3t; do
  train "$mode" train.py --mode "$mode" "${SMALL[@]}" --out "$WORK/$mode"
done
train 3t-again train.py --mode 3t "${SMALL[@]}" --out "$WORK/3t-again"
ELASTIC_TEST_FAIL_AT=$((STEPS / 2 + 2)) train 3t-resumed --max-restarts 1 tests/elastic_entry.py --mode 3t "${SMALL[@]}" \
  --out "$WORK/3t-resumed"
start=$SECONDS
"$PY" eval.py --checkpoint "$WORK/3t/ckpt.pt" --tasks zeroshot,retrieval --num-images $((STEPS * 25)) --out "$RES/eval.json" > "$RES/eval.log" 2>&1 \
  || { echo "gpu_check: eval.py failed, see $RES/eval.log"; tail -20 "$RES/eval.log"; exit 1; }
echo $((SECONDS - start)) > "$RES/eval.wall"
if [ "$ON_CPU" != 1 ]; then
  "$PY" scripts/bench.py --gpu-step 128 256 --out "$RES/gpu_step.json" > "$RES/gpu_step.log" 2>&1 \
    || { echo "gpu_check: bench.py --gpu-step failed, see $RES/gpu_step.log"; tail -20 "$RES/gpu_step.log"; exit 1; }
fi

"$PY" - "$WORK" "$RES" <<'EOF'
import json, os, sys
import torch
work, res = sys.argv[1:]
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (GPU_CHECK_ON_CPU)"
print(f"\n## gpu_check on {device} (torch {torch.__version__})\n")
print("run | wall s | steps | last loss | samples/s | I->T R@1 (held-out shapes)")
print("--- | --- | --- | --- | --- | ---")
for name in ("clip", "lit", "3t", "3t-again", "3t-resumed"):
    with open(os.path.join(work, name, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "loss" in r]
    evals = [r["eval"] for r in records if "eval" in r]
    r_at_1 = evals[-1].get("retrieval/i2t/R@1", float("nan")) if evals else float("nan")
    wall = open(os.path.join(res, f"{name}.wall")).read().strip()
    print(f"{name} | {wall} | {train[-1]['step']} | {train[-1]['loss']:.3f} | {train[-1]['samples_per_s']:.0f} | {r_at_1:.1f}")
load = lambda name: torch.load(os.path.join(work, name, "ckpt.pt"), weights_only=True)["model"]
straight, again, resumed = load("3t"), load("3t-again"), load("3t-resumed")
diff = lambda a, b: max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print(f"\nresume: max |weight| difference resumed vs straight {diff(straight, resumed):.3g}; "
      f"straight vs straight {diff(straight, again):.3g} (0 = bitwise)")
with open(os.path.join(res, "eval.json")) as f:
    records = json.load(f)
shown = [r for r in records if r["metric"] in ("top1", "R@1") and r["embeddings"] in ("main", "tower3")]
print(f"eval.py on 3t ({open(os.path.join(res, 'eval.wall')).read().strip()} s): "
      + ", ".join(f"{r['embeddings']} {r['task']}/{r['metric']} {r['value']:.1f}" for r in shown))
if not os.path.exists(os.path.join(res, "gpu_step.json")):
    sys.exit(0)
with open(os.path.join(res, "gpu_step.json")) as f:
    rows = json.load(f)
print("\nViT-B/16 + base text, 3t, cached h, bf16 | batch | checkpointing | step ms | samples/s | MFU (measured "
      "matmul peak) | MFU (datasheet) | peak GiB")
print("--- | --- | --- | --- | --- | --- | --- | ---")
for r in rows:
    print(f" | {r['batch']} | {r['checkpointing']} | {r['step_ms']:.0f} | {r['samples_per_s']:.0f} | "
          f"{100 * r['mfu_measured_peak']:.1f} % of {r['matmul_peak_tflops']:.0f} TF | "
          f"{100 * r['mfu_datasheet_peak']:.1f} % | {r['peak_mem_gib']:.1f}")
EOF
