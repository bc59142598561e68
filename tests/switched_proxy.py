"""A TCP forwarder to a real server that a test switches off: the server's outage, injected between it and its
clients. Off, it closes every open connection (a kept-alive one too) and each new one as it arrives, as a server
that went away does; on, it forwards again. The switch is a file, so another process (a Ray Train callback in the
run's controller) can throw it."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path


class SwitchedProxy:
    def __init__(self, target_port: int, switch: Path, host: str = "127.0.0.1") -> None:
        self.target, self.switch = (host, target_port), switch
        switch.write_text("on")
        self.server = socket.create_server((host, 0))
        self.url = f"http://{host}:{self.server.getsockname()[1]}"
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._watch, daemon=True).start()

    def on(self) -> bool:
        return self.switch.read_text().strip() == "on"

    def close(self) -> None:
        self.stopped.set()
        self.server.close()
        self._drop_all()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.on():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _watch(self) -> None:
        while not self.stopped.wait(0.1):
            if not self.on():
                self._drop_all()

    def _drop_all(self) -> None:
        with self.lock:
            dropped, self.open = self.open, set()
        for s in dropped:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
