"""Serve the pipeline flow as a Prefect deployment on a cron or interval schedule.

The schedule comes from a YAML file (default: flows/schedule.yaml) whose keys are the fields of
``ScheduleConfig``; command-line flags override them. Scheduled runs need a real Prefect server
(``prefect server start --host 127.0.0.1`` and ``PREFECT_API_URL``): the temporary server that a plain flow
call starts cannot fire schedules, so serving refuses to start without one.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flows.repo import FlowError, ensure_repo

DEFAULT_CONFIG = Path(__file__).with_name("schedule.yaml")


@dataclass(frozen=True)
class ScheduleConfig:
    """A deployment of ``pipeline_flow``: its name, exactly one of ``cron`` / ``interval`` (seconds), the
    most runs at once, and the flow's parameters."""

    name: str = "diet-pipeline"
    cron: str | None = None
    interval: float | None = None
    timezone: str | None = None
    limit: int = 1
    parameters: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if (self.cron is None) == (self.interval is None):
            raise FlowError("a schedule needs exactly one of 'cron' and 'interval'",
                            "set e.g. cron: \"0 2 * * *\" (nightly) or interval: 3600 (seconds)")
        if self.interval is not None and (not isinstance(self.interval, (int, float)) or self.interval <= 0):
            raise FlowError(f"interval = {self.interval!r} must be a positive number of seconds", "set e.g. interval: 3600")
        if not isinstance(self.limit, int) or self.limit < 1:
            raise FlowError(f"limit = {self.limit!r} must be a positive integer", "set limit: 1")
        if self.cron is not None or self.timezone is not None:
            self._check_schedule()
        from flows.pipeline import pipeline_flow

        known = list(inspect.signature(pipeline_flow.fn).parameters)
        for key in self.parameters:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                raise FlowError(f"unknown pipeline parameter '{key}' in the schedule",
                                f"did you mean '{close[0]}'?" if close else f"use: {', '.join(known)}")


    def _check_schedule(self) -> None:
        """The cron expression and the timezone as Prefect's schedules read them (refused here, not as a
        traceback when the deployment is created)."""
        from pydantic import ValidationError
        from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

        try:
            if self.cron is not None:
                CronSchedule(cron=self.cron, timezone=self.timezone)
            else:
                IntervalSchedule(interval=self.interval, timezone=self.timezone)
        except (ValidationError, ValueError) as e:
            what = f"cron = {self.cron!r}" if self.cron is not None else f"timezone = {self.timezone!r}"
            problem = str(e.errors()[0]["msg"]) if isinstance(e, ValidationError) else str(e)
            raise FlowError(f"{what} is not a valid schedule: {problem}",
                            'write five cron fields, e.g. cron: "0 2 * * *" (02:00 every day), and an IANA '
                            "timezone such as Europe/Berlin (or none: UTC)") from None

def load_schedule(path: str | Path | None = None, *, name: str | None = None, cron: str | None = None,
                  interval: float | None = None, repo: str | None = None) -> ScheduleConfig:
    """Read a schedule file; the given arguments replace its values (``cron`` or ``interval`` replaces the
    file's schedule, ``repo`` its ``parameters.repo``). ``repo`` is resolved to an absolute path."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise FlowError(f"schedule file not found: {path}", f"pass --config PATH, or copy {DEFAULT_CONFIG}")
    data = yaml.safe_load(path.read_text()) or {}
    known = [f.name for f in dataclasses.fields(ScheduleConfig)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise FlowError(f"{path}: unknown key '{key}'",
                            f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}")
    if name is not None:
        data["name"] = name
    if cron is not None:
        data.update(cron=cron, interval=None)
    elif interval is not None:
        data.update(cron=None, interval=interval)
    params = dict(data.get("parameters") or {})
    params["repo"] = str(Path(repo if repo is not None else params.get("repo", ".")).expanduser().resolve())
    data["parameters"] = params
    config = ScheduleConfig(**data)
    config.validate()
    return config


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def serve_pipeline(config: ScheduleConfig) -> None:
    """Register the deployment on the Prefect server and run its scheduled flow runs until interrupted."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron, Interval

    from flows.pipeline import pipeline_flow

    if not api_url():
        raise FlowError("schedules need a Prefect server, and PREFECT_API_URL is not set",
                        "start one with `prefect server start --host 127.0.0.1`, then "
                        "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (or your team server's URL)")
    ensure_repo(config.parameters["repo"])
    schedule = (Cron(config.cron, timezone=config.timezone) if config.cron is not None
                else Interval(config.interval, timezone=config.timezone))
    pipeline_flow.serve(name=config.name, schedules=[schedule], parameters=config.parameters,
                        limit=config.limit, description="The DIET pipeline (DVC stages) on a schedule",
                        tags=["diet"], entrypoint_type=EntrypointType.MODULE_PATH)
