"""Anneal api."""
