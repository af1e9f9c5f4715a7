"""Shared pieces for the model-store tests: tiny real networks saved as real models, and a
loopback HTTP server (http.server in a thread) that can cut transfers short or fail on purpose.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from deepmri.models import Model, example_card, save_model
from monai.networks.nets import UNet

TINY_UNET = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [4, 8],
    "strides": [2],
}


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    """A 3D MONAI UNet small enough to run in milliseconds, with seeded weights."""
    torch.manual_seed(seed)
    config = {key: tuple(v) if isinstance(v, list) else v for key, v in TINY_UNET.items()}
    return UNet(**config).eval()


def tiny_card(model_id: str = "test-tiny", **overrides: Any) -> dict[str, Any]:
    card = example_card(id=model_id, **overrides)
    card["architecture"] = {"name": "monai.UNet", "config": dict(TINY_UNET)}
    card["inference"]["patch_size"] = [16, 16, 16]
    return card


def make_model(folder: Path, model_id: str = "test-tiny", seed: int = 0) -> Model:
    """A real model folder written by the real `save_model`."""
    return save_model(tiny_unet(seed), tiny_card(model_id), folder)


@dataclass
class LoopbackServer:
    """Files served on 127.0.0.1 with Range support; `plan[path]` lists faults for next requests.

    Answers carry an ETag and honour If-Range (a changed file is sent whole, from byte 0).
    A fault is "truncate" (announce the full length, send half, close), "error" (HTTP 500) or
    "ignore-range" (answer 200 with the whole file even when a Range was asked for).
    """

    files: dict[str, bytes] = field(default_factory=dict)
    plan: dict[str, list[str]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def fail_next(self, path: str, *faults: str) -> None:
        self.plan.setdefault("/" + path.lstrip("/"), []).extend(faults)


def _handler(server_state: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            range_header = self.headers.get("Range")
            server_state.requests.append({"path": self.path, "range": range_header})
            body = server_state.files.get(self.path)
            faults = server_state.plan.get(self.path) or []
            fault = faults.pop(0) if faults else None
            if body is None:
                self._plain(404, b"not found")
                return
            if fault == "error":
                self._plain(500, b"server error")
                return
            start = 0
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            if_range = self.headers.get("If-Range")
            if range_header and fault != "ignore-range" and if_range in (None, etag):
                start = int(range_header.split("=")[1].split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            part = body[start:]
            server_state.requests[-1]["status"] = 206 if start else 200
            self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(part)))
            self.send_header("Accept-Ranges", "bytes")
            if fault == "truncate":
                self.send_header("Connection", "close")
            self.end_headers()
            if fault == "truncate":
                self.wfile.write(part[: len(part) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(part)

        def _plain(self, code: int, text: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

    return Handler


@contextmanager
def loopback_server() -> Iterator[LoopbackServer]:
    """A real HTTP server on 127.0.0.1 (ephemeral port) for as long as the `with` block runs."""
    state = LoopbackServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
