"""A team tracking server on this machine: PostgreSQL (a private cluster) as MLflow's backend store, and the
MLflow server with proxied artifacts, both bound to 127.0.0.1 unless asked otherwise.

    python -m pipeline.server start            # or: make server
    python -m pipeline.server status
    python -m pipeline.server stop             # or: make server-stop

Then point training at it: RNNLAB_TRACKING_URI=http://127.0.0.1:5001 python -m pipeline.train tracking=server

`start` refuses a port another program holds (exit 1), and exits 0 with "already running at ..." when this state
folder's server already runs on the ports asked for (1 when it runs on others). `status` exits 1 when not running.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.teamserver import DEFAULT_DIR, LOOPBACK, AlreadyRunning, NotRunning, ServerError, TeamServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state folder (default .team-server)")
    parser.add_argument("--port", type=int, default=5001, help="MLflow server port (default 5001)")
    parser.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL port (default 5433)")
    parser.add_argument("--host", default=LOOPBACK, help="address to listen on (default 127.0.0.1: this machine only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = args.dir.resolve()
    try:
        if args.action == "start":
            uri = TeamServer(folder, args.port, args.pg_port, args.host).start()
            print(f"MLflow team server at {uri} (PostgreSQL on {LOOPBACK}:{args.pg_port}, state in {folder})")
            print(f"use it: export RNNLAB_TRACKING_URI={uri}; python -m pipeline.train tracking=server")
        elif args.action == "stop":
            TeamServer.load(folder).stop()
            print("stopped")
        else:
            print(TeamServer.load(folder).status())
    except AlreadyRunning as err:  # the server asked for runs: success; on other ports: not what was asked
        print(err if err.same else f"error: {err}", file=sys.stdout if err.same else sys.stderr)
        return 0 if err.same else 1
    except NotRunning as err:
        print(err)
        return 1
    except (ServerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
