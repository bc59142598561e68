"""Health checks for the three services; each returns ``(ok, detail)`` and never raises."""

from __future__ import annotations

import requests

from cluster.settings import Settings


def s3_ok(settings: Settings) -> tuple[bool, str]:
    """Whether the S3 endpoint answers an authenticated ListBuckets."""
    import boto3
    from botocore.config import Config

    access, secret = settings.s3_keys()
    try:
        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_url,
            aws_access_key_id=access or None,
            aws_secret_access_key=secret or None,
            region_name=settings.region,
            config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
        )
        n = len(client.list_buckets().get("Buckets", []))
        return True, f"{n} buckets"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def mlflow_ok(settings: Settings) -> tuple[bool, str]:
    """Whether the MLflow tracking server's ``/health`` answers OK."""
    try:
        r = requests.get(f"{settings.mlflow_url}/health", timeout=3)
        return r.status_code == 200, f"HTTP {r.status_code}"
    except requests.RequestException as exc:
        return False, type(exc).__name__


def ray_ok(settings: Settings) -> tuple[bool, str]:
    """Whether the Ray dashboard (job API) answers an authenticated version request."""
    headers = {"Authorization": f"Bearer {settings.ray_token()}"} if settings.ray_token() else {}
    try:
        r = requests.get(f"{settings.ray_dashboard_url}/api/version", headers=headers, timeout=3)
        if r.status_code == 200:
            return True, f"Ray {r.json().get('ray_version', '?')}"
        return False, f"HTTP {r.status_code}"
    except requests.RequestException as exc:
        return False, type(exc).__name__


CHECKS = {"ray": ray_ok, "s3": s3_ok, "mlflow": mlflow_ok}


def require(settings: Settings, *names: str) -> None:
    """Fail fast, naming the endpoint, when a service a command needs is unreachable."""
    from cluster.errors import TesseraError

    urls = {"ray": settings.ray_dashboard_url, "s3": settings.s3_url, "mlflow": settings.mlflow_url}
    for name in names:
        ok, detail = CHECKS[name](settings)
        if not ok:
            raise TesseraError(
                f"{name} endpoint {urls[name]} is unreachable ({detail}); start the local stack with "
                "`tessera up` or set the endpoint (TESSERA_RAY_ADDRESS / TESSERA_S3_ENDPOINT / TESSERA_MLFLOW_URI)"
            )
