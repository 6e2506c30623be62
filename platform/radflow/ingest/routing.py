"""Routing: which image of a study a task looks at, or why the task does not apply.

The rules are data (YAML, ``routing_rules.yaml`` in this package by default, or
``settings.routing_file``), validated on load: a typo in a rule file is an error that names the
rule and the field, never a task that silently stops receiving studies.

The same file names the destinations results go back to (a PACS: AE title, host, port); a
rule's ``send_to`` lists those that receive the SR and SEG of the studies it routes
(radflow.delivery).

A rule looks at a series' attributes and at its first image only. Scoring and training route
thousands of studies at a time, so they read just that (:func:`candidates`: one query for a
whole batch of studies, no ORM objects, never every instance of a 500-slice CT series);
:func:`route` takes a loaded ORM study, for one study at hand.

A task that takes a whole series (classification-3d, sequence-classification) goes one step
further (:func:`route_studies`): each series a rule matches is checked to be one volume
(radflow.dicom.geometry) from its instances' rows in the index, one query for the batch and no
file read; the first that is one becomes the task's input, and a study where none is shows
each series' reason (missing slices, mixed orientations...) like any other "no applicable
model".
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Protocol

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from radflow.db import Instance, Series, Study
from radflow.dicom.geometry import SeriesPlan, Slice, plan_series
from radflow.errors import NotAVolume, RadflowError
from radflow.learning.tasks import TASKS, Task
from radflow.settings import MAX_VOLUME_VOXELS, Settings

Size = Annotated[int, Field(ge=1)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]


def _ae_title(value: str) -> str:
    # PS3.5 6.2: 1-16 characters of the default repertoire without backslash, not all spaces;
    # leading and trailing spaces are not significant.
    title = value.strip()
    if not 1 <= len(title) <= 16 or not re.fullmatch(r"[ -\[\]-~]+", title):
        raise ValueError(
            f"{value!r} is not an AE title: 1 to 16 printable ASCII characters, no backslash"
        )
    return title


AETitle = Annotated[str, AfterValidator(_ae_title)]


class SeriesAttributes(Protocol):
    """What a rule reads of a series (an ORM Series, or a :class:`SeriesView`)."""

    @property
    def modality(self) -> str | None: ...
    @property
    def body_part(self) -> str | None: ...
    @property
    def description(self) -> str | None: ...
    @property
    def image_type(self) -> str | None: ...
    @property
    def number(self) -> int | None: ...
    @property
    def id(self) -> int: ...


class Image(Protocol):
    """What a rule reads of a series' first image, and what a task then loads (ORM Instance, or
    :class:`FirstImage`)."""

    @property
    def rows(self) -> int | None: ...
    @property
    def columns(self) -> int | None: ...
    @property
    def sha256(self) -> str: ...
    @property
    def object_key(self) -> str: ...


@dataclass(frozen=True)
class SeriesView:
    modality: str | None
    body_part: str | None
    description: str | None
    image_type: str | None
    number: int | None
    id: int = 0  # the series' row, whose instances a series task plans as a volume


@dataclass(frozen=True)
class FirstImage:
    rows: int | None
    columns: int | None
    sha256: str
    object_key: str


Candidate = tuple[SeriesAttributes, Image | None]
"""A series of a study and its first image (None for a series without instances)."""


class InvalidRoutingRules(RadflowError):
    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"routing rules {source}: {problem}; fix the file (RADFLOW_ROUTING_FILE)")


def _stow_url(value: str) -> str:
    if not re.fullmatch(r"https?://[^/@\s]+(/\S*)?", value):
        raise ValueError(
            f"{value!r} is not a STOW-RS URL: http(s)://host[:port]/path, without credentials"
        )
    return value


StowUrl = Annotated[str, AfterValidator(_stow_url)]


class Destination(BaseModel):
    """A node results are sent to: a PACS, a viewer, a research archive.

    By DICOM C-STORE to ``ae_title`` at ``host``:``port``, or, when ``stow_url`` is given, by
    DICOMweb STOW-RS to that URL (e.g. ``http://pacs:8042/dicom-web/studies``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    ae_title: AETitle | None = None
    host: str | None = Field(
        default=None, min_length=1, max_length=255, pattern=r"^[A-Za-z0-9.:\[\]_-]+$"
    )
    port: int | None = Field(default=None, ge=1, le=65535)
    calling_ae_title: AETitle | None = None
    """The AE title Radflow calls with; default the receiver's (RADFLOW_RECEIVER_AE_TITLE)."""
    stow_url: StowUrl | None = None
    """Send by STOW-RS to this URL instead of by C-STORE."""

    @model_validator(mode="after")
    def _reachable(self) -> Destination:
        dimse = (self.ae_title, self.host, self.port)
        if self.stow_url is None and None in dimse:
            raise ValueError(
                f"destination {self.name} needs ae_title, host and port (C-STORE) or stow_url "
                "(DICOMweb STOW-RS)"
            )
        return self

    def c_store_address(self) -> tuple[str, str, int]:
        """(called AE title, host, port) of a destination reached by C-STORE."""
        if self.ae_title is None or self.host is None or self.port is None:
            raise ValueError(f"destination {self.name} is reached by STOW-RS, not by C-STORE")
        return self.ae_title, self.host, self.port

    def describe(self) -> str:
        if self.stow_url is not None:
            return f"{self.name} ({self.stow_url})"
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"


class Rule(BaseModel):
    """One declarative rule: a series goes to ``task`` when every given condition holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    task: str
    send_to: tuple[Name, ...] = ()
    """Destinations (by name) that receive the results of the studies this rule routes."""
    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    series_description: str | None = None
    image_type_contains: tuple[str, ...] = ()
    image_type_excludes: tuple[str, ...] = ()
    min_rows: Size | None = None
    max_rows: Size | None = None
    min_columns: Size | None = None
    max_columns: Size | None = None

    @field_validator("modality", "body_part", "image_type_contains", "image_type_excludes")
    @classmethod
    def _upper(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.strip().upper() for v in values)

    @field_validator("series_description")
    @classmethod
    def _regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
        return task

    def mismatch(self, series: SeriesAttributes, first: Image | None) -> str | None:
        """None when ``series`` matches, else why it does not (for people)."""
        if self.modality and (series.modality or "").upper() not in self.modality:
            return f"modality {series.modality or '(none)'} not in {list(self.modality)}"
        if self.body_part and (series.body_part or "").upper() not in self.body_part:
            return f"body part {series.body_part or '(none)'} not in {list(self.body_part)}"
        description = series.description or ""
        if self.series_description is not None and not re.search(
            self.series_description, description, re.IGNORECASE
        ):
            return f"series description {description!r} does not match {self.series_description!r}"
        image_type = set((series.image_type or "").upper().split("\\")) - {""}
        if missing := [v for v in self.image_type_contains if v not in image_type]:
            return f"image type lacks {missing}"
        if present := [v for v in self.image_type_excludes if v in image_type]:
            return f"image type is {present}"
        return self._size_mismatch(first)

    def _size_mismatch(self, first: Image | None) -> str | None:
        rows = first.rows if first is not None else None
        columns = first.columns if first is not None else None
        for what, value, low, high in (
            ("rows", rows, self.min_rows, self.max_rows),
            ("columns", columns, self.min_columns, self.max_columns),
        ):
            if (low is not None or high is not None) and value is None:
                return f"{what} unknown"
            if value is not None and low is not None and value < low:
                return f"{value} {what} < {low}"
            if value is not None and high is not None and value > high:
                return f"{value} {what} > {high}"
        return None


class RoutingRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[Rule, ...] = Field(min_length=1)
    destinations: tuple[Destination, ...] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> RoutingRules:
        for what, names in (
            ("rule", [r.name for r in self.rules]),
            ("destination", [d.name for d in self.destinations]),
        ):
            if duplicates := sorted({n for n in names if names.count(n) > 1}):
                raise ValueError(f"{what} names must be unique; repeated: {duplicates}")
        return self

    @model_validator(mode="after")
    def _known_destinations(self) -> RoutingRules:
        known = {d.name for d in self.destinations}
        for rule in self.rules:
            if unknown := [n for n in rule.send_to if n not in known]:
                raise ValueError(
                    f"rule {rule.name} sends to {unknown}, which are not among the destinations "
                    f"({sorted(known) or 'none declared'})"
                )
        return self

    def for_task(self, task: str) -> list[Rule]:
        return [r for r in self.rules if r.task == task]

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)


DEFAULT_RULES = "routing_rules.yaml"


def parse_rules(text: str, source: str) -> RoutingRules:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidRoutingRules(source, f"not valid YAML ({exc})") from None
    try:
        return RoutingRules.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRoutingRules(source, problems) from None


def load_rules(path: Path | None = None) -> RoutingRules:
    """The rules in ``path``, or the packaged defaults when None."""
    if path is None:
        return default_rules()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRoutingRules(str(path), f"cannot be read ({exc.strerror})") from None
    return parse_rules(text, str(path))


def rules_for(settings: Settings) -> RoutingRules:
    return load_rules(settings.routing_file)


@cache
def default_rules() -> RoutingRules:
    # The packaged file never changes while the process runs: parse it once.
    # Beside this module (package data); importlib.resources trips over the editable install.
    text = Path(__file__).with_name(DEFAULT_RULES).read_text(encoding="utf-8")
    return parse_rules(text, f"(packaged {DEFAULT_RULES})")


@dataclass(frozen=True)
class Routed:
    instance: Image | None  # a 2D task's image; for a series task, the series' first image
    reason: str | None  # why nothing matched, when instance is None
    rule: Rule | None = None  # the rule that matched
    plan: SeriesPlan | None = None  # a series task's input: the series as one stack


def route(study: Study, task: Task, rules: RoutingRules | None = None) -> Routed:
    """The first image of the first series of a loaded ``study`` that a rule of ``task`` matches."""
    return route_series(
        [(series, series.instances[0] if series.instances else None) for series in study.series],
        task,
        rules,
    )


def route_series(
    series: Sequence[Candidate], task: Task, rules: RoutingRules | None = None
) -> Routed:
    """The first image of the first series (in series number order) a rule of ``task`` matches.

    ``rules``: the site's rules (:func:`rules_for`); None means the packaged ones.
    """
    matched, reasons = _matching(series, task, rules)
    if matched is None:
        return Routed(None, reasons[0])
    if matched:
        _, first, rule = matched[0]
        return Routed(first, None, rule)
    return _unrouted(task, reasons)


def _unrouted(task: Task, reasons: Sequence[str]) -> Routed:
    return Routed(None, f"no series for {task.name} (" + "; ".join(reasons) + ")")


_Match = tuple["SeriesAttributes", "Image", "Rule"]
"""A series a rule of the task matches: its attributes, its first image, the rule."""


def _matching(
    series: Sequence[Candidate], task: Task, rules: RoutingRules | None
) -> tuple[list[_Match] | None, list[str]]:
    """The series a rule of ``task`` matches, in order, and why each other one does not (None
    and the reason when the task has no rule)."""
    task_rules = (rules or default_rules()).for_task(task.name)
    if not task_rules:
        return None, [f"no routing rule for {task.name}"]
    matched: list[_Match] = []
    reasons = []
    for attributes, first in series:
        why = []
        for rule in task_rules:
            mismatch = rule.mismatch(attributes, first)
            if mismatch is None and first is not None:
                matched.append((attributes, first, rule))
                break
            why.append(f"{rule.name}: {mismatch or 'no instances'}")
        else:
            reasons.append(f"series {attributes.number or '?'}: " + ", ".join(why))
    return matched, reasons


def route_studies(
    session: Session,
    study_ids: Sequence[int],
    task: Task,
    rules: RoutingRules | None = None,
    *,
    max_voxels: int = MAX_VOLUME_VOXELS,
) -> dict[int, Routed]:
    """Route each of ``study_ids`` for ``task``, a batch at a time (a few queries in all).

    A 2D task gets each study's first matching image (:func:`route_series`); a series task the
    first matching series that is one volume (or stack, for a sequence task), planned from the
    index: ``max_voxels`` bounds its size (RADFLOW_MAX_VOLUME_VOXELS).
    """
    found = candidates(session, study_ids)
    if not task.takes_series:
        return {i: route_series(found.get(i, []), task, rules) for i in study_ids}
    matched = {i: _matching(found.get(i, []), task, rules) for i in study_ids}
    series_ids = [a.id for m, _ in matched.values() for a, _, _ in m or []]
    slices = series_slices(session, series_ids)
    routed = {}
    for study_id, (series, reasons) in matched.items():
        if series is None:
            routed[study_id] = Routed(None, reasons[0])
            continue
        routed[study_id] = _first_volume(series, reasons, slices, task, max_voxels)
    return routed


def _first_volume(
    series: Sequence[_Match],
    reasons: list[str],
    slices: dict[int, list[Slice]],
    task: Task,
    max_voxels: int,
) -> Routed:
    refused = []
    for attributes, first, rule in series:
        number = attributes.number or "?"
        try:
            plan = plan_series(
                slices.get(attributes.id, []), time=task.takes_time_series, max_voxels=max_voxels
            )
        except NotAVolume as exc:
            refused.append(f"series {number}: {exc}")
            continue
        return Routed(first, None, rule, plan)
    return _unrouted(task, [*refused, *reasons])


def series_slices(session: Session, series_ids: Sequence[int]) -> dict[int, list[Slice]]:
    """Each series' instances as radflow.dicom.geometry sees them, by series id (one query)."""
    if not series_ids:
        return {}
    rows = session.execute(
        select(
            Instance.series_id,
            Instance.object_key,
            Instance.sha256,
            Instance.rows,
            Instance.columns,
            Instance.frames,
            Instance.image_type,
            Instance.image_position,
            Instance.image_orientation,
            Instance.pixel_spacing,
            Instance.temporal_position,
        )
        .where(Instance.series_id.in_(list(series_ids)))
        .order_by(Instance.series_id, Instance.number, Instance.id)
    )
    found: defaultdict[int, list[Slice]] = defaultdict(list)
    for series_id, key, sha256, rows_, columns, frames, image_type, *geometry in rows:
        position, orientation, spacing, temporal = geometry
        found[series_id].append(
            Slice(
                key,
                sha256,
                rows_,
                columns,
                frames,
                image_type,
                _tuple(position),
                _tuple(orientation),
                _tuple(spacing),
                temporal,
            )
        )
    return dict(found)


def _tuple(values: list[float] | None) -> tuple[float, ...] | None:
    return tuple(float(v) for v in values) if values is not None else None


def candidates(session: Session, study_ids: Sequence[int]) -> dict[int, list[Candidate]]:
    """Each study's series (in number order, as Study.series) with its first image, by study id.

    One query for all of ``study_ids``; a study without series maps to no entry.
    """
    if not study_ids:
        return {}
    first = (
        select(
            Instance.series_id,
            Instance.rows,
            Instance.columns,
            Instance.sha256,
            Instance.object_key,
            func.row_number()
            .over(partition_by=Instance.series_id, order_by=(Instance.number, Instance.id))
            .label("position"),
        )
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id.in_(study_ids))
        .subquery()
    )
    rows = session.execute(
        select(
            Series.study_id,
            Series.id,
            Series.modality,
            Series.body_part,
            Series.description,
            Series.image_type,
            Series.number,
            first.c.rows,
            first.c.columns,
            first.c.sha256,
            first.c.object_key,
        )
        .outerjoin(first, (first.c.series_id == Series.id) & (first.c.position == 1))
        .where(Series.study_id.in_(study_ids))
        .order_by(Series.study_id, Series.number, Series.id)
    )
    found: defaultdict[int, list[Candidate]] = defaultdict(list)
    for study_id, series_id, modality, body_part, description, image_type, number, *image in rows:
        rows_, columns, sha256, object_key = image
        found[study_id].append(
            (
                SeriesView(modality, body_part, description, image_type, number, series_id),
                FirstImage(rows_, columns, sha256, object_key) if object_key is not None else None,
            )
        )
    return dict(found)
