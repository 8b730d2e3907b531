"""The operator's process lifecycle: a stop by signal must end `asyncio.run`, so the process exits."""

from __future__ import annotations

import asyncio
import threading

import pytest

from anneal_operator.main import until_stopped


async def _kopf_stopped_by_signal(stop: threading.Event) -> None:
    """What kopf does with a threading.Event stop flag, then a SIGTERM: the flag's wait runs in
    the default executor, and kopf returns (cancelling the wait's future, not the thread)."""
    waiter = asyncio.get_running_loop().run_in_executor(None, stop.wait)
    await asyncio.sleep(0.05)
    waiter.cancel()


def _run_in_thread(coro_factory) -> threading.Event:
    finished = threading.Event()

    def run() -> None:
        try:
            asyncio.run(coro_factory())
        finally:
            finished.set()

    threading.Thread(target=run, daemon=True).start()
    return finished


def test_a_signal_stop_of_kopf_ends_asyncio_run_and_sets_the_stop_flag():
    stop = threading.Event()
    finished = _run_in_thread(lambda: until_stopped(_kopf_stopped_by_signal(stop), stop))
    try:
        assert finished.wait(10), "asyncio.run did not return: the operator process would never exit"
        assert stop.is_set()
    finally:
        stop.set()


def test_without_it_asyncio_run_waits_for_the_stop_flag_forever():
    """The premise of the test above: kopf's flag wait alone keeps asyncio.run from returning."""
    stop = threading.Event()
    finished = _run_in_thread(lambda: _kopf_stopped_by_signal(stop))
    try:
        assert not finished.wait(1.0)
    finally:
        stop.set()  # lets the executor thread, and so asyncio.run, end
    assert finished.wait(10)


def test_an_error_in_kopf_still_sets_the_stop_flag_and_propagates():
    stop = threading.Event()

    async def failing() -> None:
        raise RuntimeError("watch failed")

    with pytest.raises(RuntimeError, match="watch failed"):
        asyncio.run(until_stopped(failing(), stop))
    assert stop.is_set()
