#!/usr/bin/env python3
"""Host peer for the self-test's `echo` link: connects to the socket, sends an
8-byte little-endian length and random data, checks every byte comes back."""
import os, socket, struct, sys, threading, time

path, size = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 60
while True:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit(f"echo-peer: no socket at {path}")
        time.sleep(0.05)
data = os.urandom(size)
threading.Thread(target=lambda: s.sendall(struct.pack("<Q", size) + data), daemon=True).start()
got = bytearray()
start = time.time()
while len(got) < size:
    chunk = s.recv(1 << 16)
    if not chunk:
        break
    got += chunk
ok = bytes(got) == data
print(f"echo-peer: {len(got)} of {size} bytes back in {time.time() - start:.2f} s, {'identical' if ok else 'DIFFERENT'}")
sys.exit(0 if ok else 1)
