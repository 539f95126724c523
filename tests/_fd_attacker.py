"""A foreign process that tries to slip an fd into a rank's fd exchange (test helper).

    python _fd_attacker.py ADDRESS_HEX JOB_HEX CLAIMED_RANK MODE

MODE: fake_fd (a valid-looking hello with a memfd holding b"EVIL"), no_fd (hello without an
fd), short (3 bytes), silent (connect and close), hold (connect, say "connected", send nothing
for 8 s). Prints "sent" when done. No torch import: it starts in ~30 ms.
"""

import os
import socket
import struct
import sys
import time

HELLO = struct.Struct("!16sI")  # mirrors ccl.rendezvous._HELLO


def main() -> None:
    address = bytes.fromhex(sys.argv[1]).decode()
    job = bytes.fromhex(sys.argv[2])
    claimed = int(sys.argv[3])
    mode = sys.argv[4]
    evil = os.memfd_create("evil")
    os.write(evil, b"EVIL")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(address)
        if mode == "fake_fd":
            socket.send_fds(s, [HELLO.pack(job, claimed)], [evil])
        elif mode == "no_fd":
            s.sendall(HELLO.pack(job, claimed))
        elif mode == "short":
            s.sendall(b"abc")
        elif mode == "hold":
            print("connected", flush=True)
            time.sleep(8)
        elif mode != "silent":
            raise SystemExit(f"unknown mode {mode}")
    print("sent", flush=True)


if __name__ == "__main__":
    main()
