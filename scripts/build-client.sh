#!/usr/bin/env bash
# Builds the test client VM from Debian packages only: the kernel of
# linux-image-cloud-amd64, and an initramfs of busybox-static, fio and
# cryptsetup (with the shared libraries they link) and the kernel modules
# the tests need, with
# modules.dep from kmod's depmod. Cached: rebuilt only when a package
# version changes.
#
# Output in $1 (default build/client): vmlinuz, System.map, KERNEL (the
# release string), initrd.cpio.gz, pkcs11-tools.cpio.gz (appended by
# `ssc up` for chains with [hsm]), STAMP.
# The init script loads the modules, prints `ssc: ready image=client`,
# runs /job.sh if a second initramfs archive provides one (the tests append
# it), prints `client: job passed` or `client: job failed (exit N)` and powers
# off. (The Debian cloud kernel has no /dev/port, so isa-debug-exit is out of
# reach from a shell; the console line is the verdict.)
set -euo pipefail
out=${1:-build/client}
need() { command -v "$1" >/dev/null || { echo "build-client: $1 missing: run \`make deps\`" >&2; exit 1; }; }
need busybox; need fio; need cryptsetup; need depmod; need cpio; need pkcs11-tool; need openssl; need softhsm2-util

kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$kpkg" ] || { echo "build-client: linux-image-cloud-amd64 unknown to apt: run \`apt-get update\`" >&2; exit 1; }
kver=${kpkg#linux-image-}
# Headers of the same kernel: the introspection tests build test modules.
if [ ! -d "/usr/src/linux-headers-$kver" ]; then
    echo "build-client: installing linux-headers-$kver"
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "linux-headers-$kver" >/dev/null
fi
stamp="$kpkg $(apt-cache policy "$kpkg" | awk '/Candidate/ {print $2}') fio=$(dpkg-query -W -f='${Version}' fio) busybox=$(dpkg-query -W -f='${Version}' busybox-static) cryptsetup=$(dpkg-query -W -f='${Version}' cryptsetup-bin) opensc=$(dpkg-query -W -f='${Version}' opensc) softhsm2=$(dpkg-query -W -f='${Version}' softhsm2) openssl=$(dpkg-query -W -f='${Version}' openssl) p11=$(dpkg-query -W -f='${Version}' libengine-pkcs11-openssl) script=$(sha256sum "$0" | cut -c1-16)"
if [ -f "$out/STAMP" ] && [ "$(cat "$out/STAMP")" = "$stamp" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/System.map" ] && [ -f "$out/initrd.cpio.gz" ] && [ -f "$out/pkcs11-tools.cpio.gz" ]; then
    echo "build-client: up to date in $out ($kpkg)"
    exit 0
fi
echo "build-client: building from $kpkg, fio, busybox-static"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "$kpkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/kernel"

root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,mnt,etc,usr/bin,lib/modules/"$kver"}
cp "$(command -v busybox)" "$root/bin/busybox"

# The modules and everything they depend on, in load order.
mods="virtio_pci virtio_blk virtio_console virtio_balloon dm_crypt xts aesni_intel"
depmod -b "$work/kernel" "$kver"
: > "$root/etc/modules.order"
for ko in $(modprobe -a -d "$work/kernel" -S "$kver" --show-depends $mods | awk '$1 == "insmod" {print $2}'); do
    rel=${ko#"$work/kernel"}
    if ! grep -qx "$rel" "$root/etc/modules.order"; then
        mkdir -p "$root$(dirname "$rel")"
        cp "$ko" "$root$rel"
        echo "$rel" >> "$root/etc/modules.order"
    fi
done

# Programs and everything they link.
with_libs() {
    local dest=$2
    cp --parents -L -n "$1" "$dest"
    for lib in $(ldd "$1" | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
        cp --parents -L -n "$lib" "$dest"
    done
}
for bin in fio cryptsetup; do
    cp "$(command -v $bin)" "$root/usr/bin/$bin"
    with_libs "$(command -v $bin)" "$root"
done
mkdir -p "$root/run/cryptsetup"

# The PKCS#11 peers of the DomC tests, in an archive of their own that
# `ssc up` appends for chains with [hsm] (the base initramfs already fills
# a 256 MiB client): pkcs11-tool, openssl with libp11's engine, SoftHSM2,
# libgcc_s for Rust's libssc_pkcs11.so, and what they link.
tools="$work/tools"
mkdir -p "$tools/usr/bin" "$tools/etc/softhsm"
for bin in pkcs11-tool openssl softhsm2-util; do
    cp "$(command -v $bin)" "$tools/usr/bin/$bin"
    with_libs "$(command -v $bin)" "$tools"
done
for lib in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so \
    /usr/lib/x86_64-linux-gnu/libgcc_s.so.1; do
    with_libs "$lib" "$tools"
done
cp --parents -L /usr/lib/ssl/openssl.cnf "$tools"
printf 'directories.tokendir = /tmp/softhsm\nobjectstore.backend = file\nlog.level = ERROR\n' > "$tools/etc/softhsm/softhsm2.conf"

cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=64m tmp /tmp
mkdir -p /tmp/softhsm
while read -r m; do insmod "$m" 2>/dev/null || echo "client: insmod $m failed"; done < /etc/modules.order
echo "client: ssc: ready image=client boot_us=0"
if [ -x /job.sh ]; then
    if /job.sh; then echo "client: job passed"; else echo "client: job failed (exit $?)"; fi
    poweroff -f
fi
exec sh
INIT
chmod +x "$root/init"
mkdir -p "$out"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 > "$work/initrd.cpio.gz")
# Zero-pad to 4 bytes: an archive appended later (a test's /job.sh) must
# start 4-byte aligned; the kernel skips the zeros between archives.
size=$(stat -c %s "$work/initrd.cpio.gz")
truncate -s $(( (size + 3) / 4 * 4 )) "$work/initrd.cpio.gz"
(cd "$tools" && find . | cpio -o -H newc --quiet | gzip -1 > "$work/pkcs11-tools.cpio.gz")
size=$(stat -c %s "$work/pkcs11-tools.cpio.gz")
truncate -s $(( (size + 3) / 4 * 4 )) "$work/pkcs11-tools.cpio.gz"
mv "$work/pkcs11-tools.cpio.gz" "$out/pkcs11-tools.cpio.gz"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"
# The introspection profile (`ssc profile build`) is derived from the
# kernel and its System.map. The image package's System.map is a
# placeholder; the real one is in the -dbg package (280 MB, only the map is
# kept).
(cd "$work" && apt-get download -q "$kpkg-dbg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
dpkg-deb --fsys-tarfile "$work"/"$kpkg"-dbg_*.deb | tar -x -C "$work" "./usr/lib/debug/boot/System.map-$kver"
cp "$work/usr/lib/debug/boot/System.map-$kver" "$out/System.map"
echo "$kver" > "$out/KERNEL"
mv "$work/initrd.cpio.gz" "$out/initrd.cpio.gz"
echo "$stamp" > "$out/STAMP"
echo "build-client: $out/vmlinuz, $out/initrd.cpio.gz ($(du -h "$out/initrd.cpio.gz" | cut -f1))"
