#!/bin/sh
# Builds the bgsnap test guest into OUT_DIR: OUT_DIR/vmlinuz (Debian's cloud
# kernel, which has initramfs support and the 8250 serial console built in, so
# no modules are needed) and OUT_DIR/initrd.img (a newc cpio holding only /init,
# a static build of init.c, and /dev/console).
# Usage: build.sh OUT_DIR     (test/helpers/guest.ts caches the result)
set -eu

out=${1:?usage: build.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
work="$out/work"
rm -rf "$work"
mkdir -p "$work/root/dev" "$work/root/proc" "$work/deb"

# The metapackage tracks Debian's current cloud kernel; resolve the versioned
# package it depends on. An empty package list means apt-get update never ran.
resolve_kernel() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n 1
}
pkg=$(resolve_kernel)
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(resolve_kernel)
fi
[ -n "$pkg" ] || { echo "build.sh: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }

# apt-get download writes into the current directory.
(cd "$work/deb" && apt-get download -q "$pkg" >/dev/null 2>&1) ||
  (cd "$work/deb" && apt-get download "$pkg")
# Only the kernel image is needed, not the ~100 MB of modules beside it.
mkdir -p "$work/kernel"
dpkg-deb --fsys-tarfile "$work/deb"/*.deb | tar -x -C "$work/kernel" --wildcards './boot/vmlinuz-*'
cp "$work/kernel"/boot/vmlinuz-* "$out/vmlinuz"
# virtio-blk and the virtio PCI transport are modules in the cloud kernel; the
# guest's disk workload (bgsnap.disk=1) loads them itself, in dependency order.
dpkg-deb --fsys-tarfile "$work/deb"/*.deb | tar -x -C "$work/kernel" --wildcards \
  './lib/modules/*/kernel/drivers/virtio/virtio.ko' './lib/modules/*/kernel/drivers/virtio/virtio_ring.ko' \
  './lib/modules/*/kernel/drivers/virtio/virtio_pci*.ko' './lib/modules/*/kernel/drivers/block/virtio_blk.ko'
mkdir -p "$work/root/lib/modules"
find "$work/kernel/lib/modules" -name '*.ko' -exec cp {} "$work/root/lib/modules/" \;
printf "%s %s\n" "$pkg" "$(dpkg-deb -f "$work/deb"/*.deb Version)" > "$out/kernel-version"

gcc -static -O2 -Wall -Wextra -o "$work/root/init" "$here/init.c"
strip "$work/root/init"
# The kernel opens /dev/console for init; the node needs root (mknod). Without
# it init mounts devtmpfs itself.
mknod -m 600 "$work/root/dev/console" c 5 1 2>/dev/null || true
(cd "$work/root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 > "$out/initrd.img"

rm -rf "$work"
echo "built guest with $(cat "$out/kernel-version") in $out"
