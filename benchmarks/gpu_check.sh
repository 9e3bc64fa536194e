#!/usr/bin/env bash
# Issue 22's GPU measurements, prepared to run unattended on one lent GPU (an H200 here):
#   train  the sweep (GPU_PLAN, dit_jax/perf/plan.py: the compute switches, batch 256/32, cuBLASLt) with a
#          profile and time split of its fastest row, then the start-up of that row again in a fresh
#          process on the compilation cache the sweep left warm;   ~9 minutes (the sweep's --budget_s 480:
#          `python -m dit_jax.sweep --plan` prints its rows and estimate)
#   sample guided sampling, ours against PyTorch (bf16 autocast and float32+TF32) at per-device batch
#          64/128/256, 50 DDPM steps, cfg 1.5, the VAE decode included, with the sweep's winning
#          switches (read from OUT/sweep.json, or given as SWITCHES="--qkv=split ...");   ~4 minutes (an estimate: 3 cold compiles of the chain with
#          the VAE decode, and PyTorch's eager chains; SAMPLE_BATCHES=64 for a short lease)
# Usage: benchmarks/gpu_check.sh train|sample|all OUT   (the device tool: two calls, `train` then `sample`,
#        each as `... bash benchmarks/gpu_check.sh PART $OUT` after installing the carried wheels; see
#        docs/performance.md "The next GPU lease")
# TINY=1 runs the same commands on a tiny DiT (CPU-sized) to check the script itself.
set -uo pipefail
part=${1:?usage: benchmarks/gpu_check.sh train|sample|all OUT}
out=${2:?usage: benchmarks/gpu_check.sh train|sample|all OUT}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
cache=${COMPILATION_CACHE:-$out/../jax_cache}
mkdir -p "$cache"

if [ "${TINY:-0}" = 1 ]; then
  model=(--model DiT-S/8 --image_size 64)
  tiny=(--set model.name= --set model.hidden_size=64 --set model.depth=2 --set model.num_heads=2
        --set model.patch_size=2 --set model.input_size=8)
  sweep_extra=(--budget_s 200 --row_timeout_s 120 --steps 2 --warmup 1 --profile_steps 1)
  bench_tiny=(--model DiT-S/8 --image_size 64)
  sample=(--sample_batches "2,4" --sample_steps 2 --sample_repeats 1)
else
  model=(--model DiT-XL/2 --image_size 256)
  tiny=()
  sweep_extra=(--budget_s "${SWEEP_BUDGET_S:-480}")
  bench_tiny=(--model DiT-XL/2 --image_size 256)
  sample=(--sample_batches "${SAMPLE_BATCHES:-64,128,256}" --sample_steps 50 --sample_repeats 1)
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'

# The winning row's switches as benchmark flags (--qkv=split ...), read from the sweep's JSON.
best_flags() {
  "$py" - "$out/sweep.json" <<'EOF'
import json, sys
try:
    rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["status"] == "ok" and r["row"]["batch"] >= 128
            and not r["row"]["xla_flags"]]
except (OSError, KeyError, ValueError):
    rows = []
best = max(rows, key=lambda r: r["images_per_sec"])["row"] if rows else {"batch": 256, "set": {}}
print(" ".join(f"--{k}={v}" for k, v in best["set"].items() if "." not in k), f"--batch={best['batch']}")
EOF
}

if [ "$part" = train ] || [ "$part" = all ]; then
  echo "== sweep"
  "$py" -m dit_jax.sweep "${model[@]}" "${tiny[@]}" "${sweep_extra[@]}" --out "$out/sweep.json" \
      --profile_dir "$out/sweep_profile" --compilation_cache "$cache" 2>&1 | tee "$out/sweep.txt" | grep -v "^I[0-9]"
  # The profile's trace and module text, two folders down at most (what comes back from the device).
  trace=$(find "$out/sweep_profile" -name perfetto_trace.json.gz 2>/dev/null | head -n 1)
  if [ -n "$trace" ]; then
    mkdir -p "$out/profile" && cp "$trace" "$out/profile/" && cp "$out/sweep_profile/train_step.hlo.txt" "$out/profile/"
    gzip -f "$out/profile/train_step.hlo.txt"
    rm -rf "$out/sweep_profile"
  fi
  read -r -a best <<<"$(best_flags)"
  echo "== start-up of the best row (${best[*]}) on the warm compilation cache"
  if [ "${TINY:-0}" = 1 ]; then best=(--batch=2); fi
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 "$py" -m dit_jax.benchmark "${bench_tiny[@]}" --dtype bfloat16 "${best[@]}" --steps 3 --warmup 1 --sample_steps 0 \
      --compilation_cache "$cache" --json >"$out/startup_warm.json" 2>"$out/startup_warm.log"
  "$py" -c 'import json,sys; t=json.load(open(sys.argv[1]))["train"]; print(json.dumps({k: t.get(k) for k in ("step_seconds_median","images_per_sec","mfu","startup","compilation_cache","flops")}))' \
      "$out/startup_warm.json" || tail -n 5 "$out/startup_warm.log"
fi

if [ "$part" = sample ] || [ "$part" = all ]; then
  # SWITCHES="--qkv=split ..." names them (a new call's $OUT no longer holds the sweep's JSON).
  if [ -n "${SWITCHES:-}" ]; then
    read -r -a switches <<<"$SWITCHES"
  else
    read -r -a best <<<"$(best_flags)"
    switches=("${best[@]:0:${#best[@]}-1}")  # without --batch
  fi
  if [ "${TINY:-0}" = 1 ]; then switches=(); fi
  echo "== sampling side by side (${switches[*]})"
  # PyTorch runs first in this process and frees its memory; JAX allocates as it goes.
  XLA_PYTHON_CLIENT_PREALLOCATE=false "$py" -m dit_jax.benchmark "${bench_tiny[@]}" --dtype bfloat16 "${switches[@]}" \
      --sample_torch "${sample[@]}" --cfg_scale 1.5 --compilation_cache "$cache" 2>&1 | tee "$out/sample.txt" \
      | grep -v "^[IW][0-9]"
fi
