"""The one settings object. Every value comes from a ``RADFLOW_*`` environment variable.

Read it once at an entry point (``Settings()``) and pass it down; library code never reads the
environment itself.
"""

from __future__ import annotations

from pathlib import Path

from platformdirs import user_data_dir
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path(user_data_dir("radflow", appauthor=False))


class Settings(BaseSettings):
    """Radflow configuration; ``RADFLOW_<FIELD>`` sets each field."""

    model_config = SettingsConfigDict(env_prefix="RADFLOW_", extra="ignore")

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Everything local (SQLite file, object folder, inbox, caches) lives under it.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; empty means a SQLite file in the data dir. "
        "PostgreSQL: postgresql+psycopg://user:pass@host/db",
    )
    store_url: str = Field(
        default="",
        description="Object store: empty or a path means a local folder (default "
        "<data_dir>/objects); s3://bucket selects MinIO/S3 with the s3_* settings.",
    )
    s3_endpoint: str = Field(default="localhost:9000", description="host:port of the S3 server")
    s3_access_key: str = ""
    s3_secret_key: SecretStr = SecretStr("")
    s3_secure: bool = Field(default=False, description="Use HTTPS to reach the S3 server")
    s3_region: str | None = None
    inbox_dir: Path | None = Field(
        default=None, description="Watch folder for dropped files; default <data_dir>/inbox"
    )
    pseudonym_key: SecretStr = Field(
        default=SecretStr("radflow-development-key"),
        description="Secret for keyed patient pseudonyms; set a real one in production.",
    )
    max_pixels: int = Field(
        default=4096 * 4096 * 2048,
        description="Largest Rows*Columns*Frames accepted; bigger images are rejected.",
    )
    dashboard_port: int = 8501
    batch_size: int = Field(default=32, ge=1, description="Scoring and training batch size")
    seed: int = 0

    @model_validator(mode="after")
    def _fill_derived(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'radflow.db'}"
        if not self.store_url:
            self.store_url = str(self.data_dir / "objects")
        if self.inbox_dir is None:
            self.inbox_dir = self.data_dir / "inbox"
        return self

    @property
    def inbox(self) -> Path:
        assert self.inbox_dir is not None  # filled by the validator
        return self.inbox_dir

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"
