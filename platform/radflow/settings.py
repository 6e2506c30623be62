"""The one settings object. Every value comes from a ``RADFLOW_*`` environment variable.

Read it once at an entry point (``Settings()``) and pass it down; library code never reads the
environment itself.
"""

from __future__ import annotations

from pathlib import Path

from platformdirs import user_data_dir
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from radflow.errors import RadflowError

MAX_VOLUME_VOXELS = 512 * 512 * 1024
"""Default of ``max_volume_voxels``: 1 GiB as float32, a 1,024-slice 512x512 CT."""

DEVELOPMENT_PSEUDONYM_KEY = "radflow-development-key"
"""The public default: anyone can recompute pseudonyms made with it, so it is refused for real
data (``Settings.require_pseudonym_key``)."""


class InsecureSettings(RadflowError, ValueError):
    """A setting that would expose patient data; the message says what to set."""


def _default_data_dir() -> Path:
    return Path(user_data_dir("radflow", appauthor=False))


def _both_or_neither(cert: Path | None, key: Path | None, part: str) -> None:
    if (cert is None) != (key is None):
        prefix = f"RADFLOW_{part.upper()}_TLS"
        raise ValueError(
            f"set both {prefix}_CERT_FILE and {prefix}_KEY_FILE (PEM files: the {part}'s "
            "certificate and its private key) for TLS, or neither"
        )


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
    quarantine_dir: Path | None = Field(
        default=None,
        description="Where rejected watch-folder files go, each with a <name>.reason.json; "
        "default <data_dir>/quarantine",
    )
    watch_interval_seconds: float = Field(
        default=2.0, gt=0, description="How often `radflow watch` scans the inbox"
    )
    watch_settle_seconds: float = Field(
        default=2.0,
        ge=0,
        description="A dropped file is picked up only once unchanged this long (still being "
        "copied otherwise); names starting with '.' or ending in .part/.tmp are never picked up",
    )
    max_archive_bytes: int = Field(
        default=8 * 1024**3,
        gt=0,
        description="Largest total uncompressed size of a zip dropped in the inbox (zip bombs)",
    )
    max_archive_members: int = Field(
        default=100_000, gt=0, description="Most files a zip dropped in the inbox may hold"
    )
    stable_after_seconds: float = Field(
        default=5.0,
        ge=0,
        description="Quiet period: a study is complete (stable) once no new instance has "
        "arrived for this long",
    )
    routing_file: Path | None = Field(
        default=None,
        description="YAML routing rules (series -> task); default the packaged "
        "radflow/routing_rules.yaml",
    )
    pseudonym_key: SecretStr = Field(
        default=SecretStr(""),
        description="Secret from which patient pseudonyms and export keys are derived; empty "
        "reads pseudonym_key_file. The public default is refused by receive, ingest, watch, "
        "import, export and worker: set a long random value (`openssl rand -hex 32`) and keep it",
    )
    pseudonym_key_file: Path | None = Field(
        default=None,
        description="File holding the pseudonym key, read when pseudonym_key is not set; "
        "default <data_dir>/pseudonym.key (where `radflow demo` writes a random one)",
    )
    max_pixels: int = Field(
        default=4096 * 4096 * 2048,
        description="Largest Rows*Columns*Frames accepted; bigger images are rejected.",
    )
    max_volume_voxels: int = Field(
        default=MAX_VOLUME_VOXELS,
        ge=1,
        description="Largest series (voxels) assembled into a volume for a volume task; a bigger "
        "one is shown as not applicable (too-many-voxels). A float32 voxel takes 4 bytes.",
    )
    dashboard_port: int = 8501
    receiver_port: int = Field(
        default=11112, ge=1, le=65535, description="TCP port of the DICOM receiver (C-STORE SCP)"
    )
    receiver_host: str = Field(
        default="0.0.0.0", description="Address the receiver listens on (127.0.0.1: this host only)"
    )
    receiver_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Receiver processes accepting on one shared listening socket, each with its "
        "own spool folder and indexer: about one per CPU core when several modalities send at "
        "once",
    )
    receiver_fast_path: bool = Field(
        default=True,
        description="Use the receiver's C-STORE fast path where the installed pynetdicom and "
        "pydicom are the releases it was written for; false: pynetdicom's public API only "
        "(slower)",
    )
    receiver_ae_title: str = Field(
        default="RADFLOW", min_length=1, max_length=16, description="AE title of the receiver"
    )
    allowed_calling_aets: list[str] = Field(
        default_factory=list,
        description='Calling AE titles the receiver accepts, as a JSON list (["CT1","PACS"]); '
        "empty accepts every sender",
    )
    receiver_tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate (chain) the receiver presents; with receiver_tls_key_file, "
        "`radflow receive` accepts only DICOM TLS associations (TLS 1.2 or later) on its port. "
        "Read at start: a renewed certificate takes effect when the receiver restarts",
    )
    receiver_tls_key_file: Path | None = Field(
        default=None, description="PEM private key (not encrypted) of receiver_tls_cert_file"
    )
    receiver_tls_ca_file: Path | None = Field(
        default=None,
        description="PEM certificates of the authorities that sign the senders' certificates: "
        "set, every sender must present a certificate one of them signed (mutual TLS); needs "
        "receiver_tls_cert_file and receiver_tls_key_file",
    )
    spool_dir: Path | None = Field(
        default=None,
        description="Where the receiver keeps acknowledged instances until they are indexed; "
        "default <data_dir>/spool (must be a local disk: it is fsynced)",
    )
    receiver_max_pdu_bytes: int = Field(
        default=1024 * 1024,
        ge=16 * 1024,
        le=64 * 1024 * 1024,
        description="Largest PDU the receiver announces and accepts: a peer's PDU declaring more "
        "is refused (A-ABORT) before any of it is read, so memory stays bounded per association",
    )
    receiver_min_free_bytes: int = Field(
        default=2 * 1024**3,
        ge=0,
        description="Below this many bytes free on the spool's disk the receiver refuses new "
        "associations and instances (transient: senders retry); 0 turns the check off. MONAI "
        "Informatics Gateway uses 5 GB on servers; 2 GiB keeps a laptop demo receiving",
    )
    receiver_max_used_percent: float = Field(
        default=100.0,
        gt=0,
        le=100,
        description="Above this share of the spool's disk in use the receiver refuses as above; "
        "100 turns the check off (75 on a volume dedicated to the spool, as MONAI Informatics "
        "Gateway does)",
    )
    session_idle_minutes: float = Field(
        default=30.0,
        gt=0,
        description="A dashboard session idle this long ends: the open page is cleared and the "
        "browser must log in again",
    )
    session_secret: SecretStr = Field(
        default=SecretStr(""),
        description="Key that signs the dashboard's session cookie; empty: a random key per "
        "dashboard process (sessions then end when the dashboard restarts). Set it when several "
        "dashboard processes serve one site",
    )
    login_free_failures: int = Field(
        default=5,
        ge=1,
        description="Consecutive wrong passwords for one user name from one client address "
        "before each further attempt must wait (login_delay_seconds, doubling)",
    )
    login_delay_seconds: float = Field(
        default=2.0, gt=0, description="The first wait after login_free_failures wrong passwords"
    )
    login_max_delay_minutes: float = Field(
        default=15.0,
        gt=0,
        description="The longest wait between login attempts; failures older than this are "
        "forgotten",
    )
    password_min_length: int = Field(default=12, ge=8, description="Shortest password accepted")
    password_min_strength: int = Field(
        default=3,
        ge=0,
        le=4,
        description="Least zxcvbn strength score (0-4) a new password must reach: common "
        "passwords, names and keyboard patterns score low",
    )
    dashboard_tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate (chain) for HTTPS on the dashboard; with "
        "dashboard_tls_key_file, `radflow dashboard` serves https:// only",
    )
    dashboard_tls_key_file: Path | None = Field(
        default=None, description="PEM private key of dashboard_tls_cert_file"
    )
    dashboard_trusted_proxies: str = Field(
        # The dashboard listens on both IP versions: IPv4 clients arrive as ::ffff:a.b.c.d.
        default="127.0.0.1,::1,::ffff:127.0.0.1",
        description="Comma-separated addresses (or networks, or *) of the reverse proxies whose "
        "X-Forwarded-For and X-Forwarded-Proto the dashboard believes: behind an HTTPS proxy "
        "its cookies are then Secure, and logins are throttled and audited per real client "
        "address rather than per proxy. Only a proxy no browser can bypass belongs here",
    )
    batch_size: int = Field(default=32, ge=1, description="Scoring and training batch size")
    promotion_alpha: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="Significance level of the one-sided DeLong test a new model version must "
        "pass (AUC higher than the champion's on the evaluation set) to become champion",
    )
    max_variant_auc_drop: float = Field(
        default=0.005,
        ge=0,
        lt=1,
        description="Largest AUC loss a compressed runtime variant (ONNX fp32, int8) may show "
        "against its version's PyTorch fp32 scores on the same evaluation studies to be "
        "allowed to serve",
    )
    retrain_after_labels: int = Field(
        default=50,
        ge=1,
        description="Retraining starts by itself once this many new labels for a task have "
        "arrived since its last training",
    )
    mask_upload_max_bytes: int = Field(
        default=32 * 1024**2,
        gt=0,
        description="Largest mask file (PNG, NIfTI, DICOM SEG) a reviewer may upload on the "
        "study page; a bigger one is refused",
    )
    torch_threads: int = Field(
        default=1,
        ge=0,
        description="CPU threads PyTorch uses for training and scoring (0: PyTorch's default, one "
        "per core). Small images train fastest on one thread on a few shared cores; raise it on "
        "large machines",
    )
    delivery_max_attempts: int = Field(
        default=6,
        ge=1,
        description="Attempts to send a result (SR, SEG) to a destination before it is parked: "
        "listed with its reason on the pipeline page and re-sent from there",
    )
    delivery_retry_seconds: float = Field(
        default=30.0,
        ge=0,
        description="Wait before retrying a failed send; doubles with every attempt, up to "
        "delivery_retry_max_seconds",
    )
    delivery_retry_max_seconds: float = Field(
        default=3600.0, ge=0, description="Longest wait between two attempts to send a result"
    )
    delivery_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Connection, association and C-STORE response timeout when sending results",
    )
    gradcam: bool = Field(
        default=True, description="Store a Grad-CAM heat map with every classification prediction"
    )
    seed: int = 0
    dask_address: str | None = Field(
        default=None,
        description="Scheduler of a Dask cluster (tcp://host:8786): the process flow then "
        "scores a backlog in shards on its workers; unset, it scores in its own process",
    )
    dask_shard_studies: int = Field(
        default=256, ge=1, description="Studies per Dask shard of a scoring backlog"
    )
    worker_poll_seconds: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="How often `radflow worker` asks the Prefect server for runs to start: "
        "part of every study's latency (Prefect's own default is 10 s)",
    )
    worker_listens: bool = Field(
        default=True,
        description="A process-pool `radflow worker` scores stable studies in its own, warm, "
        "process (one worker at a time, flows/listener.py) instead of starting a flow run "
        "process (~8 s of imports on 2 cores) per event; false: every study waits for a run",
    )

    @model_validator(mode="after")
    def _fill_derived(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'radflow.db'}"
        if not self.store_url:
            self.store_url = str(self.data_dir / "objects")
        if self.inbox_dir is None:
            self.inbox_dir = self.data_dir / "inbox"
        if self.quarantine_dir is None:
            self.quarantine_dir = self.data_dir / "quarantine"
        if self.pseudonym_key_file is None:
            self.pseudonym_key_file = self.data_dir / "pseudonym.key"
        if not self.pseudonym_key.get_secret_value() and self.pseudonym_key_file.is_file():
            key = self.pseudonym_key_file.read_text().strip()
            self.pseudonym_key = SecretStr(key)
        if not self.pseudonym_key.get_secret_value():
            self.pseudonym_key = SecretStr(DEVELOPMENT_PSEUDONYM_KEY)
        _both_or_neither(self.dashboard_tls_cert_file, self.dashboard_tls_key_file, "dashboard")
        _both_or_neither(self.receiver_tls_cert_file, self.receiver_tls_key_file, "receiver")
        if self.receiver_tls_ca_file is not None and self.receiver_tls_cert_file is None:
            raise ValueError(
                "RADFLOW_RECEIVER_TLS_CA_FILE requires client certificates, which needs TLS: set "
                "RADFLOW_RECEIVER_TLS_CERT_FILE and RADFLOW_RECEIVER_TLS_KEY_FILE too (the "
                "receiver's own certificate and key), or unset RADFLOW_RECEIVER_TLS_CA_FILE"
            )
        return self

    def require_pseudonym_key(self) -> None:
        """Refuse the public development key: what handles real patient data calls this first.

        The receiver, ingest, watch folder, dataset import, export and the flow worker call it
        at their entry points; ``radflow demo`` writes a random key into its data dir instead.
        """
        if self.pseudonym_key.get_secret_value() == DEVELOPMENT_PSEUDONYM_KEY:
            raise InsecureSettings(
                "RADFLOW_PSEUDONYM_KEY is the public development key, with which anyone can "
                "recompute patient pseudonyms; set RADFLOW_PSEUDONYM_KEY (or "
                f"RADFLOW_PSEUDONYM_KEY_FILE, default {self.pseudonym_key_file}) to a long random "
                "secret, e.g. `openssl rand -hex 32`, and keep it: changing it changes every "
                "pseudonym"
            )

    @property
    def quarantine(self) -> Path:
        assert self.quarantine_dir is not None  # filled by the validator
        return self.quarantine_dir

    @property
    def spool(self) -> Path:
        return self.spool_dir.expanduser() if self.spool_dir else self.data_dir / "spool"

    @property
    def inbox(self) -> Path:
        assert self.inbox_dir is not None  # filled by the validator
        return self.inbox_dir

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"
