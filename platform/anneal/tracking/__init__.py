"""Anneal tracking."""
