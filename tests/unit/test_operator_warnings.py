"""Pre-flight warnings a job reports become Warning events once each, and land in status."""

from __future__ import annotations

from anneal_operator.jobs import Observation, Retry, observe


def test_new_warnings_become_events_once():
    result = {"phase": "Succeeded", "modelUri": "models:/m/1",
              "warnings": ["FP8 needs compute capability >= 8.9", "no minRetention set"]}
    first = observe({"phase": "Running"}, Observation("SUCCEEDED", result=result), Retry(2), now=0.0)
    assert first.status["warnings"] == result["warnings"]
    preflight = [e for e in first.events if e[1] == "Preflight"]
    assert preflight == [("Warning", "Preflight", w) for w in result["warnings"]]
    # A later pass over the same result posts nothing again.
    again = observe(first.status, Observation("SUCCEEDED", result=result), Retry(2), now=1.0)
    assert not [e for e in again.events if e[1] == "Preflight"]
