#!/usr/bin/env bash
# The demo: what the project can do today, on real QEMU. Run by `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
SSC=target/debug/ssc
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. What this machine offers (ssc doctor)"
$SSC doctor || true

step "2. The signed image catalog (ssc catalog list)"
$SSC catalog list build/catalog --trust build/publisher.pub

step "3. Boot the runtime's self-test from the catalog: disk, control link, a data link, a read-only memory window"
truncate -s 16M "$work/disk.img" "$work/window.mem"
printf 'SSC-SELFTEST-WINDOW\n' | dd of="$work/window.mem" conv=notrunc status=none
printf WINDOWEN | dd of="$work/window.mem" bs=1 seek=$(((16 << 20) - 8)) conv=notrunc status=none
printf 'SSC-SELFTEST-DISK\n' | dd of="$work/disk.img" conv=notrunc status=none
python3 scripts/echo-peer.py "$work/echo.sock" $((4 << 20)) &
peer=$!
$SSC run selftest --catalog build/catalog --trust build/publisher.pub \
    --disk "$work/disk.img" --link "echo=$work/echo.sock" --window "$work/window.mem" --timeout 300
wait $peer

step "4. A tampered image is refused before anything boots"
cp -r build/catalog "$work/tampered"
img=$(ls "$work"/tampered/selftest-*.elf)
printf '\x90' | dd of="$img" bs=1 seek=4096 conv=notrunc status=none
if $SSC run selftest --catalog "$work/tampered" --trust build/publisher.pub --timeout 60; then
    echo "demo: ERROR: the tampered image booted" >&2
    exit 1
fi
echo "(refused, as it must be)"

step "5. A chain: a Linux client's disk encrypted by the storage SD (ssc volume create, ssc up)"
$SSC volume create "$work/vol.img" --size 64M --key-out "$work/vol.key"
cat > "$work/chain.toml" <<CHAIN
[catalog]
path = "$PWD/build/catalog"
trust = ["$PWD/build/publisher.pub"]

[client]
kernel = "$PWD/build/client/vmlinuz"
initrd = "$PWD/build/client/initrd.cpio.gz"

[[disk]]
volume = "vol.img"
key = "vol.key"
chain = ["storage-crypt"]
CHAIN
cat > "$work/job.sh" <<'JOB'
echo "job: fio randwrite + verify on /dev/vda, through the storage SD"
fio --name=demo --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --size=16M \
    --rw=randwrite --verify=crc32c --verify_fatal=1 --do_verify=1 | grep -E "IOPS|err="
printf 'TENANT-PLAINTEXT' > /tmp/m; dd if=/tmp/m of=/dev/vda bs=512 seek=40000 conv=sync 2>/dev/null; sync
JOB
$SSC up "$work/chain.toml" --job "$work/job.sh" 2>&1 | grep -v '^\[storage-crypt-0\] \['
if grep -q TENANT-PLAINTEXT "$work/vol.img"; then
    echo "demo: ERROR: plaintext reached the provider's volume" >&2
    exit 1
fi
echo "(the provider's volume file holds no plaintext: grep found nothing)"

step "Done. Benchmarks: make bench. Tests: make test."
