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


def test_leader_steps_down_before_its_lease_can_expire():
    """A leader cut off from the API server gives up at the renew deadline, inside the Lease duration.

    The API server is unreachable for real: the client points at a closed loopback port.
    """
    import threading

    from kubernetes import client

    from anneal_operator.lease import LeaderElector

    cfg = client.Configuration()
    cfg.host = "http://127.0.0.1:9"
    elector = LeaderElector(client.ApiClient(cfg), "l", "default", "me", duration=1.5)
    assert elector.renew_deadline == pytest.approx(1.0) and elector.request_timeout < elector.renew_deadline
    elector.is_leader.set()
    lost = threading.Event()
    elector.keep(lost.set)
    assert lost.wait(30), "leadership was never given up"
    assert not elector.is_leader.is_set()
    assert elector.renew_deadline <= elector.lost_after < elector.duration + elector.retry_period
    with pytest.raises(ValueError, match="renew deadline"):
        LeaderElector(client.ApiClient(cfg), "l", "default", "me", duration=3, renew_deadline=3)
