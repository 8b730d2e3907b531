"""Anneal compress."""
