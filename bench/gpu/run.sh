#!/usr/bin/env bash
# Issue 6's GPU benchmark in one `device` call: unpacks the carry (bench/gpu/make-carry.sh), then runs
# the webgpu smoke test (params, FLOPs, loss against cpu), per-op host and GPU costs, fp32 matmul
# (tfjs's kernel and each of ours) against PyTorch's, our training step on webgpu for the four
# workloads (through tfjs and replayed; matmuls tuned per shape, CONCEPTMOE_MATMUL=auto), the same
# models in PyTorch eager (bench/peers/torch_lm.py), the ratios, and the dense steps again with
# tfjs's matmul only (what tuning gained), each replay as one command buffer, and with Dawn's
# robustness checks off.
#   here:   bash bench/gpu/make-carry.sh
#   device: carry [".carry"], timeout_s 600, command: bash bench/gpu/run.sh [steps]   (the timeouts below sum to 590 s)
# Results land in $OUT (smoke.json, ops.jsonl, matmul-*.jsonl, ours*.jsonl, torch.jsonl, ratios*.json) when OUT is set.
set -uo pipefail
out=${OUT:-$(mktemp -d)}
steps=${1:-10}
for f in .carry/*.deb; do dpkg -x "$f" /; done
ldconfig
mkdir -p /tmp/n && xz -dc .carry/node.xz > /tmp/n/node && chmod +x /tmp/n/node
tar -xJf .carry/nm.tar.xz -C .
export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
export __EGL_VENDOR_LIBRARY_FILENAMES=${__EGL_VENDOR_LIBRARY_FILENAMES:-/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
echo "== smoke"
OUT=$out timeout 45 /tmp/n/node bench/gpu/smoke.ts 2>&1 | grep -v "maxDynamic"
echo "== per-op costs (host issue, total, GPU kernel time)"
timeout 25 /tmp/n/node bench/gpu/ops.ts 128 2>&1 | grep -v "maxDynamic" | tee "$out/ops.jsonl"
echo "== where tfjs's matMul spends host time (CPU profile of 2,000 chained 128x128 products)"
CONCEPTMOE_MATMUL=tfjs timeout 20 /tmp/n/node bench/gpu/host-profile.ts 128 2000 2>&1 | grep -v "maxDynamic" | tee "$out/host-profile.jsonl"
echo "== fp32 matmul: ours (webgpu) and PyTorch (TF32 off)"
timeout 60 /tmp/n/node bench/gpu/matmul.ts 1024,2048,4096 2>&1 | grep -v "maxDynamic" | tee "$out/matmul-ours.jsonl"
timeout 30 python3 bench/peers/torch_matmul.py cuda 1024,2048,4096 2>&1 | tee "$out/matmul-torch.jsonl"
/tmp/n/node bench/gpu/ratio.ts "$out/matmul-ours.jsonl" "$out/matmul-torch.jsonl"
echo "== ours (webgpu)"
timeout 180 /tmp/n/node bench/gpu/train-step.ts webgpu "" "$steps" 2>&1 | grep -v "maxDynamic" | tee "$out/ours.jsonl"
echo "== PyTorch eager"
PYTHONUNBUFFERED=1 timeout 60 python3 bench/peers/torch_lm.py cuda 2>&1 | tee "$out/torch.jsonl"
echo "== ratios"
/tmp/n/node bench/gpu/ratio.ts "$out/ours.jsonl" "$out/torch.jsonl" | tee "$out/ratios.json"
dense=dense-2L-d128,dense-4L-d512
echo "== ours, dense, tfjs's matmul kernel only"
CONCEPTMOE_MATMUL=tfjs timeout 60 /tmp/n/node bench/gpu/train-step.ts webgpu $dense "$steps" 2>&1 | grep -v "maxDynamic" | tee "$out/ours-tfjs-matmul.jsonl"
/tmp/n/node bench/gpu/ratio.ts "$out/ours-tfjs-matmul.jsonl" "$out/torch.jsonl" | tee "$out/ratios-tfjs-matmul.json"
echo "== ours, dense, each replay in one command buffer (CONCEPTMOE_SUBMIT_EVERY=0; the default submits every 128 dispatches)"
CONCEPTMOE_SUBMIT_EVERY=0 timeout 50 /tmp/n/node bench/gpu/train-step.ts webgpu $dense "$steps" 2>&1 | grep -v "maxDynamic" | tee "$out/ours-one-submit.jsonl"
/tmp/n/node bench/gpu/ratio.ts "$out/ours-one-submit.jsonl" "$out/torch.jsonl" | tee "$out/ratios-one-submit.json"
echo "== ours, dense, Dawn's robustness checks off"
DAWN_FLAGS=enable-dawn-features=disable_robustness timeout 60 /tmp/n/node bench/gpu/train-step.ts webgpu $dense "$steps" 2>&1 | grep -v "maxDynamic" | tee "$out/ours-no-robustness.jsonl"
/tmp/n/node bench/gpu/ratio.ts "$out/ours-no-robustness.jsonl" "$out/torch.jsonl" | tee "$out/ratios-no-robustness.json"
# the plot needs vega, which the carry leaves out: here, node bench/gpu/plot.ts <files>/ours.jsonl <files>/torch.jsonl out.svg
