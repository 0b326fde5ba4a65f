#!/usr/bin/env bash
# Builds the guest's cached parts, once per key, into CACHE/guest-<key>/ (argument 1):
#   root.img     a raw ext4 image of a debootstrapped Debian bookworm: systemd as PID 1,
#                postgresql-15 (its cluster 15/main created, not started at boot), python3
#                with an empty venv at /opt/pgoom, the unit that runs the suite at boot;
#   vmlinuz      Debian's kernel (linux-image-amd64), taken from its .deb;
#   initrd.img   a busybox initramfs that loads virtio and ext4, mounts /dev/vda and hands
#                PID 1 to systemd (guest-boot/initramfs-init).
# The key hashes this script, guest-boot/ and the package list: editing pgoom or the
# in-guest suite never rebuilds the image (they travel on the per-run work disk). The
# kernel .deb comes through the guest's own apt, so a non-Debian host (GitHub's Ubuntu
# runners) builds the same guest. Prints "guest=DIR" on its last line.
#   build-base.sh CACHE [--cached]   --cached: build nothing; exit 3 when not built yet.
set -euo pipefail
cache=${1:?usage: build-base.sh CACHE_DIR [--cached]}
only_cached=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
mirror=${PGOOM_VM_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
# What the in-guest suite uses: PostgreSQL 15 (Debian's unit postgresql@15-main), a venv for
# pgoom, setpriv/nsenter (util-linux), capsh (libcap2-bin), ps (procps).
packages=systemd-sysv,dbus,postgresql-15,python3,python3-venv,procps,libcap2-bin,kmod,psmisc
# Each needs the ones before it (measured: another order leaves /dev/vda missing).
modules="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
crc32c_generic crc16 mbcache jbd2 ext4"
log() { echo "vm-build: $*" >&2; }

key=$({ cat "$here/build-base.sh" "$here"/guest-boot/*; echo "$packages $suite $mirror"; } \
  | sha256sum | cut -c1-16)
guest="$cache/guest-$key"
if [ -f "$guest/root.img" ]; then
  echo "guest=$guest"
  exit 0
fi
[ "$only_cached" != --cached ] || exit 3
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.build.XXXXXX")
root="$tmp/root"
cleanup() {
  mountpoint -q "$root/proc" 2>/dev/null && umount "$root/proc"
  rm -rf "$tmp"
}
trap cleanup EXIT
log "debootstrap $suite with $packages (a few minutes, once per machine)"
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" \
  >"$cache/debootstrap.log" 2>&1 || { log "debootstrap failed: see $cache/debootstrap.log"; exit 1; }

in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
mount -t proc proc "$root/proc"
cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true  # for the apt-get below
# Debian's default cluster, as a real install leaves it, for the suite's postgresql@15-main
# checks. Inside debootstrap postgresql-common may leave it half made (configuration, no
# data directory): make it again then.
if [ ! -f "$root/var/lib/postgresql/15/main/PG_VERSION" ] \
  || [ ! -f "$root/etc/postgresql/15/main/postgresql.conf" ]; then
  in_root pg_dropcluster 15 main >/dev/null 2>&1 || true
  rm -rf "$root/etc/postgresql/15/main" "$root/var/lib/postgresql/15/main"
  in_root pg_createcluster 15 main >/dev/null
fi
in_root python3 -m venv /opt/pgoom

# --- the kernel, through the guest's apt ---------------------------------------------------
log "kernel: linux-image-amd64 from $suite"
in_root apt-get update -qq
kpkg=$(in_root apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kpkg" ] || { log "cannot resolve linux-image-amd64 in $suite"; exit 1; }
(cd "$root/tmp" && in_root sh -c "cd /tmp && apt-get download -q $kpkg" >/dev/null)
umount "$root/proc"
dpkg-deb -x "$root"/tmp/"$kpkg"_*.deb "$tmp/kernel"
krel=${kpkg#linux-image-}
mkdir -p "$tmp/out" "$tmp/ird/bin" "$tmp/ird/lib/modules" "$tmp/ird/dev" "$tmp/ird/proc" \
  "$tmp/ird/sys" "$tmp/ird/newroot"
cp "$tmp/kernel/boot/vmlinuz-$krel" "$tmp/out/vmlinuz"
echo "$kpkg $(dpkg-deb -f "$root"/tmp/"$kpkg"_*.deb Version)" >"$tmp/out/kernel-version"
cp /bin/busybox "$tmp/ird/bin/busybox"
for m in $modules; do
  f=$(find "$tmp/kernel/lib/modules/$krel" -name "$m.ko*" | head -1)
  [ -n "$f" ] || { log "module $m missing from $kpkg"; exit 1; }
  case "$f" in
    *.ko.xz) xz -dc "$f" >"$tmp/ird/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$tmp/ird/lib/modules/$m.ko" ;;
    *) cp "$f" "$tmp/ird/lib/modules/$m.ko" ;;
  esac
done
echo $modules >"$tmp/ird/modules"
install -m 0755 "$here/guest-boot/initramfs-init" "$tmp/ird/init"
(cd "$tmp/ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$tmp/out/initrd.img"

# --- boot straight into the suite: no login, no network, no PostgreSQL at boot -----------
echo pgoom-vm >"$root/etc/hostname"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$root/etc/fstab"
install -m 0644 "$here/guest-boot/pgoom-vmtest.service" "$root/etc/systemd/system/"
install -m 0755 "$here/guest-boot/pgoom-vmtest" "$root/usr/local/sbin/"
in_root systemctl -q enable pgoom-vmtest.service
in_root systemctl -q disable postgresql.service
in_root systemctl -q mask serial-getty@ttyS0.service getty@tty1.service apt-daily.timer \
  apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer 2>/dev/null || true
in_root systemctl -q set-default multi-user.target
rm -rf "$root"/tmp/*.deb "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
# 3 GiB, sparse: the suite's clusters live on it. mkfs -d: no loop mount needed.
mkfs.ext4 -q -F -L pgoom-root -d "$root" "$tmp/out/root.img" 3G >/dev/null
rm -rf "$guest"
mv "$tmp/out" "$guest"
log "built $guest ($(cat "$guest/kernel-version"))"
echo "guest=$guest"
