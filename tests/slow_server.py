"""``codedsmooth serve`` with a slowed engine (a test double), for the drain tests.

Same arguments as ``codedsmooth --log-level L serve --flag value ...``. The double is the real
engine plus, after warm-up:
- first device batch: writes ``$SLOW_ENGINE_GATE/entered`` and waits until ``$SLOW_ENGINE_GATE/open``
  exists (at most 60 s), so a test can hold work on the model thread and see that it is there;
- every device batch: ``$SLOW_BATCH_S`` seconds longer;
- with ``$SLOW_ENGINE_METHOD`` set, only the engines of checkpoints trained by that method are slowed (a repository's other models run as they are).
The server under test is the real one (``run_server`` with ``engine_factory``).
"""

import logging
import os
import sys
import time
from pathlib import Path

from codedsmooth.service.engine import InferenceEngine
from codedsmooth.service.http.server import run_server
from codedsmooth.service.settings import ServeSettings


class SlowEngine(InferenceEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.warm = False
        self.batches = 0
        only = os.environ.get("SLOW_ENGINE_METHOD")
        slowed = only is None or self.checkpoint.config.training.method == only
        self.gate = Path(os.environ["SLOW_ENGINE_GATE"]) if os.environ.get("SLOW_ENGINE_GATE") and slowed else None
        self.delay = float(os.environ.get("SLOW_BATCH_S", "0")) if slowed else 0.0

    def warm_up(self, max_batch: int) -> None:
        super().warm_up(max_batch)
        self.warm = True

    def run(self, inputs):
        if self.warm:
            self.batches += 1
            if self.gate is not None and self.batches == 1:
                hold_at_gate(self.gate, 60)
            time.sleep(self.delay)
        return super().run(inputs)


def hold_at_gate(gate: Path, timeout_s: float) -> None:
    """Say ``gate/entered``, then hold this thread until the test creates ``gate/open`` (at most ``timeout_s``).

    The server side of a test's gate: the test waits on ``entered`` and opens the gate when it has seen what it
    needs, so nothing here stands in for a state the test expects; the timeout only ends a gate never opened.
    """
    (gate / "entered").touch()
    end = time.monotonic() + timeout_s
    while not (gate / "open").exists() and time.monotonic() < end:
        time.sleep(0.005)


def parse(argv: list[str]) -> tuple[str, dict]:
    log_level, given, i = "info", {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--log-level":
            log_level, i = argv[i + 1], i + 2
        elif arg == "serve":
            i += 1
        elif arg.startswith("--no-"):
            given[arg[5:].replace("-", "_")], i = False, i + 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            given[arg[2:].replace("-", "_")], i = argv[i + 1], i + 2
        else:
            given[arg[2:].replace("-", "_")], i = True, i + 1
    return log_level, given


if __name__ == "__main__":
    level, given = parse(sys.argv[1:])
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_server(ServeSettings(log_level=level, **given), engine_factory=SlowEngine))
