"""Anneal operator: kopf handlers, one module per kind."""
