"""A long-running process that runs `lookalike` subcommands in-process, one per line of stdin, so a campaign can
kill -9 it at any moment of an edit without paying an interpreter start per kill.

Protocol: one JSON line per command on stdin, ``{"argv": ["add", "p1", "a.jpg"]}``; one JSON line per answer on
stdout, ``{"rc": 0}`` (written only after the command returned: an answer with rc 0 is an acknowledged change, as
the exit status 0 of the CLI is). ``{"ready": true}`` once the imports are done. The commands' own output is dropped.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = io.StringIO()
    from lookalike.cli import main as cli  # the real CLI: settings from LOOKALIKE_* as `lookalike` reads them
    from lookalike.engine import ImageSearchEngine  # noqa: F401 - imported now, not during the first edit

    proto.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            break
        sys.stdout = io.StringIO()
        with contextlib.redirect_stderr(io.StringIO()) as err:
            rc = cli(command["argv"])
        proto.write(json.dumps({"rc": rc, "error": err.getvalue()[-300:] if rc else ""}) + "\n")


if __name__ == "__main__":
    main()
