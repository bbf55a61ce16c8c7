"""A loopback TCP proxy for fault tests: cuts or stalls every connection on demand, holds new ones behind a gate."""

from __future__ import annotations

import select
import socket
import threading
import time

CHUNK = 65536
POLL_S = 0.5
STALL_POLL_S = 0.05  # a stalled connection checks this often whether it was cut


class TcpProxy:
    """Forwards 127.0.0.1:port to an upstream port.

    `cut()` drops every current connection at once (both ends see it end). `stall()` is a NAT that lost
    its mappings: the current connections stay open at both ends, but no byte moves either way any
    more, and nothing tells either end; connections made afterwards are forwarded as usual.
    With `gated=True`, accepted connections wait until `open_gate()` before reaching the upstream:
    clients that connect at different times all get through at the same moment.
    """

    def __init__(self, upstream_port: int, gated: bool = False) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._stalled: set[tuple[socket.socket, socket.socket]] = set()
        self._gate = threading.Event()
        if not gated:
            self._gate.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def open_gate(self) -> None:
        self._gate.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self._gate.wait()
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()  # upstream down: the client sees its connection end and retries
            return
        with self._lock:
            self._pairs.append((client, upstream))
        self._pump(client, upstream)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                if self._is_stalled((a, b)):
                    # Read nothing, write nothing: the kernel buffers fill and both ends wait.
                    time.sleep(STALL_POLL_S)
                    if a.fileno() < 0:
                        return  # cut or closed
                    continue
                readable, _, _ = select.select(list(peers), [], [], POLL_S)
                for sock in readable:
                    if self._is_stalled((a, b)):
                        break  # stalled while we waited: not one more byte
                    data = sock.recv(CHUNK)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            return  # cut: the sockets were closed under us
        finally:
            self._drop(a, b)

    def _is_stalled(self, pair: tuple[socket.socket, socket.socket]) -> bool:
        with self._lock:
            return pair in self._stalled

    def _drop(self, a: socket.socket, b: socket.socket) -> None:
        with self._lock:
            if (a, b) in self._pairs:
                self._pairs.remove((a, b))
            self._stalled.discard((a, b))
        for sock in (a, b):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def stall(self) -> int:
        """Stop forwarding on every open connection, keeping both ends open; returns how many."""
        with self._lock:
            self._stalled.update(self._pairs)
            return len(self._pairs)

    def cut(self) -> int:
        """Drop every open connection (both ends see the TCP connection end); returns how many."""
        with self._lock:
            pairs = list(self._pairs)
        for a, b in pairs:
            self._drop(a, b)
        return len(pairs)

    def close(self) -> None:
        self._listener.close()
        self._gate.set()
        self.cut()
