"""Anneal serve."""
