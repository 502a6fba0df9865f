"""Coordinator configuration (`federation.toml`): the stage plan, SuperLink, retries, metrics — validated once.

Layout (paths are relative to the TOML file's folder)::

    run_name = "invcoss"          # prefix of the run id
    state_dir = "state"           # durable run state, checkpoints, SuperLink database, logs
    profile = "tiny"              # model/training preset shared by every stage
    [defaults]                    # StageConfig overrides for every stage, e.g. replay = { strategy = "inversion" }
    [superlink]                   # host, port, address, certs_dir, node_auth, restart_limit, artifact_part_mib
    [retry]                       # max_attempts, backoff_s, backoff_factor, stage_timeout_s, message_ttl_s, ...
    [metrics]                     # enabled, host, port
    [[stages]]                    # in order: site, optional modality, optional per-stage overrides
    site = "A"
    modality = "ct"
    [[stages]]                    # a consortium stage: FedAvg rounds across hospitals of one modality
    sites = ["B1", "B2"]
    modality = "mri"
    rounds = 3                    # FedAvg rounds; local_steps (or local_epochs) of training per site and round
    local_steps = 50
    min_sites = 1                 # a round counts when this many sites answered (default: all)
    inversion_site = "B1"         # inverts the aggregated model and signs the stage's artifact (default: first)
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from invcoss_core.config import (
    MODALITIES,
    ConfigError,
    ProfileName,
    StageConfig,
    build_config,
    deep_merge,
    format_validation_error,
    read_toml,
)

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_site_name(name: str) -> str:
    """Validate a site name (letters, digits, `-`, `_`; at most 64 characters).

    Raises:
        ValueError: for any other name.
    """
    if not SITE_NAME.match(name):
        raise ValueError(f"site name {name!r} must be 1-64 letters, digits, '-' or '_' and start with a letter/digit")
    return name


class SuperLinkSettings(_Frozen):
    """How the coordinator runs its Flower SuperLink (always TLS; node authentication on by default)."""

    host: str = "127.0.0.1"  # bind address of the SuperLink's HTTPS port (0.0.0.0 in a container)
    port: int = Field(9093, ge=1, le=65535)  # the one port that serves Fleet, Control and Runtime APIs
    address: str | None = None  # how the coordinator's own tools dial it; default 127.0.0.1:<port>
    certs_dir: Path = Path("certs")  # ca.crt, server.pem, server.key (`invcoss-server certs`)
    node_auth: bool = True  # only enrolled site keys may connect
    restart_limit: int = Field(3, ge=0)  # restarts of a crashed SuperLink before the coordinator gives up
    startup_timeout_s: float = Field(60.0, gt=0)
    # Artifact files above this size travel ahead of their stage message as `train.part` messages of at most this
    # size: Flower holds a message whole, several times over, in every process it passes
    # (docs/results/real-sizes/handoff.md).
    artifact_part_mib: float = Field(256.0, gt=0)

    @property
    def part_bytes(self) -> int:
        """`artifact_part_mib` in bytes (at least one)."""
        return max(1, int(self.artifact_part_mib * (1 << 20)))

    @property
    def dial_address(self) -> str:
        """HOST:PORT the coordinator's tools (and the ServerApp) use."""
        return self.address or f"127.0.0.1:{self.port}"


class RetrySettings(_Frozen):
    """Stage retries: a failed or timed-out stage is sent again with exponential backoff."""

    max_attempts: int = Field(3, ge=1)  # attempts per stage, the first included
    backoff_s: float = Field(5.0, ge=0)  # wait before the second attempt
    backoff_factor: float = Field(2.0, ge=1)
    max_backoff_s: float = Field(300.0, ge=0)
    stage_timeout_s: float = Field(3600.0, gt=0)  # longest wait for one attempt's reply
    message_ttl_s: float | None = Field(None, gt=0)  # Flower message ttl; default stage_timeout_s + 600
    node_wait_s: float = Field(600.0, gt=0)  # how long a stage waits for its site to come online
    all_sites_wait_s: float = Field(30.0, ge=0)  # consortium rounds: wait this long for every site, then go on
    # with at least min_sites
    poll_interval_s: float = Field(1.0, gt=0)
    serverapp_restarts: int = Field(3, ge=0)  # resubmissions of a ServerApp that died mid-plan

    @model_validator(mode="after")
    def _ttl_covers_timeout(self) -> RetrySettings:
        if self.message_ttl_s is not None and self.message_ttl_s < self.stage_timeout_s:
            raise ValueError(
                f"message_ttl_s {self.message_ttl_s} must be at least stage_timeout_s {self.stage_timeout_s}: "
                "a message must outlive the longest stage"
            )
        return self

    @property
    def ttl_s(self) -> float:
        """The message ttl in seconds."""
        return self.message_ttl_s or self.stage_timeout_s + 600.0

    def backoff(self, failed_attempts: int) -> float:
        """Seconds to wait after `failed_attempts` failures (1 → backoff_s)."""
        return min(self.max_backoff_s, self.backoff_s * self.backoff_factor ** max(0, failed_attempts - 1))


class MetricsSettings(_Frozen):
    """Prometheus `/metrics` of the long-lived process."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9400, ge=0, le=65535)  # 0: pick a free port (tests)


class StagePlan(_Frozen):
    """One stage of the plan: which site(s) train, on which modality, with which extra settings.

    `site = "A"` is a one-site stage (today's hand-off). `sites = ["A1", "A2"]` is a consortium stage (DESIGN §7):
    `rounds` FedAvg rounds of `local_steps` steps (or `local_epochs` passes over each site's images) per site,
    completed when at least `min_sites` sites answered; `inversion_site` (default the first) inverts the
    aggregated model and signs the stage's artifact.
    """

    site: str | None = None
    sites: list[str] | None = None
    modality: str | None = None  # when set, the site(s) must train this modality
    rounds: int = Field(1, ge=1)  # FedAvg rounds (consortium stages)
    local_steps: int | None = Field(None, gt=0)  # optimiser steps per site per round; None: local_epochs
    local_epochs: int = Field(1, gt=0)  # with local_steps unset: passes over the site's images per round
    min_sites: int | None = Field(None, ge=1)  # sites that must answer for a round to count; None: all
    inversion_site: str | None = None  # the site that inverts and signs; None: the first of `sites`
    secure_aggregation: bool = False  # see docs/federation.md: not offered with Flower 1.42 (refused)
    overrides: dict[str, Any] = Field(default_factory=dict)  # StageConfig overrides for this stage only

    @field_validator("site")
    @classmethod
    def _site(cls, value: str | None) -> str | None:
        return check_site_name(value) if value is not None else None

    @field_validator("sites")
    @classmethod
    def _sites(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("'sites' must name at least one site")
        for name in value:
            check_site_name(name)
        duplicates = sorted({n for n in value if value.count(n) > 1})
        if duplicates:
            raise ValueError(f"'sites' names {', '.join(duplicates)} more than once")
        return value

    @field_validator("modality")
    @classmethod
    def _modality(cls, value: str | None) -> str | None:
        if value is not None and value not in MODALITIES:
            raise ValueError(f"modality {value!r} is not one of {', '.join(MODALITIES)}")
        return value

    @model_validator(mode="after")
    def _consortium(self) -> StagePlan:
        if (self.site is None) == (self.sites is None):
            raise ValueError("give exactly one of 'site' (one site) or 'sites' (a consortium stage)")
        names = self.site_names
        if self.min_sites is not None and self.min_sites > len(names):
            raise ValueError(f"'min_sites' = {self.min_sites} is larger than the {len(names)} site(s) of the stage")
        if self.inversion_site is not None and self.inversion_site not in names:
            raise ValueError(
                f"'inversion_site' = {self.inversion_site!r} is not one of the stage's sites ({', '.join(names)})"
            )
        if self.secure_aggregation:
            raise ValueError(
                "'secure_aggregation' is not available: Flower 1.42's SecAgg+ works only with its legacy "
                "strategy workflow and numeric-only parameters, not with this plan's signed Message API rounds "
                "(docs/federation.md, 'Secure aggregation'); remove the key"
            )
        if self.sites is not None and self.modality is None:
            raise ValueError("a consortium stage ('sites = [...]') must say its 'modality'")
        if self.sites is None and (self.rounds > 1 or self.local_steps is not None or self.min_sites is not None):
            raise ValueError("'rounds', 'local_steps' and 'min_sites' need 'sites = [...]' (a consortium stage)")
        return self

    @property
    def site_names(self) -> list[str]:
        """The stage's sites in order (one for a one-site stage)."""
        return list(self.sites) if self.sites is not None else [self.site or ""]

    @property
    def is_consortium(self) -> bool:
        """True when the stage runs FedAvg rounds (a `sites = [...]` stage, even of one site)."""
        return self.sites is not None

    @property
    def signer(self) -> str:
        """The site that signs the stage's artifact: the inversion site (or the one site)."""
        return self.inversion_site or self.site_names[0]

    @property
    def required_sites(self) -> int:
        """Sites that must answer for a round to count."""
        return self.min_sites or len(self.site_names)


class FederationConfig(_Frozen):
    """Everything `invcoss-server` needs; see the module docstring for the TOML layout."""

    run_name: str = Field("invcoss", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    state_dir: Path = Path("state")
    profile: ProfileName = "tiny"
    defaults: dict[str, Any] = Field(default_factory=dict)  # StageConfig overrides for every stage
    superlink: SuperLinkSettings = Field(default_factory=lambda: SuperLinkSettings())
    retry: RetrySettings = Field(default_factory=lambda: RetrySettings())
    metrics: MetricsSettings = Field(default_factory=lambda: MetricsSettings())
    stages: list[StagePlan] = Field(min_length=1)

    @model_validator(mode="after")
    def _site_once_per_modality(self) -> FederationConfig:
        seen: dict[str, tuple[int, str | None]] = {}
        for index, stage in enumerate(self.stages, start=1):
            for name in stage.site_names:
                if name in seen:
                    first, modality = seen[name]
                    if modality is None or stage.modality is None or modality == stage.modality:
                        raise ValueError(
                            f"stages.{index}: site {name!r} is also in stage {first}; a site may join two stages "
                            "only for two different modalities (set 'modality' on both)"
                        )
                seen[name] = (index, stage.modality)
        return self

    def stage_overrides(self, index: int) -> dict[str, Any]:
        """The StageConfig overrides sent to the site of stage `index` (1-based): defaults, then the stage's."""
        return deep_merge(self.defaults, self.stages[index - 1].overrides)

    def stage_config(self, index: int) -> StageConfig:
        """The validated StageConfig of stage `index` as the coordinator plans it (sites may add local settings).

        Raises:
            ConfigError: when the merged settings are invalid.
        """
        return build_config(self.profile, self.stage_overrides(index), source=f"stage {index} of the plan")

    def plan_sha256(self) -> str:
        """Digest of what defines the run's content (profile, defaults and stages): a changed plan is a new run."""
        blob = json.dumps(
            {
                "profile": self.profile,
                "defaults": self.defaults,
                "stages": [s.model_dump(mode="json") for s in self.stages],
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def parse_federation_config(data: dict[str, Any], source: str, base_dir: Path) -> FederationConfig:
    """Validate a federation mapping; relative paths are resolved against `base_dir`.

    Raises:
        ConfigError: naming `source` and the offending key (including per-stage StageConfig keys).
    """
    try:
        cfg = FederationConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    for index, stage in enumerate(cfg.stages, start=1):
        try:
            stage_cfg = cfg.stage_config(index)
        except ConfigError as err:
            raise ConfigError(f"{source}: [[stages]] #{index} (site {', '.join(stage.site_names)}) — {err}") from None
        if stage.is_consortium and stage_cfg.replay.strategy not in ("none", "ewc", "inversion", "pixel_inversion"):
            raise ConfigError(f"{source}: [[stages]] #{index}: replay {stage_cfg.replay.strategy!r} in a consortium")
        if stage_cfg.replay.strategy == "real_buffer":
            raise ConfigError(
                f"{source}: 'replay.strategy' = 'real_buffer' ships real images; sites refuse it. "
                "Use inversion (the product), ewc or none."
            )
    superlink = cfg.superlink.model_copy(update={"certs_dir": _resolve(base_dir, cfg.superlink.certs_dir)})
    return cfg.model_copy(update={"state_dir": _resolve(base_dir, cfg.state_dir), "superlink": superlink})


def load_federation_config(path: Path) -> FederationConfig:
    """Read and validate `federation.toml`.

    Raises:
        ConfigError: naming the file and the key that is wrong.
    """
    path = Path(path)
    return parse_federation_config(read_toml(path), str(path), path.resolve().parent)
