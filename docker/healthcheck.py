#!/usr/bin/env python3
"""Container healthchecks, cheap enough to run every few seconds (they never import swarmtune or torch).

  swarmtune-healthcheck coordinator   its gRPC port accepts connections (SWARMTUNE_HEALTH_PORT, default 7070)
  swarmtune-healthcheck worker        it holds an established TCP connection: its stream to the
                                      coordinator (a worker makes no other); unhealthy while it reconnects
"""

from __future__ import annotations

import os
import socket
import sys

ESTABLISHED = "01"


def coordinator() -> bool:
    port = int(os.environ.get("SWARMTUNE_HEALTH_PORT", "7070"))
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
    except OSError as exc:
        print(f"coordinator port {port}: {exc}")
        return False
    return True


def worker() -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows, None)
                if any(row.split()[3] == ESTABLISHED for row in rows if len(row.split()) > 3):
                    return True
        except OSError:
            continue
    print("no connection to a coordinator")
    return False


def main() -> int:
    checks = {"coordinator": coordinator, "worker": worker}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        print(f"usage: swarmtune-healthcheck {{{'|'.join(checks)}}}", file=sys.stderr)
        return 2
    return 0 if checks[sys.argv[1]]() else 1


if __name__ == "__main__":
    sys.exit(main())
