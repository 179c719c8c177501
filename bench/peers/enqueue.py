"""`python -m bench.peers.enqueue PEER TASK COUNT`: queue COUNT jobs of TASK (noop, send_email) on PEER."""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str]) -> None:
    peer, task, count = argv
    importlib.import_module(f"bench.peers.{peer}_tasks").enqueue(task, int(count))


if __name__ == "__main__":
    main(sys.argv[1:])
