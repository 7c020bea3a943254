"""Typed run configuration, loaded from YAML.

One file describes a whole run: the run-level settings (where outputs go, which Ray cluster), the shared
sections (face, model, quality) and one section per registered step, whose model lives in the step's
package. Unknown keys are rejected and every error names the offending key and value.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

from infu.face.config import FaceConfig
from infu.model.config import ModelConfig
from infu.paths import ResolvedPath
from infu.quality.config import QualityConfig

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key and value at fault."""


class Section(BaseModel):
    """A strict, immutable config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StageResources(Section):
    """Overrides for one stage of a step (unset fields follow the step's resources)."""

    concurrency: int | None = Field(None, ge=1)
    num_cpus: float | None = Field(None, gt=0)
    num_gpus: float | None = Field(None, ge=0)


class JobResources(Section):
    """What a step's Ray job driver (its entrypoint) reserves, and the runtime env it runs in.

    The driver of most steps only plans and commits (its workers hold the GPUs); a step whose driver
    loads a model reserves GPUs here so Ray places it on a GPU node. ``runtime_env`` is Ray's (``pip``,
    ``env_vars``, ``image_uri``...)."""

    num_cpus: float = Field(0, ge=0, description="CPUs the job's driver reserves (Ray: entrypoint_num_cpus)")
    num_gpus: float = Field(0, ge=0, description="GPUs the job's driver reserves (entrypoint_num_gpus)")
    memory_gb: float = Field(0, ge=0, description="memory the driver reserves, GiB (entrypoint_memory)")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources the driver needs (entrypoint_resources)"
    )
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="the job's Ray runtime env")


class Resources(Section):
    """How a step runs on Ray; never part of a step's identity.

    ``concurrency``, ``num_cpus`` and ``num_gpus`` apply to each stage of the step (CPU-only stages such
    as decoding never reserve GPUs); ``stages.<name>`` overrides them for one stage.
    """

    concurrency: int = Field(2, ge=1, description="parallel workers (Ray actors) per stage")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per worker of the model stages")
    batch_size: int = Field(32, ge=1, description="samples handed to a stage at once (one chunk)")
    retries: int = Field(
        2, ge=0, description="retries of a failing chunk before its shard is recorded failed"
    )
    stages: dict[str, StageResources] = Field(default_factory=dict, description="per-stage overrides")
    job: JobResources = JobResources()


class RunSettings(Section):
    """Run-level settings: where outputs go and which cluster runs the jobs."""

    name: str = Field("embedded", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    profile: Literal["embedded", "production"] = "embedded"
    run_dir: ResolvedPath = Path("runs/embedded")
    ray_address: str | None = Field(
        None,
        description="Ray dashboard address (http://host:8265) to submit jobs to; null = a local Ray "
        "started by the flow",
    )
    job_timeout_s: float = Field(6 * 3600, gt=0, description="a step's Ray job fails after this long")
    python: str | None = Field(
        None, description="interpreter that runs step jobs; null = this one locally, `python` on a cluster"
    )
    job_retries: int = Field(1, ge=0, description="the flow reruns a failed step job this many times")
    retry_delay_s: float = Field(10, ge=0, description="seconds before a failed step job is rerun")


class InfuConfig(Section):
    """A whole run: the shared sections here, one section per registered step (see :mod:`infu.steps`).

    Load it with :func:`load_config` or :func:`config_from_dict`, which validate against the model built
    from the step registry (this base class alone knows no step sections).
    """

    run: RunSettings = RunSettings()
    face: FaceConfig = FaceConfig()
    model: ModelConfig = ModelConfig()
    quality: QualityConfig = QualityConfig()

    def step(self, name: str) -> Any:
        """The config section of step ``name``; a clear error when the file has none."""
        from infu.steps import get_step

        section_name = get_step(name).section
        section = getattr(self, section_name, None)
        if not isinstance(section, BaseModel):
            raise ConfigError(f"this config has no `{section_name}:` section, which the {name} step needs")
        return section

    def has_step(self, name: str) -> bool:
        from infu.steps import get_step

        return isinstance(getattr(self, get_step(name).section, None), BaseModel)

    def step_hash(self, name: str) -> str:
        """The step's identity: what determines its output (see :func:`infu.lineage.step_identity`)."""
        from infu.lineage import step_identity

        return step_identity(self, name)

    def step_dir(self, name: str) -> Path:
        return self.run.run_dir / name


@functools.cache
def config_model() -> type[InfuConfig]:
    """``RunConfig``: :class:`InfuConfig` with one optional field per registered step section."""
    from infu.steps import registry

    fields: dict[str, Any] = {}
    for spec in registry().values():
        fields[spec.section] = (spec.section_model | None, None)
    return create_model("RunConfig", __base__=InfuConfig, __module__=__name__, **fields)


def __getattr__(name: str) -> Any:
    """``infu.config.RunConfig`` is built on first use, so configs pickle and unpickle in any process."""
    if name == "RunConfig":
        return config_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _describe(errors: list[dict[str, Any]]) -> str:
    lines = []
    for error in errors:
        key = ".".join(str(part) for part in error["loc"]) or "<root>"
        if error["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {error['input']!r})")
        else:
            lines.append(f"  {key}: {error['msg']} (got {error.get('input')!r})")
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: `{part}` is not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["ingest.shard_size=8", "run.run_dir=/tmp/x"]`` -> (key, YAML-parsed value) pairs."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or "cannot be parsed"
            raise ConfigError(
                f"override {key.strip()}: value {raw!r} is not valid YAML ({problem})"
            ) from None
        parsed.append((key.strip(), value))
    return parsed


def config_from_dict(data: dict[str, Any], origin: str = "<dict>") -> InfuConfig:
    model = config_model()
    unknown = sorted(set(data) - set(model.model_fields))
    if unknown:
        raise ConfigError(
            f"invalid config {origin}:\n"
            + "\n".join(
                f"  {key}: unknown section (known: {', '.join(model.model_fields)})" for key in unknown
            )
        )
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"invalid config {origin}:\n{redact_secrets(_describe(error.errors()))}") from None


def _is_pinned(key: str, pinned: set[str]) -> bool:
    return any(key == other or key.startswith(f"{other}.") for other in pinned)


def _move_run_paths(node: Any, key: str, old: Path, new: Path, pinned: set[str]) -> Any:
    """``node`` with every path inside ``old`` moved to the same place inside ``new``, except at keys
    set on the command line (``pinned``)."""
    if _is_pinned(key, pinned):
        return node
    if isinstance(node, Path):
        return new / node.relative_to(old) if node.is_relative_to(old) else node
    if not isinstance(node, BaseModel):
        return node
    update = {}
    for name in type(node).model_fields:
        value = getattr(node, name)
        moved = _move_run_paths(value, f"{key}.{name}" if key else name, old, new, pinned)
        if moved is not value:
            update[name] = moved
    return node.model_copy(update=update) if update else node


def _file_run_dir(data: dict[str, Any]) -> Path | None:
    """The run folder the config file itself names (its default when it names none)."""
    run = data.get("run")
    raw = run.get("run_dir") if isinstance(run, dict) else None
    if raw is None:
        raw = RunSettings.model_fields["run_dir"].default
    try:
        return TypeAdapter(ResolvedPath).validate_python(raw)
    except ValidationError:
        return None  # reported by the validation of the whole file


def load_yaml_model(model: type[ModelT], source: Path, what: str) -> ModelT:
    """A strict pydantic ``model`` read from the YAML file ``source`` (a packaged definition: prompt bank,
    benchmark); a ``ValueError`` naming ``what`` and the file otherwise."""
    data = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{what} {source}: expected a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ValueError(f"{what} {source} is invalid: {error}") from error


def load_config(path: str | Path, overrides: list[str] | None = None) -> InfuConfig:
    """Read a YAML run config, apply ``key=value`` overrides, validate.

    Relative paths resolve against the working directory. Paths inside the file's ``run.run_dir``
    belong to the run: when an override moves the run folder they move with it, unless they are
    overridden too. ``${env:NAME}`` in a string value is replaced by the environment variable ``NAME``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    data = _expand_environment(data, "")
    file_run_dir = _file_run_dir(data)
    pinned = set()
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, _expand_environment(value, key))
        pinned.add(key)
    config = config_from_dict(data, str(path))
    if file_run_dir is not None and file_run_dir != config.run.run_dir:
        config = _move_run_paths(config, "", file_run_dir, config.run.run_dir, pinned | {"run.run_dir"})
    return config


def load_config_or_exit(path: str | Path, overrides: list[str] | None = None) -> InfuConfig:
    """:func:`load_config` for command lines: a bad config prints its error and exits with status 2."""
    try:
        return load_config(path, overrides)
    except ConfigError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from None


_ENV_REFERENCE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_environment(node: Any, key: str) -> Any:
    """``node`` (parsed YAML at dotted ``key``) with every ``${env:NAME}`` in its strings replaced by the
    environment variable ``NAME``; an unset one is a config error naming the key."""
    if isinstance(node, dict):
        return {
            name: _expand_environment(value, f"{key}.{name}" if key else str(name))
            for name, value in node.items()
        }
    if isinstance(node, list):
        return [_expand_environment(value, f"{key}[{position}]") for position, value in enumerate(node)]
    if not isinstance(node, str):
        return node

    def value_of(match: re.Match[str]) -> str:
        if match[1] not in os.environ:
            raise ConfigError(f"{key}: environment variable {match[1]} (from {match[0]}) is not set")
        return os.environ[match[1]]

    return _ENV_REFERENCE.sub(value_of, node)


def credentials_to_environment(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """``key=value`` overrides whose value holds URL credentials replaced by ``key=${env:INFU_SECRET_<KEY>}``,
    and the environment variables that resolve them: the overrides can then be stored (as Prefect stores
    flow parameters) without the credentials."""
    public, environment = [], {}
    for item in overrides:
        key, _, value = item.partition("=")
        if not _has_credentials(value):
            public.append(item)
            continue
        name = "INFU_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", key.strip()).upper()
        environment[name] = value
        public.append(f"{key}=${{env:{name}}}")
    return public, environment


def refuse_credentials(values: list[str], what: str) -> None:
    """A config error when one of ``values`` (to be stored, e.g. flow parameters) holds URL credentials."""
    exposed = [redact_secrets(value) for value in values if _has_credentials(value)]
    if exposed:
        raise ConfigError(
            f"{what} would store credentials in clear text: {', '.join(exposed)}; put them in an "
            "environment variable and pass ${env:NAME} instead"
        )


_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s?#\"']*)@")


def _redact_userinfo(match: re.Match[str]) -> str:
    user, has_password, _ = match["userinfo"].partition(":")
    return f"{match['scheme']}{user}:***@" if has_password else f"{match['scheme']}***@"


def _has_credentials(text: str) -> bool:
    return redact_secrets(text) != text


def redact_secrets(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``:
    ``http://admin:S3cr3t@host:8265`` -> ``http://admin:***@host:8265``, ``https://TOKEN@host`` ->
    ``https://***@host``."""
    return _URL_USERINFO.sub(_redact_userinfo, text)


def dump_config(config: InfuConfig) -> str:
    """The effective config as YAML (what a job actually ran with), credentials redacted."""
    return redact_secrets(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
