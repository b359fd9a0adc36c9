"""The first-use fetch shows pip's download progress on stderr and keeps stdout clean (issue 15
item 5): a wheel served from a local HTTP server, fetched in a fresh process."""
import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import zipfile

import midus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(midus.__file__)))

_FETCH = r"""
import json, sys
from midus.defaults import fetch_wheel
path = fetch_wheel("midus-fake-wheel", "1.0", ["--no-index", "--no-cache-dir", "--find-links", sys.argv[1]])
print(json.dumps({"wheel": str(path)}))
"""


def _fake_wheel(folder):
    """A valid wheel of 200 kB (incompressible), over pip's 40 kB threshold for a progress bar."""
    name = "midus_fake_wheel-1.0-py3-none-any.whl"
    dist = "midus_fake_wheel-1.0.dist-info"
    with zipfile.ZipFile(folder / name, "w") as zf:
        zf.writestr("midus_fake_wheel/data.bin", os.urandom(200_000))
        zf.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: midus-fake-wheel\nVersion: 1.0\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    return name


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_fetch_wheel_shows_download_progress_on_stderr_only(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    name = _fake_wheel(served)
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "MIDUS_CACHE": str(tmp_path / "cache"),
               "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("PIP_FIND_LINKS", None)  # only the local server, whatever the machine's pip configuration
        proc = subprocess.run([sys.executable, "-c", _FETCH, f"http://127.0.0.1:{server.server_address[1]}/"],
                              capture_output=True, text=True, timeout=300, env=env)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stdout: only what the caller prints (e.g. `midus eval --json`); pip said nothing there.
    assert json.loads(proc.stdout) == {"wheel": str(tmp_path / "cache" / "wheels" / name)}
    # stderr: our line, pip's download line, and its progress bar (here, not a terminal: its final
    # state, e.g. "━━━━ 200.7/200.7 kB 12.3 MB/s eta 0:00:00").
    assert "fetching midus-fake-wheel==1.0" in proc.stderr
    assert f"Downloading http://127.0.0.1:{server.server_address[1]}/{name}" in proc.stderr
    assert re.search(r"━ (20\d\.\d)/\1 kB", proc.stderr), proc.stderr
