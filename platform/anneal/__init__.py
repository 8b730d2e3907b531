"""Anneal: distill, compress and serve LLMs as declarative resources on Ray, tracked in MLflow."""

__version__ = "0.1.0"
API_GROUP = "anneal.dev"
API_VERSION = "v1alpha1"
