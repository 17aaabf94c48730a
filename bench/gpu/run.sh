#!/usr/bin/env bash
# Issue 6's GPU benchmark on the lent NVIDIA machine (H100 or H200), in two `device` calls that fit a
# session's 15 minutes of device time (the first call also pays the machine's start):
#   here:    bash bench/gpu/make-carry.sh
#   device:  carry [".carry"], timeout_s 420, command: bash bench/gpu/run.sh core
#            then, while the machine is still warm (it goes back 30 s after a call):
#            carry [".carry"], timeout_s 330, command: bash bench/gpu/run.sh extra
# core (timeouts sum to 385 s): the adapter; the webgpu smoke test (params, FLOPs, loss against cpu);
#   fp32 matmul, tfjs's kernel and each of ours, against PyTorch's (TF32 off); our training step on
#   webgpu for the four workloads, through tfjs and replayed (matmuls tuned per shape,
#   CONCEPTMOE_MATMUL=auto); the same models in PyTorch eager (bench/peers/torch_lm.py); the
#   clipping norm's sum of squares whole and in chunks (bench/gpu/sum-squares.ts); the ratios.
# extra (timeouts sum to 310 s): per-op host and GPU costs; a CPU profile of tfjs's matMul path;
#   the 4096 matmul sweep with Dawn's robustness checks off; the dense steps with tfjs's matmul only
#   (what tuning gained), with each replay in one command buffer, and with robustness checks off.
# Each phase leaves at most 8 files in $OUT (what the device tool brings back) and prints its
# ratios last. `all` runs both (timeouts sum to 695 s, more than one call allows, and leaves more than 8 files).
set -uo pipefail
out=${OUT:-$(mktemp -d)}
phase=${1:-core}
steps=${2:-10}
case "$phase" in core | extra | all) ;; *) echo "usage: bash bench/gpu/run.sh [core|extra|all] [timed steps]" >&2; exit 2 ;; esac
# (a second call on the warm machine finds the loaders and Node from the first)
if [ ! -x /tmp/n/node ]; then
  for f in .carry/*.deb; do dpkg -x "$f" /; done
  ldconfig
  mkdir -p /tmp/n && xz -dc .carry/node.xz > /tmp/n/node.part && chmod +x /tmp/n/node.part && mv /tmp/n/node.part /tmp/n/node
fi
[ -d node_modules/@tensorflow/tfjs-backend-webgpu ] || tar -xJf .carry/nm.tar.xz -C .
export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
export __EGL_VENDOR_LIBRARY_FILENAMES=${__EGL_VENDOR_LIBRARY_FILENAMES:-/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json}
node=/tmp/n/node
# Dawn prints two warnings about dynamic buffer limits on every start (line-buffered: what a
# timeout cuts off is only what had not been printed)
quiet() { grep --line-buffered -v "maxDynamic"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
dense=dense-2L-d128,dense-4L-d512

core() {
  echo "== smoke"
  OUT=$out timeout -k 5 40 $node bench/gpu/smoke.ts 2>&1 | quiet
  echo "== fp32 matmul: ours (webgpu) and PyTorch (TF32 off)"
  timeout -k 5 60 $node bench/gpu/matmul.ts 4096,2048,1024 2>&1 | quiet | tee "$out/matmul-ours.jsonl"
  timeout -k 5 30 python3 bench/peers/torch_matmul.py cuda 4096,2048,1024 2>&1 | tee "$out/matmul-torch.jsonl"
  echo "== ours (webgpu)"
  timeout -k 5 180 $node bench/gpu/train-step.ts webgpu "" "$steps" 2>&1 | quiet | tee "$out/ours.jsonl"
  echo "== PyTorch eager"
  PYTHONUNBUFFERED=1 timeout -k 5 60 python3 bench/peers/torch_lm.py cuda 2>&1 | tee "$out/torch.jsonl"
  echo "== the clipping norm's sum of squares: one workgroup per gradient, and in chunks"
  timeout -k 5 15 $node bench/gpu/sum-squares.ts 2>&1 | quiet
  echo "== ratios: matmul (ofTorch, target >= 0.8), then steps (ratio, targets <= 4 for 2L-d128, <= 2 for 4L-d512)"
  $node bench/gpu/ratio.ts "$out/matmul-ours.jsonl" "$out/matmul-torch.jsonl" > "$out/ratios-matmul.json"
  $node bench/gpu/ratio.ts "$out/ours.jsonl" "$out/torch.jsonl" | tee "$out/ratios.json"
  $node bench/gpu/ratio.ts --brief "$out/matmul-ours.jsonl" "$out/matmul-torch.jsonl"
  $node bench/gpu/ratio.ts --brief "$out/ours.jsonl" "$out/torch.jsonl"
}

extra() {
  echo "== per-op costs (host issue, total, GPU kernel time)"
  timeout -k 5 25 $node bench/gpu/ops.ts 128 2>&1 | quiet | tee "$out/ops.jsonl"
  echo "== where tfjs's matMul spends host time (CPU profile of 2,000 chained 128x128 products)"
  CONCEPTMOE_MATMUL=tfjs timeout -k 5 20 $node bench/gpu/host-profile.ts 128 2000 2>&1 | quiet | tee "$out/host-profile.jsonl"
  echo "== fp32 matmul 4096, Dawn's robustness checks off"
  DAWN_FLAGS=enable-dawn-features=disable_robustness timeout -k 5 45 $node bench/gpu/matmul.ts 4096 2>&1 | quiet | tee "$out/matmul-no-robustness.jsonl"
  timeout -k 5 20 python3 bench/peers/torch_matmul.py cuda 4096 2>&1 | tee "$out/matmul-torch.jsonl"
  PYTHONUNBUFFERED=1 timeout -k 5 30 python3 bench/peers/torch_lm.py cuda $dense 2>&1 | tee "$out/torch.jsonl"
  : > "$out/variants.jsonl"
  echo "== ours, dense, tfjs's matmul kernel only"
  BENCH_LABEL=tfjs-matmul CONCEPTMOE_MATMUL=tfjs timeout -k 5 60 $node bench/gpu/train-step.ts webgpu $dense "$steps" 2>&1 | quiet | tee -a "$out/variants.jsonl"
  echo "== ours, dense, each replay in one command buffer (CONCEPTMOE_SUBMIT_EVERY=0; the default submits every 128 dispatches)"
  BENCH_LABEL=one-submit CONCEPTMOE_SUBMIT_EVERY=0 timeout -k 5 50 $node bench/gpu/train-step.ts webgpu $dense "$steps" 2>&1 | quiet | tee -a "$out/variants.jsonl"
  echo "== ours, dense, Dawn's robustness checks off"
  BENCH_LABEL=no-robustness DAWN_FLAGS=enable-dawn-features=disable_robustness timeout -k 5 60 $node bench/gpu/train-step.ts webgpu $dense "$steps" 2>&1 | quiet | tee -a "$out/variants.jsonl"
  echo "== ratios of the variants"
  $node bench/gpu/ratio.ts "$out/variants.jsonl" "$out/torch.jsonl" > "$out/ratios-variants.json"
  $node bench/gpu/ratio.ts --brief "$out/matmul-no-robustness.jsonl" "$out/matmul-torch.jsonl" 2>/dev/null
  $node bench/gpu/ratio.ts --brief "$out/variants.jsonl" "$out/torch.jsonl"
}

case "$phase" in
  core) core 2>&1 | tee "$out/log-core.txt" ;;
  extra) extra 2>&1 | tee "$out/log-extra.txt" ;;
  all) { core; extra; } 2>&1 | tee "$out/log-all.txt" ;;
esac
# the plot needs vega, which the carry leaves out: here, node bench/gpu/plot.ts <files>/ours.jsonl <files>/torch.jsonl out.svg
