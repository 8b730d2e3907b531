"""Anneal runtime."""
