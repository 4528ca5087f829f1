#!/usr/bin/env bash
# The GPU acceptance checks in one command, for a lent GPU machine (../shared/device/README.md):
#   here:   bash ../shared/device/prepare.sh optuna gguf mlflow psycopg2-binary
#   device: run(command="bash .gpu/gpu-run.sh bash bench/gpu_checks.sh", carry=[".gpu"], timeout_s=540)
# Twins are generated there (nothing multi-GB is sent). Results land in $OUT (or ./gpu-results).
set -uo pipefail
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT" /tmp/twins
PY="${PYTHON:-python}"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

log "twins"
$PY -m tuner synth --like qwen3-8b --quant q4_k_m /tmp/twins/qwen3-8b-q4_k_m.gguf
$PY -m tuner synth --like mistral-small-24b --quant q2_k /tmp/twins/mistral-small-24b-q2_k.gguf

log "issue 2: bench on the Qwen3-8B twin, full (37) and half (19) offload"
$PY -m tuner bench /tmp/twins/qwen3-8b-q4_k_m.gguf -ngl 37,19 -fa 1 -c 4096 -t 16 -r 3 --json > "$OUT/qwen3-bench.json"
$PY -m tuner bench /tmp/twins/qwen3-8b-q4_k_m.gguf -ngl 37,19 -fa 1 -c 4096 -t 16 -r 3 | tee -a "$OUT/summary.txt"

log "issue 5: gpu-marked tests (real NVML)"
$PY -m pytest -q -m gpu tests 2>&1 | tail -5 | tee -a "$OUT/summary.txt"

log "issue 5: memory plan vs measurement, Mistral twin, 12 GiB budget"
$PY -m tuner inspect /tmp/twins/mistral-small-24b-q2_k.gguf --plan --vram-budget 12GiB --ctx 16384 | tee -a "$OUT/summary.txt"

log "issue 5: study on the Mistral twin within 12 GiB (baseline: the reference user's flags)"
timeout 300 $PY -m tuner tune /tmp/twins/mistral-small-24b-q2_k.gguf --study mistral-12g --trials 12 \
    --vram-budget 12GiB --min-ctx 16384 --storage "sqlite:///$OUT/studies.db" --no-mlflow \
    --baseline "llama-server --ctx-size 2048 --batch-size 512 --n-gpu-layers 49 --threads 8 --parallel 1" \
    --trial-timeout 3m 2>&1 | tail -40 | tee -a "$OUT/summary.txt"
$PY -m tuner report mistral-12g --storage "sqlite:///$OUT/studies.db" > "$OUT/mistral-report.txt" 2>&1

log "issue 5: prediction error of the memory model over that study"
$PY - <<'EOF' | tee -a "$OUT/summary.txt"
import statistics, optuna
from tuner.records import result_of, measured_trials
study = optuna.load_study(study_name="mistral-12g", storage="sqlite:///" + __import__("os").environ.get("OUT", "gpu-results") + "/studies.db")
errs = []
for t in measured_trials(study.trials):
    r = result_of(t)
    if r.ok and r.peak_memory_bytes and r.predicted_peak_bytes:
        errs.append(100 * abs(r.predicted_peak_bytes - r.peak_memory_bytes) / r.peak_memory_bytes)
print(f"memory model error over {len(errs)} trials: median {statistics.median(errs):.1f}%, max {max(errs):.1f}%" if errs else "no data")
EOF

log "issue 5: Qwen3-8B twin, all layers: tg, pp and share of peak bandwidth"
$PY -m tuner tune /tmp/twins/qwen3-8b-q4_k_m.gguf --study qwen3 --trials 4 --set n_gpu_layers=37 \
    --storage "sqlite:///$OUT/studies.db" --no-mlflow --no-confirm 2>&1 | tail -15 | tee -a "$OUT/summary.txt"
$PY -m tuner compare qwen3 mistral-12g --storage "sqlite:///$OUT/studies.db" | tee -a "$OUT/summary.txt"
