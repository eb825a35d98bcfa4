#!/usr/bin/env bash
# The CUDA path in one command, sized to finish within 6 minutes on one H200 once requirements.txt is
# installed, no internet needed (the 3t stages' third tower is pretrained here, once):
#   1. clip, lit and 3t for 40 steps each in bf16 on small towers (vit-tiny + tiny text, 32 px);
#   2. 3t again, killed at step 22 and restarted by torchrun (--max-restarts 1), which resumes from the
#      step-20 checkpoint: its final weights against the straight run's, beside the difference between
#      two straight runs (bf16 kernels need not be bitwise repeatable on a GPU);
#   3. eval.py on the 3t checkpoint;
#   4. the distributed path on one GPU (scripts/gpu_dist_check.py): a 1-rank NCCL group, the model in DDP,
#      the loss through the autograd gather; PASS/FAIL for its loss and gradients against the plain step's,
#      and for steps that are not sync steps under torch.cuda.set_sync_debug_mode("error");
#   5. the ViT-B/16 + base text 3t step (bench.py --gpu-step) at two batch sizes, without and with
#      --grad-checkpointing: samples/s, bf16 MFU, peak memory.
# Then one compact table, printed last. Every log, the runs' metrics and the table are packed into
# $OUT/gpu_check.tar.gz after each stage (so a run cut short still leaves its record), the table also into
# $OUT/gpu_check.md. Without a CUDA device it says so and exits 0 without running anything. Exit status 1
# when a stage fails or a check says FAIL.
#
#     bash scripts/gpu_check.sh            # into $OUT (or a temporary folder it names)
#
# Where $PYTHON (default python3) cannot import torch, it first runs pip install -r requirements.txt.
#
# GPU_CHECK_ON_CPU=1 runs steps 1-4 on the CPU with tiny towers in fp32 instead, step 4 on gloo
# (tests/test_gpu_check.py: the script's own plumbing, and a resume that must be bitwise there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then     # a bare machine: requirements.txt first, only then
  echo "gpu_check: $PY cannot import torch; pip install -r requirements.txt"
  "$PY" -m pip install -q -r requirements.txt && "$PY" -c "import torch" \
    || { echo "gpu_check: the install failed; install requirements.txt and run again"; exit 1; }
  echo "gpu_check: installed requirements.txt in $SECONDS s"
  SECONDS=0                                      # the check's own time, in the table, starts now
fi
ON_CPU=${GPU_CHECK_ON_CPU:-0}
if [ "$ON_CPU" != 1 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device present; nothing was run"
  exit 0
fi
export PYTHONUNBUFFERED=1
BASE=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)
RES=$WORK/gpu_check       # logs; runs under $WORK/runs, the third tower and its cache under $WORK/cache
mkdir -p "$BASE" "$RES" "$WORK/runs" "$WORK/cache"
pack() {   # everything but weights and caches, into one archive (replaced whole, never half-written)
  { tar -czf "$BASE/gpu_check.tar.gz.tmp" --exclude='*.pt' --exclude='*.bin' --exclude='*.lock' --exclude='*.tmp' \
      -C "$WORK" gpu_check runs cache && mv "$BASE/gpu_check.tar.gz.tmp" "$BASE/gpu_check.tar.gz"; } \
    || echo "gpu_check: could not pack the logs into $BASE/gpu_check.tar.gz"
}
trap 'pack; rm -rf "$WORK"' EXIT
FAILED=0
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
    || { echo "gpu_check: $name failed, see $name.log in $BASE/gpu_check.tar.gz"; tail -20 "$RES/$name.log"; exit 1; }
  echo $((SECONDS - start)) > "$RES/$name.wall"
  echo "gpu_check: $name done in $((SECONDS - start)) s"
  pack
}

for mode in clip lit 3t; do
  train "$mode" train.py --mode "$mode" "${SMALL[@]}" --out "$WORK/runs/$mode"
done
train 3t-again train.py --mode 3t "${SMALL[@]}" --out "$WORK/runs/3t-again"
ELASTIC_TEST_FAIL_AT=$((STEPS / 2 + 2)) train 3t-resumed --max-restarts 1 tests/elastic_entry.py --mode 3t "${SMALL[@]}" \
  --out "$WORK/runs/3t-resumed"
stage() {   # stage NAME COMMAND...: a python stage whose failure is reported in the table, not fatal
  local name=$1; shift
  local start=$SECONDS
  "$PY" "$@" > "$RES/$name.log" 2>&1 \
    || { FAILED=1; echo "gpu_check: $name failed, see $name.log in $BASE/gpu_check.tar.gz"; tail -20 "$RES/$name.log"; }
  echo $((SECONDS - start)) > "$RES/$name.wall"
  echo "gpu_check: $name done in $((SECONDS - start)) s"
  pack
}
stage eval eval.py --checkpoint "$WORK/runs/3t/ckpt.pt" --tasks zeroshot,retrieval --num-images $((STEPS * 25)) \
  --out "$RES/eval.json"
stage dist scripts/gpu_dist_check.py --result "$RES/dist.json" --mode 3t "${SMALL[@]}"
if [ "$ON_CPU" != 1 ]; then
  stage gpu_step scripts/bench.py --gpu-step 128 256 --out "$RES/gpu_step.json"
fi

"$PY" - "$WORK/runs" "$RES" "$SECONDS" "$BASE" <<'EOF' | tee "$RES/summary.md"
import json, os, sys
import torch
work, res, total, base = sys.argv[1:]
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (GPU_CHECK_ON_CPU)"
print(f"\n## gpu_check on {device} (torch {torch.__version__}): {total} s before this table "
      f"(bound on an H200: 360 s); logs in {base}/gpu_check.tar.gz\n")
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
def result(name):
    path = os.path.join(res, f"{name}.json")
    if not os.path.exists(path):
        print(f"{name}: no result, see {name}.log in the archive")
        return None
    with open(path) as f:
        return json.load(f)
records = result("eval")
if records is not None:
    shown = [r for r in records if r["metric"] in ("top1", "R@1") and r["embeddings"] in ("main", "tower3")]
    print(f"eval.py on 3t ({open(os.path.join(res, 'eval.wall')).read().strip()} s): "
          + ", ".join(f"{r['embeddings']} {r['task']}/{r['metric']} {r['value']:.1f}" for r in shown))
dist = result("dist")
if dist is not None:
    print(f"\ndistributed path, 1-rank {dist['backend']} group ({open(os.path.join(res, 'dist.wall')).read().strip()} s) "
          "| result | detail\n--- | --- | ---")
    for r in dist["rows"]:
        calls = r.get("gather_calls", {})
        detail = (f"loss rel. diff {r['loss_rel_diff']:.2g}, grads max rel. diff {r['grad_rel_diff']:.2g} (tolerance "
                  f"{r['tolerance']:g}), gather fwd/bwd {calls.get('forward')}/{calls.get('backward')}"
                  if r["check"] == "parity" else f"steps {r['steps']}" + (f": {r['error']}" if r["error"] else ""))
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[r["ok"]]
        print(f"{r['check']} ({r['variant']}) | {verdict} | {detail}")
rows = result("gpu_step") if os.path.exists(os.path.join(res, "gpu_step.wall")) else None
if rows:
    print("\nViT-B/16 + base text, 3t, cached h, bf16 | batch | checkpointing | step ms | samples/s | MFU (measured "
          "matmul peak) | MFU (datasheet) | peak GiB")
    print("--- | --- | --- | --- | --- | --- | --- | ---")
    for r in rows:
        print(f" | {r['batch']} | {r['checkpointing']} | {r['step_ms']:.0f} | {r['samples_per_s']:.0f} | "
              f"{100 * r['mfu_measured_peak']:.1f} % of {r['matmul_peak_tflops']:.0f} TF | "
              f"{100 * r['mfu_datasheet_peak']:.1f} % | {r['peak_mem_gib']:.1f}")
EOF
cp "$RES/summary.md" "$BASE/gpu_check.md"
exit $FAILED
