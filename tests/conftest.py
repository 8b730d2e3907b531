"""Suite-wide: the process ends with pytest's own exit status, not with a crash in library teardown.

One full run (2026-12-02: 931 passed) ended in a segmentation fault after pytest had printed its
summary, at interpreter shutdown; neither the unit nor the e2e tier alone reproduced it, and
no test was running (faulthandler is off by then, so there was no stack). Native threads that
outlive the tests (Ray's gRPC and raylet clients, torch's and tokenizers' pools) are the usual
cause. So once pytest has finished and reported, Ray is shut down if a test left it connected
and the process exits with the status pytest decided: a failing test still fails the run, and
a teardown crash cannot turn a passing run into a failure. `PYTHONFAULTHANDLER=1`
(scripts/test.sh) still dumps the stacks of any crash while tests run.
"""

from __future__ import annotations

import os
import sys

import pytest

_status: dict[str, int] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _status["exit"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if "exit" not in _status or hasattr(config, "workerinput"):
        return
    if "ray" in sys.modules:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_status["exit"])
