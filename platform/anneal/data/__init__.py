"""Anneal data."""
