"""The S3 client used for datasets and models, pointed at the configured endpoint."""

from __future__ import annotations

import os
from typing import Any

ENDPOINT_ENV_VARS = ("ANNEAL_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")


def s3_endpoint_url(explicit: str | None = None) -> str | None:
    """The S3 endpoint to use: the explicit one, else `ANNEAL_S3_ENDPOINT_URL`, else `AWS_ENDPOINT_URL`.

    Args:
        explicit: an endpoint URL given by the caller, or None.

    Returns:
        The endpoint URL, or None for AWS's default endpoint.
    """
    if explicit:
        return explicit
    for var in ENDPOINT_ENV_VARS:
        value = os.environ.get(var)
        if value:
            return value
    return None


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client for the resolved endpoint; credentials come from boto3's usual chain.

    Args:
        endpoint_url: explicit endpoint, or None to read the environment.

    Returns:
        A `boto3` S3 client.
    """
    try:
        import boto3
    except ImportError as e:  # pragma: no cover - boto3 is a declared dependency
        raise RuntimeError("s3:// URIs need boto3; install it with `pip install boto3`") from e
    return boto3.client("s3", endpoint_url=s3_endpoint_url(endpoint_url))
