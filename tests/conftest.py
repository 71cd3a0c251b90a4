# Copyright (c) mmsparsevit contributors. All rights reserved.
"""Fixtures shared across the suite."""
import http.server
import sys
import threading
from pathlib import Path
from typing import List

import pytest

# Test helper modules (tool_test_utils, test_lit_reference, ...) are imported by tests of
# other folders; put their folders on the path once, independent of collection order.
# tools/analysis_tools holds the cost tools' helper packages ``measure`` and
# ``transcriptions`` (the plain transcriptions the faithfulness tests compare against), which
# are not part of the installed package.
_TESTS = Path(__file__).resolve().parent
for _folder in (_TESTS / 'test_tools', _TESTS / 'test_models' / 'test_backbones',
                _TESTS / 'test_models' / 'test_layers', _TESTS / 'test_engine',
                _TESTS.parent / 'tools' / 'analysis_tools'):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


class CheckpointServer:
    """An HTTP server on 127.0.0.1 serving the files of one folder, for URL-loading tests.

    ``/<name>`` serves ``<root>/<name>`` (404 when absent); ``/truncated/<name>`` announces the
    whole file in ``Content-Length`` and closes the connection after half of it. Every request
    path is recorded in ``requests``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: List[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):

            def do_GET(self) -> None:
                server.requests.append(self.path)
                truncated = self.path.startswith('/truncated/')
                name = self.path[len('/truncated/'):] if truncated else self.path.lstrip('/')
                path = server.root / name
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2] if truncated else data)
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f'http://127.0.0.1:{self._httpd.server_port}/{name}'

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def checkpoint_server(tmp_path, monkeypatch):
    """A :class:`CheckpointServer` over ``tmp_path/served``, with torch.hub's cache
    (``TORCH_HOME``) in ``tmp_path/torch_home`` so that no test reads or fills the real one."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    root = tmp_path / 'served'
    root.mkdir()
    server = CheckpointServer(root)
    yield server
    server.close()
