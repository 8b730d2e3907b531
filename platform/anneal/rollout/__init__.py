"""Anneal rollout."""
