#!/usr/bin/env python3
"""Container health check of the facerec image: healthy while ``GET /v1/health/ready`` answers 200
(model loaded, provider active, warm-up done). Exit 0 healthy, 1 not; one line says why."""

import os
import sys
import urllib.error
import urllib.request

READY_PATH = "/v1/health/ready"


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('FACEREC_PORT', '8000')}{READY_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as err:
        print(f"{url}: {err.code} {err.read(300).decode(errors='replace')}", file=sys.stderr)
    except OSError as err:
        print(f"{url}: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
