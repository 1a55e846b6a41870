#!/usr/bin/env bash
# Starts the app on one GPU with a checkpoint, runs a load-test sweep against it, stops everything.
#   bench/serve_sweep.sh MODEL_DIR OUT_DIR [concurrencies] [input_len] [output_len] [extra app args...]
set -euo pipefail
model=$1 out=$2 conc=${3:-1,8,32,64,128} input_len=${4:-1000} output_len=${5:-200}
shift $(( $# < 5 ? $# : 5 ))
mkdir -p "$out"
# the ray and serve commands, also where only the Python package is on the path
command -v ray >/dev/null || ray() { python -m ray.scripts.scripts "$@"; }
command -v serve >/dev/null || serve() { python -m ray.serve.scripts "$@"; }
ray start --head --metrics-export-port=8080 --disable-usage-stats >"$out/ray.log" 2>&1
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
serve run gptoss_serve.deployments.builder:build_app model="$model" num_gpus_per_replica=1 "$@" >"$out/serve.log" 2>&1 &
for _ in $(seq 1 300); do curl -sf 127.0.0.1:8000/health >/dev/null && break; sleep 1; done
curl -sf 127.0.0.1:8000/health >/dev/null || { tail -30 "$out/serve.log"; exit 1; }
python -m gptoss_serve.bench.loadtest --url http://127.0.0.1:8000 --endpoint completions --sweep --concurrencies "$conc" \
    --duration 30 --grace-period 20 --input-len "$input_len" --output-len "$output_len" --label ours-h100 \
    --result-json "$out/sweep.json" --plot "$out/sweep.png" --no-progress
curl -s 127.0.0.1:8080/metrics | grep -E '^ray_gptoss_(generation|prompt)_tokens_total' > "$out/metrics.txt" || true
