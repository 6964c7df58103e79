#!/usr/bin/env bash
# The demo: what the project can do today, on real QEMU. Run by `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
SSC=target/debug/ssc
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Waits until the background `ssc up` (pid $1, output $2.out/.err) prints
# the job's marker $3 or the job fails; stops the demo if ssc up exits.
wait_job() {
    until grep -q "$3\|client: job failed" "$2.out" 2>/dev/null; do
        kill -0 "$1" 2>/dev/null || { cat "$2.err" >&2; echo "demo: ERROR: ssc up stopped early" >&2; exit 1; }
        sleep 0.5
    done
}
# The catalog and client part of a chain file; extra [client] lines as arguments.
chain_head() {
    printf '[catalog]\npath = "%s"\ntrust = ["%s"]\n\n[client]\n' "$PWD/build/catalog" "$PWD/build/publisher.pub"
    printf 'kernel = "%s"\ninitrd = "%s"\n' "$PWD/build/client/vmlinuz" "$PWD/build/client/initrd.cpio.gz"
    for line in "$@"; do printf '%s\n' "$line"; done
    printf '\n'
}

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
{ chain_head; cat <<CHAIN; } > "$work/chain.toml"
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
echo "job: the whole disk read sequentially, 1 MiB at depth 16 (the SD's reply queue stays bounded)"
fio --name=seqread --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --bs=1M --rw=read \
    | grep -E "READ:|err="
JOB
$SSC up "$work/chain.toml" --job "$work/job.sh" 2>&1 | grep -v '^\[storage-crypt-0\] \['
if grep -q TENANT-PLAINTEXT "$work/vol.img"; then
    echo "demo: ERROR: plaintext reached the provider's volume" >&2
    exit 1
fi
echo "(the provider's volume file holds no plaintext: grep found nothing)"

step "6. The authenticated mode: tampering and rollback by the provider are caught"
$SSC volume create "$work/auth.img" --size 64M --key-out "$work/auth.key" --format auth
sed -e 's/vol.img/auth.img/; s/vol.key/auth.key/' "$work/chain.toml" > "$work/auth.toml"
cat > "$work/write.sh" <<'JOB'
fio --name=demo --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --size=8M \
    --rw=randwrite --verify=crc32c --verify_fatal=1 --do_verify=1 --end_fsync=1 | grep -E "IOPS|err="
JOB
$SSC up "$work/auth.toml" --job "$work/write.sh" 2>&1 | grep -v '^\[storage-crypt-0\] \['
echo "tenant's generation record: $(cat "$work/auth.key.generation")"
cp "$work/auth.img" "$work/auth.old"
$SSC up "$work/auth.toml" --job "$work/write.sh" 2>&1 | grep -E "job|generation"
echo "tenant's generation record: $(cat "$work/auth.key.generation")"
echo "-- the provider restores the older copy of the volume:"
cp "$work/auth.img" "$work/auth.new"
cp "$work/auth.old" "$work/auth.img"
if out=$($SSC up "$work/auth.toml" --job "$work/write.sh" 2>&1) || ! grep -q "rolled back" <<<"$out"; then
    echo "$out"
    echo "demo: ERROR: a rolled-back volume was served" >&2
    exit 1
fi
grep "^ssc: error" <<<"$out"
echo "(refused at open, as it must be)"
echo "-- the provider flips one bit of data sector 10:"
cp "$work/auth.new" "$work/auth.img"
python3 - "$work/auth.img" <<'PY'
import sys
f = open(sys.argv[1], "r+b")
data_offset = int.from_bytes(f.read(56)[48:56], "big")  # from the volume header
f.seek(data_offset + 10 * 4096 + 5)
b = f.read(1)
f.seek(-1, 1)
f.write(bytes([b[0] ^ 1]))
PY
cat > "$work/read.sh" <<'JOB'
dd if=/dev/vda of=/dev/null bs=4096 skip=10 count=1 iflag=direct || echo "job: sector 10 read failed with an I/O error"
dd if=/dev/vda of=/dev/null bs=4096 skip=11 count=1 iflag=direct 2>/dev/null && echo "job: sector 11 still reads"
JOB
$SSC up "$work/auth.toml" --job "$work/read.sh" 2>&1 | grep -E "job:|integrity|authentication"
echo "-- the provider rewrites the header as an XTS volume's (same salt and key check), to serve it without integrity:"
cp "$work/auth.new" "$work/auth.img"
python3 - "$work/auth.img" <<'PY'
import hashlib, sys
f = open(sys.argv[1], "r+b")
auth = f.read(512)
v1 = bytearray(512)
v1[0:8] = b"SSCVOL01"
v1[8:12] = (1).to_bytes(4, "big")
v1[12:27] = b"aes-xts-plain64"
v1[44:48] = (4096).to_bytes(4, "big")
v1[48:56] = auth[48:56]    # data offset
v1[56:136] = auth[56:136]  # salt, key check, volume id: same offsets in both formats
v1[136:168] = hashlib.sha256(bytes(v1[:136])).digest()
f.seek(0)
f.write(bytes(v1))
PY
if out=$($SSC up "$work/auth.toml" --job "$work/read.sh" 2>&1) || ! grep -q "downgrade refused" <<<"$out"; then
    echo "$out"
    echo "demo: ERROR: an authenticated volume was served as XTS" >&2
    exit 1
fi
grep "^ssc: error" <<<"$out" | cut -c1-220
echo "(refused: the tenant's record says authenticated)"
cp "$work/auth.new" "$work/auth.img"

step "7. Checkpoints: save a running client, then start it again from the checkpoint"
head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/ckpt.key"
echo "-- the checkpoints land on an authenticated volume, through a storage SD of their own:"
$SSC volume create "$work/checkpoints.img" --size 400M --format auth --key-out "$work/ckvol.key"
{ chain_head "memory = 256"; cat <<CHAIN; } > "$work/ckpt.toml"
[checkpoint]
disk = "checkpoints.img"
key = "ckpt.key"
volume_key = "ckvol.key"
CHAIN
cat > "$work/count.sh" <<'JOB'
echo 'kept in tmpfs' > /tmp/f
i=0; while true; do i=$((i+1)); echo "count $i ($(cat /tmp/f))"; sleep 0.5; done
JOB
$SSC up "$work/ckpt.toml" --job "$work/count.sh" > "$work/up1.out" 2>&1 &
up=$!
until grep -q "count 6 " "$work/up1.out" 2>/dev/null; do sleep 0.5; done
$SSC checkpoint save "$work/ckpt.toml"
grep "count" "$work/up1.out" | tail -1
kill -INT $up; wait $up || true
echo "-- the client is gone; starting it again from the checkpoint:"
$SSC checkpoint restore "$work/ckpt.toml" latest > "$work/up2.out" 2>&1 &
up=$!
until [ "$(grep -c "count" "$work/up2.out" 2>/dev/null)" -ge 3 ]; do sleep 0.5; done
grep -E "restore|count" "$work/up2.out" | head -10
kill -INT $up; wait $up || true
$SSC checkpoint list "$work/ckpt.toml"
if grep -q -e "kept in tmpfs" -e SSCCKPT1 "$work/checkpoints.img"; then
    echo "demo: ERROR: client plaintext or a bare checkpoint stream on the provider's file" >&2
    exit 1
fi
echo "(the provider's file holds neither the client's plaintext nor a bare sealed stream: grep found nothing)"

step "8. Memory deduplication across two clients of one image"
{ chain_head "memory = 256" "count = 2"; printf '[dedup]\n'; } > "$work/dedup.toml"
cat > "$work/sum.sh" <<'JOB'
mkdir -p /w; mount -t tmpfs -o size=32m tmpfs /w; cd /w
dd if=/dev/urandom of=a bs=1M count=4 2>/dev/null; sha256sum a > a.sum
i=0; while true; do i=$((i+1)); sha256sum -c a.sum >/dev/null 2>&1 && echo "checksum ok $i" || echo "checksum BAD $i"; sleep 0.5; done
JOB
$SSC up "$work/dedup.toml" --job "$work/sum.sh" > "$work/up3.out" 2>&1 &
up=$!
until [ "$(grep -c "checksum ok" "$work/up3.out" 2>/dev/null)" -ge 4 ]; do sleep 0.5; done
echo "-- scan: what the two clients hold twice, and their zero pages:"
$SSC dedup scan "$work/dedup.toml"
echo "-- apply: zero pages punched out of each paused client's memory file (re-checked first):"
$SSC dedup apply "$work/dedup.toml" 2>/dev/null
sleep 3
grep -E "checksum" "$work/up3.out" | tail -2
kill -INT $up; wait $up || true
if grep -q "checksum BAD" "$work/up3.out"; then
    echo "demo: ERROR: a client's memory changed under dedup" >&2
    exit 1
fi

step "9. Watching a client from outside: its processes, a rootkit's syscall hook and hidden task"
echo "-- two test rootkits (C), built against Debian's linux-headers for the client's kernel:"
mkdir -p "$work/mod"
cp qemu-tests/modules/Kbuild qemu-tests/modules/ssc_hook.c qemu-tests/modules/ssc_hide.c "$work/mod/"
make -s -C "/usr/src/linux-headers-$(cat build/client/KERNEL)" M="$work/mod" modules 2>&1 | grep -v "Skipping BTF" || true
{ chain_head "memory = 256"; printf '[introspect]\n'; } > "$work/mon.toml"
{
    for m in ssc_hook ssc_hide; do
        strip --strip-debug -o "$work/$m.ko" "$work/mod/$m.ko"
        printf "base64 -d > /tmp/%s.ko <<'EOF'\n%s\nEOF\n" "$m" "$(base64 "$work/$m.ko")"
    done
    cat <<'JOB'
sleep 1000 &
sleep 12
T=$(grep ' sys_call_table$' /proc/kallsyms | cut -d' ' -f1)
echo "insmod ssc_hook: replaces sys_call_table[getppid]"; insmod /tmp/ssc_hook.ko table=0x$T nr=110
sleep 2; rmmod ssc_hook
sleep 1000 & H=$!
echo "insmod ssc_hide: unlinks pid $H from the task list"; insmod /tmp/ssc_hide.ko pid=$H
sleep 2; rmmod ssc_hide; kill $H
yes > /dev/null & sleep 3
JOB
} > "$work/rootkit.sh"
$SSC up "$work/mon.toml" --job "$work/rootkit.sh" > "$work/up4.out" 2> "$work/up4.err" &
up=$!
until grep -q "introspect: attached" "$work/up4.err" 2>/dev/null; do sleep 0.5; done
$SSC monitor "$work/mon.toml" --for 40 > "$work/mon.out" 2>&1 &
mon=$!
until grep -q "client: ssc: ready" "$work/up4.out" 2>/dev/null; do sleep 0.5; done
sleep 3
echo "-- ssc monitor --ps: the client's processes, read from its memory by the SD (first lines):"
$SSC monitor "$work/mon.toml" --ps | head -4
$SSC monitor "$work/mon.toml" --ps | grep -E " (init|sh|job.sh|sleep) " | head -5
wait $up || true
kill $mon 2>/dev/null || true; wait $mon 2>/dev/null || true
echo "-- what the client said:"
grep -E "insmod ssc_" "$work/up4.out"
echo "-- ssc monitor (alerts and a syscall sample):"
grep -E "ALERT (syscall hook|hidden|module loaded: ssc)|syscall table entry|yes\(" "$work/mon.out" | head -8
for want in "syscall hook: sys_call_table\[110\]" "hidden process: pid"; do
    if ! grep -q "$want" "$work/mon.out"; then
        echo "demo: ERROR: the monitor did not report $want" >&2
        exit 1
    fi
done

step "10. DomC, the tenant's HSM: the client signs and serves TLS with keys it never holds"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/web.p8" 2>/dev/null
echo 123456 > "$work/hsm.pin"
{
    chain_head
    printf '[hsm]\npin_file = "%s"\nlabel = "tenant-hsm"\n' "$work/hsm.pin"
    printf '[[hsm.key]]\nfile = "%s"\nlabel = "web"\nid = "01"\nusage = "sign,verify"\n' "$work/web.p8"
} > "$work/hsm.toml"
cat > "$work/hsm.sh" <<'JOB'
ip link set lo up
M=/usr/lib/ssc/libssc_pkcs11.so
P="pkcs11-tool --module $M"
echo "job: pkcs11-tool -L:"; $P -L 2>&1 | grep -E "token (label|flags)" | sed 's/^ */job:   /'
echo "job: a P-256 key generated inside DomC; the signature checked by the client's own openssl:"
$P --login --pin 123456 --keypairgen --key-type EC:prime256v1 --id 02 --label client-ec > /dev/null
echo "pay 100 to bob" > /tmp/m
$P --login --pin 123456 --sign --id 02 -m ECDSA-SHA256 --signature-format openssl -i /tmp/m -o /tmp/m.sig 2>/dev/null
$P --read-object --type pubkey --id 02 -o /tmp/ec.der 2>/dev/null
openssl dgst -sha256 -verify /tmp/ec.der -keyform DER -signature /tmp/m.sig /tmp/m | sed 's/^/job: openssl: /'
echo "job: a wrong PIN:"; $P --login --pin 000000 -O 2>&1 | grep -o "CKR_PIN_INCORRECT" | sed 's/^/job: /'
echo "job: openssl s_server with the tenant's RSA key (in DomC) <-> openssl s_client:"
export PKCS11_MODULE_PATH=$M
K="pkcs11:id=%01;type=private;pin-value=123456"
openssl req -new -x509 -engine pkcs11 -keyform engine -key "$K" -subj /CN=client.tenant -days 1 -out /tmp/c.pem 2>/dev/null
openssl s_server -engine pkcs11 -keyform engine -key "$K" -cert /tmp/c.pem -accept 4433 -naccept 1 -www > /tmp/s.log 2>&1 &
for i in $(seq 1 60); do grep -q ACCEPT /tmp/s.log && break; sleep 1; done
echo Q | openssl s_client -connect 127.0.0.1:4433 -CAfile /tmp/c.pem 2>&1 | grep -E "^(Verify return code|New, TLS)" | sed 's/^/job: s_client: /'
wait
echo "job: DEMO-HSM-DONE"; sleep 15
JOB
$SSC up "$work/hsm.toml" --job "$work/hsm.sh" > "$work/up5.out" 2> "$work/up5.err" &
up=$!
wait_job $up "$work/up5" DEMO-HSM-DONE
grep -E "\] job: " "$work/up5.out" | sed 's/^\[client\] //'
echo "-- ssc hsm list (public facts only; no key leaves DomC):"
$SSC hsm list "$work/hsm.toml"
echo "-- ssc hsm audit --tail 6 (every operation, hash chain verified):"
$SSC hsm audit "$work/hsm.toml" --tail 6
wait $up || true
if ! grep -q "s_client: Verify return code: 0" "$work/up5.out"; then
    echo "demo: ERROR: the TLS handshake with the key in DomC did not verify" >&2
    exit 1
fi

step "11. Attested launch: Udom0 and the vTPM; the tenant verifies, then keys the SD through Udom0"
$SSC provider profile --trust build/publisher.pub --out "$work/host.json"
echo "-- the provider publishes this host's TPM key and PCRs (builder, QEMU, trusted catalog keys):"
grep -E '"(index|holds)"' "$work/host.json" | paste - - | sed 's/[",]//g; s/^ */   /'
$SSC volume create "$work/att.img" --size 16M --key-out "$work/att.key" > /dev/null
{ chain_head; cat <<CHAIN; } > "$work/att.toml"
[udom0]

[[disk]]
volume = "$work/att.img"
key = "$work/att.key"
chain = ["storage-crypt"]
CHAIN
cat > "$work/att.sh" <<'JOB'
printf 'ATTESTED-TENANT-DATA' > /tmp/m; dd if=/tmp/m of=/dev/vda bs=512 seek=7 conv=sync 2>/dev/null; sync
echo "job: wrote through the storage SD: $(dd if=/dev/vda bs=512 skip=7 count=1 2>/dev/null | head -c 20)"
echo "job: DEMO-ATTEST-READY"; sleep 600
JOB
$SSC up "$work/att.toml" --job "$work/att.sh" > "$work/up6.out" 2> "$work/up6.err" &
up=$!
until grep -q "waiting for the tenant" "$work/up6.err" 2>/dev/null; do
    kill -0 $up 2>/dev/null || { cat "$work/up6.err" >&2; echo "demo: ERROR: ssc up stopped early" >&2; exit 1; }
    sleep 0.5
done
grep -E "^ssc up: (udom0|disk)" "$work/up6.err"
echo "-- the same chain attested against another host's profile (host substitution): nothing is sent"
sed 's/"sha256": "[0-9a-f]\{8\}/"sha256": "00000000/' "$work/host.json" > "$work/other.json"
if $SSC attest "$work/att.toml" --host-profile "$work/other.json" --job "$work/att.sh" --provision > "$work/bad1.out"; then
    echo "demo: ERROR: a foreign host profile was accepted" >&2
    exit 1
fi
head -1 "$work/bad1.out"
echo "-- ssc attest --provision: verify (TLS 1.3 to Udom0, a fresh nonce, quotes), then key, grant, launch:"
$SSC attest "$work/att.toml" --host-profile "$work/host.json" --job "$work/att.sh" --provision
wait_job $up "$work/up6" DEMO-ATTEST-READY
grep -E "^ssc up: (storage-crypt-0: keyed|udom0: (granted|the tenant))" "$work/up6.err"
grep -E "\] job: " "$work/up6.out" | sed 's/^\[client\] //'
echo "-- and a launch the tenant did not ask for (another client initramfs: VM substitution):"
echo "echo other" > "$work/other.sh"
if $SSC attest "$work/att.toml" --host-profile "$work/host.json" --job "$work/other.sh" > "$work/bad2.out"; then
    echo "demo: ERROR: a substituted launch was accepted" >&2
    exit 1
fi
head -1 "$work/bad2.out"
echo "-- the provider's admin is another user (ssc-admin, group ssc-provider: made by make deps):"
# A copy of ssc any uid may run; setpriv switches to the admin's uid and groups.
bindir=$(mktemp -d); chmod 755 "$bindir"; cp "$SSC" "$bindir/ssc"; chmod 755 "$bindir/ssc"
trap 'rm -rf "$work" "$bindir"' EXIT
as_admin() { ${SUDO:-} setpriv --reuid=ssc-admin --regid=ssc-admin --init-groups -- "$@"; }
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
echo "-- its view (ssc provider list): ids, domains, memory; no provider verb opens windows, links or consoles:"
(cd / && as_admin "$bindir/ssc" provider list)
runbase=${XDG_RUNTIME_DIR:+$XDG_RUNTIME_DIR/ssc}
qmp=$(ls -d "${runbase:-${TMPDIR:-/tmp}/ssc-$(id -u)}"/*/udom0.qmp 2>/dev/null | head -1)
[ -n "$qmp" ] || { echo "demo: ERROR: no Udom0 QMP socket found" >&2; exit 1; }
echo "-- as ssc-admin, opening Udom0's QMP socket ($qmp) to dump its memory:"
if (cd / && as_admin /usr/bin/python3 -c 'import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$qmp") 2>/dev/null; then
    echo "demo: ERROR: the provider's admin reached Udom0's QMP socket" >&2
    exit 1
fi
echo "   refused by the kernel (the run directory is the builder's alone)"
id=$(cd / && as_admin "$bindir/ssc" provider list --json | python3 -c 'import json,sys; print([m["id"] for m in json.load(sys.stdin) if m["attested"]][0])')
(cd / && as_admin "$bindir/ssc" provider stop "$id")
wait $up || true
grep -E "stopped by the provider|stopped cleanly" "$work/up6.err" || true

step "Done. Benchmarks: make bench. Tests: make test."
