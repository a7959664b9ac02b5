"""A hostile BitTorrent peer for tests: it announces that it has every piece of a torrent,
unchokes whoever asks and answers every block request with random bytes. A correct client
rejects those pieces (hash check), bans the peer and still ends with the right archive.

    python -m hubfast.testing.bad_peer TORRENT_FILE ANNOUNCE_URL IP PORT

Prints ``{"listening": true}`` once announced, then one line per connection when it
closes: ``{"blocks_sent": N}``.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import urllib.parse
import urllib.request

from .. import _core

PROTOCOL = b"\x13BitTorrent protocol"


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            raise ConnectionError("closed")
        buf += part
    return buf


def _serve(conn: socket.socket, pieces: int, peer_id: bytes) -> None:
    sent = 0
    try:
        hello = _recv(conn, 68)
        if not hello.startswith(PROTOCOL):
            return
        info_hash = hello[28:48]  # answer with whichever hash (v1, or v2 cut) it asked for
        conn.sendall(PROTOCOL + bytes(8) + info_hash + peer_id)
        bits = bytearray((pieces + 7) // 8)
        for i in range(pieces):
            bits[i // 8] |= 0x80 >> (i % 8)
        conn.sendall(struct.pack(">IB", 1 + len(bits), 5) + bytes(bits))  # bitfield: all
        while True:
            (length,) = struct.unpack(">I", _recv(conn, 4))
            if length == 0:
                continue  # keep-alive
            msg = _recv(conn, length)
            if msg[0] == 2:  # interested -> unchoke
                conn.sendall(struct.pack(">IB", 1, 1))
            elif msg[0] == 6 and length == 13:  # request -> garbage of the asked length
                index, begin, size = struct.unpack(">III", msg[1:13])
                conn.sendall(struct.pack(">IBII", 9 + size, 7, index, begin) + os.urandom(size))
                sent += 1
    except (ConnectionError, OSError):
        pass
    finally:
        conn.close()
        print(json.dumps({"blocks_sent": sent}), flush=True)


def main() -> None:
    torrent_file, announce, ip, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    size = int(sys.argv[5])
    with open(torrent_file, "rb") as f:
        t = _core.parse_torrent(f.read())
    pieces = (size + t["piece_bytes"] - 1) // t["piece_bytes"]
    peer_id = b"-HFBAD0-" + os.urandom(6).hex().encode()[:12]
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, port))
    srv.listen(16)
    query = urllib.parse.urlencode({"info_hash": bytes.fromhex(t["info_hash_v1"]),
                                    "peer_id": peer_id, "port": port, "uploaded": 0,
                                    "downloaded": 0, "left": 0, "compact": 1,
                                    "event": "started"})
    with urllib.request.urlopen(f"{announce}?{query}", timeout=10) as r:
        r.read()
    print(json.dumps({"listening": True}), flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve, args=(conn, pieces, peer_id), daemon=True).start()


if __name__ == "__main__":
    main()
