"""The images' HEALTHCHECK: exit 0 when the chorus server's `/health` answers 200, else 1.

The server answers 503 while the engine loads and 200 once it serves, so a container is
"healthy" only when it can take requests. Standard library only (the images have no curl).
Reads CHORUS_HOST / CHORUS_PORT like the server; a wildcard bind address is probed on loopback.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def health_url(environ: dict[str, str] | os._Environ = os.environ) -> str:
    """The `/health` address the server bound by CHORUS_HOST / CHORUS_PORT listens on."""
    host = environ.get("CHORUS_HOST", "127.0.0.1").strip()
    host = "127.0.0.1" if host in _WILDCARDS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = environ.get("CHORUS_PORT", "8000").strip() or "8000"
    return f"http://{host}:{port}/health"


def main() -> int:
    """Probe once; print why when unhealthy (Docker keeps the last lines in `docker inspect`)."""
    url = health_url()
    timeout = float(os.environ.get("CHORUS_HEALTH_TIMEOUT", "4"))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(url, timeout=timeout) as response:
            if response.status == 200:
                return 0
            print(f"unhealthy: {url} answered {response.status}")
    except urllib.error.HTTPError as err:
        print(f"unhealthy: {url} answered {err.code}")
    except (urllib.error.URLError, OSError, ValueError) as err:
        print(f"unhealthy: {url}: {err}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
