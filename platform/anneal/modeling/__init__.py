"""Anneal modeling."""
