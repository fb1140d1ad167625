#!/usr/bin/env bash
# Installs what standby needs on a Debian 12 machine, from Debian's packages only:
# QEMU (system emulator and tools of one version: qemu-system-x86 alone would remove a
# newer preinstalled qemu-utils), rsync for the benchmark's baseline, iproute2 for the
# two-site tests' network namespaces, tcpdump for their capture of the link, and openssl
# for the certificates the two-site test and benchmark make with it, ovmf for UEFI VMs;
# libvirt's daemon and
# client for libvirt-managed hosts (installed after QEMU, so that it keeps QEMU's version),
# and swtpm for VMs with a TPM.
# Idempotent: does nothing when everything is in place.
set -euo pipefail
# swtpm_setup (run by libvirt as user tss) signs each new TPM's certificates with a local
# CA kept in /var/lib/swtpm-localca; files a run as root left there would make every later
# TPM's setup fail, so they go back to tss, the owner Debian's package gives the directory.
localca_ok() {
  [ ! -d /var/lib/swtpm-localca ] || [ -z "$(find /var/lib/swtpm-localca ! -user tss 2>/dev/null | head -1)" ]
}
fix_localca() {
  [ -d /var/lib/swtpm-localca ] && id tss >/dev/null 2>&1 && chown -R tss /var/lib/swtpm-localca || true
}
have_all() {
  command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null &&
    command -v qemu-nbd >/dev/null && command -v qemu-io >/dev/null && command -v rsync >/dev/null && command -v bc >/dev/null &&
    command -v ip >/dev/null && command -v tcpdump >/dev/null && command -v openssl >/dev/null &&
    command -v virsh >/dev/null && command -v libvirtd >/dev/null && command -v virtlogd >/dev/null &&
    command -v swtpm >/dev/null && command -v swtpm_setup >/dev/null && localca_ok &&
    [ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] &&
    [ "$(qemu-img --version | head -1 | awk '{print $3}')" = "$(qemu-system-x86_64 --version | head -1 | awk '{print $4}')" ]
}
if have_all; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && ! localca_ok; then
  fix_localca
  have_all && exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-deps: run as root (apt-get install is needed)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
[ -n "$v" ] && [ "$v" != "(none)" ] || { echo "install-deps: no qemu-system-x86 package available" >&2; exit 1; }
# qemu-utils and qemu-block-extra pinned to the emulator's version: they must match.
apt-get install -y -qq --no-install-recommends --allow-downgrades \
  qemu-system-x86 "qemu-utils=$v" "qemu-block-extra=$v" rsync bc xz-utils iproute2 tcpdump openssl ovmf >/dev/null
# libvirt-daemon-system creates the libvirt-qemu user its QEMU driver runs domains as.
apt-get install -y -qq --no-install-recommends libvirt-daemon-system libvirt-clients swtpm swtpm-tools >/dev/null
fix_localca
have_all || { echo "install-deps: QEMU tools still missing or mismatched after install" >&2; exit 1; }
echo "install-deps: $(qemu-system-x86_64 --version | head -1)"
