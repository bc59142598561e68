"""Health checks for the three services; each returns ``(ok, detail)`` and never raises.

A service that answers but refuses this process's keys is not down: its detail starts with :data:`REFUSED`,
so that a stack started with another state folder (other keys) is reported as such, not as unreachable.
"""

from __future__ import annotations

import os
from pathlib import Path

import requests

from cluster.settings import Settings

REFUSED = "refused"
REFUSAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "403"}


def _keys_from(settings: Settings, env: str, secret: str) -> str:
    """Where this process's keys of a service come from, for a refusal's detail."""
    return env if os.environ.get(env) else str(settings.secret_path(secret))


def s3_ok(settings: Settings) -> tuple[bool, str]:
    """Whether the S3 endpoint answers an authenticated ListBuckets."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    access, secret = settings.s3_keys()
    try:
        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_url,
            aws_access_key_id=access or None,
            aws_secret_access_key=secret or None,
            region_name=settings.region,
            config=Config(
                connect_timeout=2,
                read_timeout=5,
                retries={"max_attempts": 1},
                signature_version=None if access else UNSIGNED,  # keyless: learn whether it answers at all
            ),
        )
        n = len(client.list_buckets().get("Buckets", []))
        return True, f"{n} buckets"
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if access and code not in REFUSAL_CODES:  # keyless, any error answers: it wants keys (rclone's own code)
            return False, f"{type(exc).__name__}: {exc}"
        keys = f"the keys from {_keys_from(settings, 'AWS_ACCESS_KEY_ID', 's3.json')}" if access else "no keys"
        return False, f"{REFUSED}: {code} for {keys}"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def mlflow_ok(settings: Settings) -> tuple[bool, str]:
    """Whether the MLflow tracking server's ``/health`` answers OK."""
    from training.tracking import server_health

    return server_health(settings.mlflow_url)


def ray_ok(settings: Settings) -> tuple[bool, str]:
    """Whether the Ray dashboard (job API) answers an authenticated version request."""
    token = settings.ray_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = requests.get(f"{settings.ray_dashboard_url}/api/version", headers=headers, timeout=3)
        if r.status_code == 200:
            return True, f"Ray {r.json().get('ray_version', '?')}"
        if r.status_code in (401, 403):
            keys = f"the token from {_keys_from(settings, 'RAY_AUTH_TOKEN', 'ray_token')}" if token else "no token"
            return False, f"{REFUSED}: HTTP {r.status_code} for {keys}"
        return False, f"HTTP {r.status_code}"
    except requests.RequestException as exc:
        return False, type(exc).__name__


CHECKS = {"ray": ray_ok, "s3": s3_ok, "mlflow": mlflow_ok}


def other_stack(state: Path) -> str:
    """What to do when a stack answers but refuses the keys of the state folder ``state``."""
    made = "" if state.is_dir() else " (no `tessera up` has made it)"
    return (
        f"This command's state folder is {state}{made}: if the stack was started with another one, set "
        "TESSERA_STATE_DIR to that folder (or give the keys: RAY_AUTH_TOKEN, AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY)"
    )


def require(settings: Settings, *names: str) -> None:
    """Fail fast, naming the endpoint, when a service a command needs is unreachable."""
    from cluster.errors import TesseraError

    urls = {"ray": settings.ray_dashboard_url, "s3": settings.s3_url, "mlflow": settings.mlflow_url}
    for name in names:
        ok, detail = CHECKS[name](settings)
        if not ok and detail.startswith(REFUSED):
            raise TesseraError(f"{name} endpoint {urls[name]} {detail}. {other_stack(settings.state)}")
        if not ok:
            raise TesseraError(
                f"{name} endpoint {urls[name]} is unreachable ({detail}); start the local stack with "
                "`tessera up` or set the endpoint (TESSERA_RAY_ADDRESS / TESSERA_S3_ENDPOINT / TESSERA_MLFLOW_URI)"
            )
