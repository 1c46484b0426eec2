"""``codedsmooth serve`` whose checkpoint loads can be held (a test double of the file read), for the load-timeout tests.

Same arguments as ``codedsmooth --log-level L serve --flag value ...``. Loading the model directory named
``$SLOW_LOAD_MODEL`` first writes ``$SLOW_LOAD_GATE/entered``, then waits until ``$SLOW_LOAD_GATE/open`` exists
(at most 120 s), as a read from a stalled mount would; every other load is the real one. The server under test is
the real one (``run_server``); only ``load_checkpoint`` as the repository calls it is wrapped.
"""

import logging
import os
import sys
from pathlib import Path

import slow_server

from codedsmooth.service.http.server import run_server
from codedsmooth.service.repository import registry
from codedsmooth.service.settings import ServeSettings

real_load = registry.load_checkpoint


def held_load(path, *args, **kwargs):
    if Path(path).name == os.environ.get("SLOW_LOAD_MODEL"):
        slow_server.hold_at_gate(Path(os.environ["SLOW_LOAD_GATE"]), 120)
    return real_load(path, *args, **kwargs)


if __name__ == "__main__":
    registry.load_checkpoint = held_load
    level, given = slow_server.parse(sys.argv[1:])
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_server(ServeSettings(log_level=level, **given)))
