#!/usr/bin/env bash
# Builds .carry/ (ignored by git) for a `device` run of bench/gpu/smoke.ts on the lent NVIDIA machine,
# which has no Node and no network: the pinned Node binary, a trimmed node_modules (tfjs node bundles,
# tfjs-backend-webgpu, webgpu's Dawn for linux-x64, effect's dist) and the Vulkan/GL loader packages.
# About 37 MB. Run from the repository root after `npm ci`. Then, with the device tool:
#   carry [".carry"], timeout_s 420, command: bash bench/gpu/run.sh core   (then `extra`: see run.sh)
set -euo pipefail
root=$(pwd)
work=$(mktemp -d)
# the optional dependencies, from our node_modules when npm installed them, else fetched here
if [ -d "$root/node_modules/webgpu" ] && [ -d "$root/node_modules/@tensorflow/tfjs-backend-webgpu" ]; then
  mkdir -p "$work/node_modules/@tensorflow"
  cp -r "$root/node_modules/webgpu" "$work/node_modules/"
  cp -r "$root/node_modules/@tensorflow/tfjs-backend-webgpu" "$work/node_modules/@tensorflow/"
else
  (cd "$work" && echo '{"name":"gpu-deps","version":"1.0.0"}' > package.json && npm install --no-audit --no-fund webgpu@0.6.2 @tensorflow/tfjs-backend-webgpu@4.22.0 >/dev/null)
fi
nm="$work/carry/node_modules"
mkdir -p "$nm/@tensorflow"
for p in tfjs tfjs-core tfjs-backend-cpu tfjs-backend-webgl tfjs-converter tfjs-data tfjs-layers; do
  main=$(node -e "console.log(require('$root/node_modules/@tensorflow/$p/package.json').main)")
  mkdir -p "$nm/@tensorflow/$p/$(dirname "$main")"
  cp "$root/node_modules/@tensorflow/$p/package.json" "$nm/@tensorflow/$p/"
  cp "$root/node_modules/@tensorflow/$p/$main" "$nm/@tensorflow/$p/$main"
done
mkdir -p "$nm/@tensorflow/tfjs-backend-webgpu/dist" "$nm/webgpu/dist/linux-x64" "$nm/effect"
cp "$work/node_modules/@tensorflow/tfjs-backend-webgpu/package.json" "$nm/@tensorflow/tfjs-backend-webgpu/"
cp "$work/node_modules/@tensorflow/tfjs-backend-webgpu/dist/tf-backend-webgpu.node.js" "$nm/@tensorflow/tfjs-backend-webgpu/dist/"
cp "$work/node_modules/webgpu/package.json" "$work/node_modules/webgpu/index.js" "$nm/webgpu/"
cp "$work/node_modules/webgpu/dist/linux-x64/dawn.node" "$nm/webgpu/dist/linux-x64/"
for p in long seedrandom node-fetch whatwg-url tr46 webidl-conversions; do
  if [ -d "$root/node_modules/$p" ]; then cp -r "$root/node_modules/$p" "$nm/"; else cp -r "$work/node_modules/$p" "$nm/"; fi
done
cp "$root/node_modules/effect/package.json" "$nm/effect/"
cp -r "$root/node_modules/effect/dist" "$nm/effect/"
find "$nm/effect/dist" \( -name "*.map" -o -name "*.d.ts" \) -delete
mkdir -p .carry
tar -cJf .carry/nm.tar.xz -C "$work/carry" node_modules
xz -c -T2 node_modules/node/bin/node > .carry/node.xz
(cd .carry && apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 2>/dev/null)
du -sh .carry
