"""Site configuration (`site.toml`): who the site is, where its data and key are, how it reaches the coordinator.

Layout (paths are relative to the TOML file's folder)::

    site = "A"                     # the enrolled site name (must match `--site`)
    modality = "ct"                # what this site's images are
    data_dir = "data"              # the site's image folder (DIR/<modality>/ or the modality folder); never leaves
    work_dir = "work"              # checkpoints, stage outputs, audit log, events, SuperNode state
    private_key = "keys/site-a.key"  # EC P-384 key (`invcoss-client keygen`): node auth + artifact signatures
    device = "auto"                # auto, cpu, cuda, cuda:N
    [superlink]                    # address = "coordinator.example.org:9093", root_certificates = "certs/ca.crt"
    [supernode]                    # clientappio_port, activation_wait_s, restart_limit
    [metrics]                      # enabled, host, port
    [stage]                        # site-local StageConfig overrides applied over the coordinator's settings,
                                   # e.g. data = { samples_per_volume = 64 }, train = { num_workers = 4 },
                                   # devices = 2 (data-parallel processes: one per GPU, or CPU processes)
    [trust]                        # pinned_keys_dir: optional <site>.pub files of peer sites
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from invcoss_core.config import MODALITIES, ConfigError, format_validation_error, read_toml

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SuperLinkConnection(_Frozen):
    """How the SuperNode reaches the coordinator's SuperLink (TLS always)."""

    address: str = "127.0.0.1:9093"  # HOST:PORT of the Fleet API (the coordinator, or its fleet gateway)
    root_certificates: Path = Path("certs/ca.crt")  # the federation CA certificate from the coordinator

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address {value!r} must be HOST:PORT")
        return value


class SuperNodeSettings(_Frozen):
    """The local Flower SuperNode that `invcoss-client` supervises."""

    clientappio_port: int = Field(9094, ge=1, le=65535)  # loopback port of the SuperNode's app runtime API
    activation_wait_s: float = Field(120.0, gt=0)  # keep retrying a refused activation this long (see docs)
    restart_limit: int = Field(5, ge=0)  # restarts after unexpected SuperNode exits


class MetricsSettings(_Frozen):
    """Prometheus `/metrics` of `invcoss-client`."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9401, ge=0, le=65535)  # 0: pick a free port


class TrustSettings(_Frozen):
    """Optional pinning: when `<site>.pub` exists here, the coordinator-sent key of that site must equal it."""

    pinned_keys_dir: Path | None = None


class SiteConfig(_Frozen):
    """Everything `invcoss-client` and the site's ClientApp need; see the module docstring."""

    site: str
    modality: str
    data_dir: Path
    work_dir: Path = Path("work")
    private_key: Path
    device: str = "auto"
    superlink: SuperLinkConnection = Field(default_factory=lambda: SuperLinkConnection())
    supernode: SuperNodeSettings = Field(default_factory=lambda: SuperNodeSettings())
    metrics: MetricsSettings = Field(default_factory=lambda: MetricsSettings())
    stage: dict[str, Any] = Field(default_factory=dict)  # site-local StageConfig overrides
    trust: TrustSettings = Field(default_factory=lambda: TrustSettings())

    @field_validator("site")
    @classmethod
    def _site(cls, value: str) -> str:
        if not SITE_NAME.match(value):
            raise ValueError(f"site name {value!r} must be 1-64 letters, digits, '-' or '_'")
        return value

    @field_validator("modality")
    @classmethod
    def _modality(cls, value: str) -> str:
        if value not in MODALITIES:
            raise ValueError(f"modality {value!r} is not one of {', '.join(MODALITIES)}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not re.match(r"^cuda:\d+$", value):
            raise ValueError(f"device {value!r} must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("stage")
    @classmethod
    def _no_real_buffer(cls, value: dict[str, Any]) -> dict[str, Any]:
        replay = value.get("replay", {})
        if isinstance(replay, dict) and replay.get("strategy") == "real_buffer":
            raise ValueError("replay.strategy 'real_buffer' ships real images and is refused by the site client")
        return value


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def parse_site_config(data: dict[str, Any], source: str, base_dir: Path) -> SiteConfig:
    """Validate a site mapping; relative paths are resolved against `base_dir`.

    Raises:
        ConfigError: naming `source` and the offending key.
    """
    try:
        cfg = SiteConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    pinned = cfg.trust.pinned_keys_dir
    return cfg.model_copy(
        update={
            "data_dir": _resolve(base_dir, cfg.data_dir),
            "work_dir": _resolve(base_dir, cfg.work_dir),
            "private_key": _resolve(base_dir, cfg.private_key),
            "superlink": cfg.superlink.model_copy(
                update={"root_certificates": _resolve(base_dir, cfg.superlink.root_certificates)}
            ),
            "trust": TrustSettings(pinned_keys_dir=_resolve(base_dir, pinned) if pinned else None),
        }
    )


def load_site_config(path: Path, site: str | None = None) -> SiteConfig:
    """Read and validate `site.toml`; when `site` is given it must equal the file's `site`.

    Raises:
        ConfigError: naming the file and the key that is wrong.
    """
    path = Path(path)
    cfg = parse_site_config(read_toml(path), str(path), path.resolve().parent)
    if site is not None and site != cfg.site:
        raise ConfigError(f"{path}: 'site' is {cfg.site!r} but --site says {site!r}; use the enrolled site name")
    return cfg
