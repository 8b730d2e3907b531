"""`update_serve_apps`: concurrent edits of a shared cluster's Serve apps lose none (the REST API replaces them all)."""

from __future__ import annotations

import threading
import time
from typing import Any

from anneal.serve.deploy import update_serve_apps


class _ServeRest:
    """Serve's `/api/serve/applications/` semantics in memory: GET the apps, PUT replaces the whole set.

    A stand-in for the Ray dashboard in a unit test (the e2e tier talks to a real one): the
    point here is the interleaving of many writers, which a slow GET makes likely.
    """

    def __init__(self) -> None:
        self.apps: dict[str, dict[str, Any]] = {"other-tenant": {"name": "other-tenant"}}
        self.http_options = {"host": "127.0.0.1", "port": 8123}
        self.puts: list[dict[str, Any]] = []

    def get(self, url: str) -> Any:
        snapshot = {n: {"deployed_app_config": dict(a), "status": "RUNNING"} for n, a in self.apps.items()}
        time.sleep(0.01)  # the read-modify-write window
        return _Response({"applications": snapshot, "http_options": self.http_options})

    def put(self, url: str, json: dict[str, Any]) -> Any:
        self.puts.append(json)
        self.apps = {a["name"]: a for a in json["applications"]}
        return _Response({})


class _Response:
    status_code = 200

    def __init__(self, doc: dict[str, Any]):
        self._doc = doc

    def raise_for_status(self) -> None:
        pass

    def json(self) -> dict[str, Any]:
        return self._doc


def test_ten_services_deployed_at_once_all_stay():
    rest = _ServeRest()
    threads = [threading.Thread(target=update_serve_apps, args=(rest, "http://ray:8265"),
                                kwargs={"put": [{"name": f"ns_svc{i}"}]}) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(rest.apps) == {"other-tenant"} | {f"ns_svc{i}" for i in range(10)}
    assert all(p["http_options"] == rest.http_options for p in rest.puts)


def test_remove_keeps_the_others_and_an_absent_app_writes_nothing():
    rest = _ServeRest()
    update_serve_apps(rest, "http://ray:8265", put=[{"name": "a"}, {"name": "b"}])
    assert update_serve_apps(rest, "http://ray:8265", remove=("a",))
    assert set(rest.apps) == {"other-tenant", "b"}
    writes = len(rest.puts)
    assert not update_serve_apps(rest, "http://ray:8265", remove=("a",))
    assert len(rest.puts) == writes
