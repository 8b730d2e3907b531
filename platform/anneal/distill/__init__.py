"""Anneal distill."""
