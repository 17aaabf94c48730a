#!/usr/bin/env bash
# Issue 6's GPU benchmark in one `device` call: unpacks the carry (bench/gpu/make-carry.sh), then runs
# the webgpu smoke test (params, FLOPs, loss against cpu), per-op host and GPU costs, fp32 matmul
# (tfjs's kernel and our tile shapes) against PyTorch's, our training step on webgpu for the four
# workloads (through tfjs and replayed), the same models in PyTorch eager (bench/peers/torch_lm.py),
# the ratios, and the dense steps again with our fastest matmul if it beats tfjs's.
#   here:   bash bench/gpu/make-carry.sh
#   device: carry [".carry"], timeout_s 600, command: bash bench/gpu/run.sh [steps]   (the timeouts below sum to 560 s)
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
OUT=$out timeout 60 /tmp/n/node bench/gpu/smoke.ts 2>&1 | grep -v "maxDynamic"
echo "== per-op costs (host issue, total, GPU kernel time)"
timeout 30 /tmp/n/node bench/gpu/ops.ts 128 2>&1 | grep -v "maxDynamic" | tee "$out/ops.jsonl"
timeout 30 /tmp/n/node bench/gpu/ops.ts 1024 2>&1 | grep -v "maxDynamic" | tee -a "$out/ops.jsonl"
echo "== fp32 matmul: ours (webgpu) and PyTorch (TF32 off)"
timeout 60 /tmp/n/node bench/gpu/matmul.ts 1024,2048,4096 2>&1 | grep -v "maxDynamic" | tee "$out/matmul-ours.jsonl"
timeout 30 python3 bench/peers/torch_matmul.py cuda 1024,2048,4096 2>&1 | tee "$out/matmul-torch.jsonl"
/tmp/n/node bench/gpu/ratio.ts "$out/matmul-ours.jsonl" "$out/matmul-torch.jsonl"
echo "== ours (webgpu)"
timeout 200 /tmp/n/node bench/gpu/train-step.ts webgpu "" "$steps" 2>&1 | grep -v "maxDynamic" | tee "$out/ours.jsonl"
echo "== PyTorch eager"
PYTHONUNBUFFERED=1 timeout 60 python3 bench/peers/torch_lm.py cuda 2>&1 | tee "$out/torch.jsonl"
echo "== ratios"
/tmp/n/node bench/gpu/ratio.ts "$out/ours.jsonl" "$out/torch.jsonl" | tee "$out/ratios.json"
# the fastest of our matmul tile shapes at 4096 (by kernel time), if it beats tfjs's: the dense steps again with it
best=$(/tmp/n/node -e '
  const rows = require("fs").readFileSync(process.argv[1], "utf8").split("\n").flatMap((l) => { try { return [JSON.parse(l)] } catch { return [] } }).filter((r) => r.n === 4096)
  const speed = (r) => r.kernelGflops ?? r.wallGflops
  const top = rows.sort((a, b) => speed(b) - speed(a))[0]
  if (top !== undefined && top.kernel !== "tfjs") console.log(top.kernel)' "$out/matmul-ours.jsonl")
if [ -n "$best" ]; then
  echo "== ours with matmul $best"
  CONCEPTMOE_MATMUL=$best timeout 90 /tmp/n/node bench/gpu/train-step.ts webgpu dense-2L-d128,dense-4L-d512 "$steps" 2>&1 | grep -v "maxDynamic" | tee "$out/ours-matmul.jsonl"
  /tmp/n/node bench/gpu/ratio.ts "$out/ours-matmul.jsonl" "$out/torch.jsonl" | tee "$out/ratios-matmul.json"
fi
# the plot needs vega, which the carry leaves out: here, node bench/gpu/plot.ts <files>/ours.jsonl <files>/torch.jsonl out.svg
