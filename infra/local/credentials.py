"""S3 access keys for the local stack: from the environment, else a generated file only the owner can read."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from pydantic import SecretStr, ValidationError

from services.config import StrictModel

ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"


class S3Credentials(StrictModel):
    """An S3 access key pair; the secret never appears in repr, str or logs."""

    access_key_id: str
    secret_access_key: SecretStr

    @classmethod
    def generate(cls) -> S3Credentials:
        return cls(
            access_key_id="HD" + secrets.token_hex(9).upper(),
            secret_access_key=SecretStr(secrets.token_urlsafe(30)),
        )

    @classmethod
    def from_env(cls) -> S3Credentials | None:
        """The pair in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or None when either is unset."""
        access_key, secret_key = os.environ.get(ACCESS_KEY_ENV), os.environ.get(SECRET_KEY_ENV)
        if not access_key or not secret_key:
            return None
        return cls(access_key_id=access_key, secret_access_key=SecretStr(secret_key))

    @classmethod
    def load_or_create(cls, path: Path) -> S3Credentials:
        """Keys from the environment when set; else from `path`, generating it (mode 0600) on first use."""
        from_env = cls.from_env()
        if from_env is not None:
            return from_env
        path = Path(path)
        if path.exists():
            return cls.read(path)
        credentials = cls.generate()
        credentials.write(path)
        return credentials

    @classmethod
    def read(cls, path: Path) -> S3Credentials:
        try:
            data = json.loads(Path(path).read_text())
            return cls(
                access_key_id=data["access_key_id"], secret_access_key=SecretStr(data["secret_access_key"])
            )
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
            raise ValueError(
                f"credentials file {path} is unreadable or malformed ({type(exc).__name__}): "
                "delete it to generate new keys (then restart the S3 server so it loads them)"
            ) from None

    def write(self, path: Path) -> None:
        """Write the pair as JSON readable by the owner only; a new directory gets a `*` .gitignore."""
        path = Path(path)
        if not path.parent.exists():
            make_private_dir(path.parent)
            (path.parent / ".gitignore").write_text("*\n")
        write_private_json(path, self.as_json())

    def as_json(self) -> dict[str, str]:
        return {"access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key.get_secret_value()}

    def as_env(self) -> dict[str, str]:
        """The environment variables boto3, s3fs, pyarrow and `services.storage` read."""
        return {ACCESS_KEY_ENV: self.access_key_id, SECRET_KEY_ENV: self.secret_access_key.get_secret_value()}


def make_private_dir(path: Path) -> None:
    """Create `path` (and missing parents) and make it the owner's alone (0700), also when it already existed."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is masked by umask and ignored for an existing directory


def write_private_json(path: Path, obj: object) -> None:
    write_private_text(path, json.dumps(obj))


def write_private_text(path: Path, text: str) -> None:
    """Write through a 0600 temp file and rename it, so a secret is never readable by others."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(temp, 0o600)  # O_CREAT's mode is masked by umask and ignored for an existing file
    os.replace(temp, path)
