#!/usr/bin/env bash
# Software Vulkan for the webgpu backend on a machine without a GPU: Mesa 25's lavapipe from
# bookworm-backports, unpacked under .lavapipe/ (ignored by git) without touching the system's apt
# sources or libraries. Debian 12's own lavapipe (Mesa 22.3) is rejected by Dawn ("Vulkan
# shaderUniform*ArrayDynamicIndexing required"). Needs Debian's package mirror once; nothing at run time.
#
#   bash bench/gpu/lavapipe.sh && . .lavapipe/env.sh
#   npx vitest run tests/webgpu.test.ts     # the webgpu tests then run instead of skipping
#
# About 5 GFLOP/s on a CPU: for correctness and for host-side costs, not for GPU speed.
set -euo pipefail
root=$(pwd)/.lavapipe
mkdir -p "$root/apt/sp" "$root/apt/lists/partial" "$root/apt/cache/archives/partial" "$root/debs"
cat > "$root/apt/sp/backports.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
O="-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=$root/apt/sp -o Dir::State::Lists=$root/apt/lists -o Dir::Cache=$root/apt/cache -o APT::Sandbox::User=root"
apt-get $O update >/dev/null
(cd "$root/debs" && apt-get $O download mesa-vulkan-drivers/bookworm-backports libdrm2/bookworm-backports \
  libdrm-amdgpu1/bookworm-backports libvulkan1/bookworm >/dev/null)
for f in "$root"/debs/*.deb; do dpkg -x "$f" "$root/root"; done
lib="$root/root/usr/lib/x86_64-linux-gnu"
printf '{"file_format_version":"1.0.0","ICD":{"library_path":"%s/libvulkan_lvp.so","api_version":"1.4.305"}}\n' "$lib" > "$root/lvp_icd.json"
printf 'export VK_DRIVER_FILES=%s LD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n' "$root/lvp_icd.json" "$lib" > "$root/env.sh"
ldd "$lib/libvulkan_lvp.so" | grep "not found" && { echo "lavapipe misses a library (above)"; exit 1; }
echo "lavapipe ready: . .lavapipe/env.sh"
