"""Each kind's control logic, once: pure decisions called by both drivers (the operator and `anneal run`)."""
