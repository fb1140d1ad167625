#!/usr/bin/env bash
# Builds standby's test guest (kernel + busybox initramfs) from Debian packages into
# build/guest/. Idempotent: does nothing when the guest is already built.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$(cd "$here/../.." && pwd)/build/guest}
# Rebuilt when /init or this script changed since the last build.
[ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ] && cat "$here/init" "$here/build.sh" | cmp -s - "$out/init.built" && exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
find_kernel() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
kernel_pkg=$(find_kernel)
if [ -z "$kernel_pkg" ]; then
  apt-get update -qq
  kernel_pkg=$(find_kernel)
fi
[ -n "$kernel_pkg" ] || { echo "no linux-image-*-cloud-amd64 package found; run apt-get update" >&2; exit 1; }
chmod 777 "$work"   # apt-get download runs as _apt when it can
apt-get download "$kernel_pkg" busybox-static qemu-guest-agent >/dev/null 2>&1 ||
  apt-get download "$kernel_pkg" busybox-static qemu-guest-agent
dpkg -x linux-image-*.deb kernel
dpkg -x busybox-static_*.deb bb
dpkg -x qemu-guest-agent_*.deb qga
mkdir -p root/bin root/proc root/sys root/dev root/tmp root/etc root/lib/modules
cp bb/bin/busybox root/bin/busybox
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console loop failover net_failover virtio_net efivarfs button evdev; do
  f=$(find kernel/lib/modules -name "$m.ko*" | head -1)
  [ -n "$f" ] || { echo "kernel module $m not found in $kernel_pkg" >&2; exit 1; }
  case "$f" in
    *.xz) xz -dc "$f" > "root/lib/modules/$m.ko" ;;
    *) cp "$f" "root/lib/modules/$m.ko" ;;
  esac
done
# qemu-guest-agent, for consistent points: Debian's binary with the shared libraries it
# links, taken from this machine (installed with QEMU, same Debian release).
install -D -m 0755 qga/usr/sbin/qemu-ga root/bin/qemu-ga
for lib in $(ldd qga/usr/sbin/qemu-ga | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
  install -D -m 0755 "$(readlink -f "$lib")" "root$lib"
done
install -m 0755 "$here/init" root/init
mkdir -p "$out"
(cd root && find . | ./bin/busybox cpio -o -H newc 2>/dev/null) | gzip -9 > "$out/initrd.gz.tmp"
cp kernel/boot/vmlinuz-* "$out/vmlinuz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initrd.gz.tmp" "$out/initrd.gz"
cat "$here/init" "$here/build.sh" > "$out/init.built"
echo "test guest built in $out ($kernel_pkg)"
