"""One settings object for every endpoint and secret; ``TESSERA_*`` environment variables override it.

Pointing Tessera at a real S3, Ray cluster or MLflow server is configuration only: set ``TESSERA_S3_ENDPOINT``,
``TESSERA_RAY_ADDRESS`` or ``TESSERA_MLFLOW_URI`` (and the usual ``AWS_*`` keys / ``RAY_AUTH_TOKEN``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

STATE_FOLDER = ".tessera"


def find_state_dir(cwd: Path | None = None, home: Path | None = None) -> Path:
    """The nearest ``.tessera`` folder in ``cwd`` or a folder above it (a project's own stack, found from any of
    its sub-folders, as git finds its repository), else ``~/.tessera``. The local stack listens on fixed ports, so
    there is one per user, and every command must find it from any directory: a state folder relative to where a
    command ran made one run elsewhere see no keys and report the running stack as down."""
    try:
        here = (cwd or Path.cwd()).resolve()
    except FileNotFoundError:  # run from a folder deleted since
        here = Path("/")
    for folder in (here, *here.parents):
        if (folder / STATE_FOLDER).is_dir():
            return folder / STATE_FOLDER
    return (home or Path.home()) / STATE_FOLDER


class Settings(BaseSettings):
    """Endpoints and the local stack's layout. Secrets live in files under ``state_dir`` (mode 0600)."""

    model_config = SettingsConfigDict(env_prefix="TESSERA_", extra="ignore")

    state_dir: Path | None = None  # None: :func:`find_state_dir`
    host: str = "127.0.0.1"
    ray_port: int = Field(6380, gt=0, lt=65536)
    ray_dashboard_port: int = Field(8265, gt=0, lt=65536)
    ray_client_port: int = Field(10001, gt=0, lt=65536)
    ray_agent_port: int = Field(52365, gt=0, lt=65536)
    ray_num_cpus: int | None = Field(None, ge=1)
    # the ports Ray's worker processes listen on, "MIN-MAX" (None: Ray's 10002-19999): a second stack on the same
    # machine takes another range, else two raylets can hand out the same free port at once
    ray_worker_ports: str | None = Field(None, pattern=r"^\d{4,5}-\d{4,5}$")
    s3_port: int = Field(9900, gt=0, lt=65536)
    mlflow_port: int = Field(5500, gt=0, lt=65536)
    ray_address: str | None = None
    s3_endpoint: str | None = None
    mlflow_uri: str | None = None
    region: str = "us-east-1"
    shards_bucket: str = "shards"
    mlflow_bucket: str = "mlflow"
    checkpoints_bucket: str = "checkpoints"
    # Ray Train checkpoints and Ray Tune state: local folders under the state directory by default; on a
    # multi-node cluster, shared storage (s3://...), since every node writes there.
    checkpoints_url: str | None = None
    sweeps_url: str | None = None

    def model_post_init(self, context: object) -> None:
        if self.state_dir is None:  # found once, so a folder made later cannot move a running command's state
            self.state_dir = find_state_dir()

    @property
    def state(self) -> Path:
        return Path(self.state_dir).resolve()

    @property
    def checkpoints(self) -> str:
        return self.checkpoints_url or str(self.state / "checkpoints")

    @property
    def sweeps(self) -> str:
        return self.sweeps_url or str(self.state / "sweeps")

    @property
    def ray_gcs_address(self) -> str:
        return self.ray_address or f"{self.host}:{self.ray_port}"

    @property
    def ray_dashboard_url(self) -> str:
        return f"http://{self.host}:{self.ray_dashboard_port}"

    @property
    def s3_url(self) -> str:
        return self.s3_endpoint or f"http://{self.host}:{self.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return self.mlflow_uri or f"http://{self.host}:{self.mlflow_port}"

    @property
    def ray_temp_dir(self) -> str:
        # Ray's unix sockets must fit in 107 bytes, so the session lives under a short /tmp path.
        digest = hashlib.sha256(str(self.state).encode()).hexdigest()[:10]
        return os.path.join(tempfile.gettempdir(), f"tessera-ray-{digest}")

    def secret_path(self, name: str) -> Path:
        return self.state / "secrets" / name

    def ensure_secrets(self) -> None:
        """Create the S3 keys, Ray token and pseudonym key on first use, readable by the owner only."""
        d = self.state / "secrets"
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        wanted = {
            "s3.json": lambda: json.dumps(
                {"access_key": "tessera" + secrets.token_hex(6), "secret_key": secrets.token_urlsafe(30)}
            ),
            "ray_token": lambda: secrets.token_hex(32),
            "pseudonym.key": lambda: secrets.token_hex(32),
        }
        for name, make in wanted.items():
            path = d / name
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(make())

    def s3_keys(self) -> tuple[str, str]:
        """S3 access and secret key: ``AWS_*`` from the environment, else the local stack's."""
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            return os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
        path = self.secret_path("s3.json")
        if not path.exists():
            return "", ""
        keys = json.loads(path.read_text())
        return keys["access_key"], keys["secret_key"]

    def ray_token(self) -> str:
        """The Ray auth token: ``RAY_AUTH_TOKEN`` or the local stack's file."""
        tok = os.environ.get("RAY_AUTH_TOKEN")
        if tok:
            return tok
        path = self.secret_path("ray_token")
        return path.read_text().strip() if path.exists() else ""

    def client_env(self) -> dict[str, str]:
        """Environment for anything that talks to the stack (boto3, DALI, MLflow, Ray clients)."""
        access, secret = self.s3_keys()
        env = {
            "AWS_ENDPOINT_URL": self.s3_url,
            "AWS_REGION": self.region,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "RAY_AUTH_MODE": "token",
            "RAY_ADDRESS": self.ray_gcs_address,
        }
        if access:
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = access, secret
        if not os.environ.get("RAY_AUTH_TOKEN") and self.secret_path("ray_token").exists():
            env["RAY_AUTH_TOKEN_PATH"] = str(self.secret_path("ray_token"))
        if not os.environ.get("TESSERA_PSEUDONYM_KEY") and self.secret_path("pseudonym.key").exists():
            env["TESSERA_PSEUDONYM_KEY_FILE"] = str(self.secret_path("pseudonym.key"))
        return env

    def apply(self) -> None:
        """Export :meth:`client_env` into this process; call it before ``import ray`` (Ray reads auth on import)."""
        os.environ.update(self.client_env())

    def dataset_url(self, name: str) -> str:
        return f"s3://{self.shards_bucket}/{name}"


def load_settings(**overrides: object) -> Settings:
    """Settings from defaults, then ``TESSERA_*`` environment variables, then ``overrides``."""
    return Settings(**overrides)  # type: ignore[arg-type]
