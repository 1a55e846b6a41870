#!/usr/bin/env bash
# The same benchmark on two trees of this repository in one call on the GPU machine: the working tree ("new") and
# an older commit unpacked into .oldtree/ ("old"), so a refactor's figures are compared side by side on one card.
#
# Here, once:   echo /.oldtree/ >> .git/info/exclude; mkdir -p .oldtree; git archive REV | tar x -C .oldtree
# There (carry .devbundle and .oldtree):
#   source .devbundle/activate.sh; bash bench/compare_trees.sh gpu|engine|served
#     gpu     pytest -m gpu on the new tree
#     engine  bench.engine_throughput (20b shapes, random MXFP4, batch 1 / 64 / 256), old then new, ROUNDS times
#     served  bench.served_vs_engine, the W2 burst (1,000 requests), old then new
#     widened the new tree alone: the widened path's GPU tests; one layer at 2,048 and 8,192 tokens with the fused
#             kernels, widened each call (GPTOSS_MOE_WIDEN_PER_EXPERT=128), and with a bf16 copy of the experts
#             (bf16_expert_copy, also at 512); the engine's prefill at 8,192-token steps (STEP=2048: 2,048) packed,
#             then with the copy (~9 minutes)
#     w2      the new tree alone: the W2 burst (bench.served_vs_engine, max_num_seqs 512) without, then with the
#             bf16 copy of the experts (~6 minutes); w2-8k the same with 8,192-token steps
#     reads   the new tree alone: the prefetch GPU tests, the weight-read patterns (bench.weight_stream), the MoE
#             layer with and without L2 prefetches of its weight rows (bench.moe_kernel --prefetch, 1-256 tokens);
#             ~9 minutes
#     reads-engine  the dense projections' kernel with its tile prefetched (bench.small_linear --sweep), and the
#             engine's decode at batch 1 / 64 / 256 with the picked presets, then their *_prefetch twins, then
#             also the projections through small_linear (GPTOSS_KERNEL_OPS=small_linear); ~7 minutes
#     reads-120b  gpt-oss-120b's decode at batch 1 / 16 / 64, the picked kernels then the prefetching ones with
#             small_linear (~5 minutes)
# Each tree's folders are mapped under gptoss_serve.* by symlinks (nothing is pip-installed on that machine).
set -u
root=$PWD
map() {  # map TREE NSDIR
  rm -rf "$2"; mkdir -p "$2/gptoss_serve"
  for d in model cluster deployments kernels k8s bench; do ln -sfn "$1/$d" "$2/gptoss_serve/$d"; done
}
map "$root" /tmp/ns_new; map "$root/.oldtree" /tmp/ns_old
site=/tmp/site  # the bundle's Ray Serve
new() { (cd "$root" && PYTHONPATH=/tmp/ns_new:$site:$root "$@"); }
old() { (cd "$root/.oldtree" && PYTHONPATH=/tmp/ns_old:$site:$root/.oldtree "$@"); }
out=${OUT:-/tmp/compare-out}
mkdir -p "$out"
shapes() { new python3 -m gptoss_serve.model.synthetic --preset 20b --mxfp4 --config-only --out /tmp/c20 >/dev/null; }
case "${1:-}" in
gpu)
  new python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -25 ;;
engine)
  shapes
  for i in $(seq "${ROUNDS:-1}"); do
    for tree in old new; do
      echo "== $tree $i"
      $tree python3 -m gptoss_serve.bench.engine_throughput --model /tmp/c20 --load-format dummy \
        --json "$out/engine-$tree-$i.json" 2>&1 | tail -6
    done
  done ;;
served)
  shapes
  args=(--model /tmp/c20 --load-format dummy --device cuda --burst 1000 --prompt-lens 32 400 --output-lens 32 368
        --max-num-seqs 256 --max-model-len 1024 --num-cpus 16)
  for tree in old new; do
    echo "== $tree"
    $tree python3 -m gptoss_serve.bench.served_vs_engine "${args[@]}" --json "$out/served-$tree.json" 2>&1 | tail -12
  done ;;
widened)
  shapes
  new timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_mxfp4_moe_kernel.py \
    tests/test_packed_experts.py -k "widen or resident or bf16_copy or logits_agree" 2>&1 | tail -4
  for w in inf 128; do  # the fused kernels, then the experts widened each call
    echo "== GPTOSS_MOE_WIDEN_PER_EXPERT=$w"
    GPTOSS_MOE_WIDEN_PER_EXPERT=$w new timeout 100 python3 -m gptoss_serve.bench.moe_kernel --tokens 2048 8192 \
      --json "$out/moe-widen-$w.json" 2>&1 | grep -v "^ *kernels" | tail -3
  done
  echo "== bf16_expert_copy"
  new timeout 120 python3 -m gptoss_serve.bench.moe_kernel --bf16-expert-copy --tokens 512 2048 8192 \
    --json "$out/moe-copy.json" 2>&1 | grep -v "^ *kernels" | tail -4
  new timeout 230 python3 -m gptoss_serve.bench.engine_throughput --model /tmp/c20 --load-format dummy \
    --experts packed copy --batches 1 4 --prompt-len 8192 --output-len 4 --max-num-batched-tokens "${STEP:-8192}" \
    --json "$out/prefill-copy.json" 2>&1 | grep "engine \[\|loaded" ;;
w2|w2-8k)  # w2-8k: the same with 8,192-token steps (engine.max_num_batched_tokens)
  shapes
  step=$([ "$1" = w2-8k ] && echo 8192 || echo 2048)
  w2=(--model /tmp/c20 --load-format dummy --device cuda --burst 1000 --prompt-lens 32 400 --output-lens 32 368
      --max-model-len 1024 --num-cpus 16 --max-num-seqs 512 --max-num-batched-tokens "$step")
  for copy in "" --bf16-expert-copy; do
    echo "== W2, $step-token steps $copy"
    new python3 -m gptoss_serve.bench.served_vs_engine "${w2[@]}" $copy \
      --json "$out/w2-$step${copy:+-copy}.json" 2>&1 | tail -8
  done ;;
reads)
  shapes
  new timeout 210 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_weight_stream.py \
    tests/test_mxfp4_moe_kernel.py tests/test_small_linear.py \
    -k "prefetch or every_variant or down_kernels or asking_l2 or projections" 2>&1 | tail -8
  new timeout 130 python3 -m gptoss_serve.bench.weight_stream --json "$out/weight-stream.json" 2>&1 | tail -16
  new timeout 200 python3 -m gptoss_serve.bench.moe_kernel --tokens 1 4 64 256 --prefetch \
    --json "$out/moe-prefetch.json" 2>&1 | grep -v "^ *kernels" | tail -14 ;;
reads-engine)
  shapes
  new timeout 100 python3 -m gptoss_serve.bench.small_linear --rows 1 16 --sweep --json "$out/small-linear.json" 2>&1 \
    | tail -12
  twins=gemv_h2=gemv_h2_prefetch,decode=decode_prefetch,decode_wide=decode_wide_prefetch,medium=medium_prefetch
  for run in picked prefetch prefetch+small_linear; do  # the MoE presets' prefetching twins, then small_linear too
    presets=$([ "$run" = picked ] || echo "$twins")
    kernels=$([ "$run" = prefetch+small_linear ] && echo small_linear)
    echo "== $run: GPTOSS_MOE_PRESETS=$presets GPTOSS_KERNEL_OPS=$kernels"
    GPTOSS_MOE_PRESETS=$presets GPTOSS_KERNEL_OPS=$kernels new timeout 150 python3 -m \
      gptoss_serve.bench.engine_throughput --model /tmp/c20 --load-format dummy --batches 1 64 256 --output-len 64 \
      --json "$out/engine-$run.json" 2>&1 | grep "engine \["
  done ;;
reads-120b)
  new python3 -m gptoss_serve.model.synthetic --preset 120b --mxfp4 --config-only --out /tmp/c120 >/dev/null
  twins=gemv_h2=gemv_h2_prefetch,decode=decode_prefetch,decode_wide=decode_wide_prefetch,medium=medium_prefetch
  for run in picked prefetch+small_linear; do
    presets=$([ "$run" = picked ] || echo "$twins")
    kernels=$([ "$run" = prefetch+small_linear ] && echo small_linear)
    echo "== 120b $run"
    GPTOSS_MOE_PRESETS=$presets GPTOSS_KERNEL_OPS=$kernels new python3 -m gptoss_serve.bench.engine_throughput \
      --model /tmp/c120 --load-format dummy --batches 1 16 64 --output-len 64 --json "$out/engine-120b-$run.json" \
      2>&1 | tail -4
  done ;;
*) echo "usage: bash bench/compare_trees.sh gpu|engine|served|widened|w2|w2-8k|reads|reads-engine|reads-120b" >&2
   exit 2 ;;
esac
