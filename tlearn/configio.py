"""Config dataclasses to and from the JSON of a saved run, with every key and type checked on the way in."""

from __future__ import annotations

import dataclasses
from typing import Any

from tlearn.config import TlearnError, type_problem


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type, values: Any, where: str) -> Any:
    """Build config ``cls`` from a dict read from ``where``: unknown keys and values of the wrong type are
    errors that name the key and the file; missing keys take their defaults."""
    if not isinstance(values, dict):
        raise TlearnError(f"{where}: the {cls.__name__} section must be a JSON object, not {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise TlearnError(f"{where}: unknown {cls.__name__} keys {unknown[:5]}; was it written by a newer tlearn?")
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    problems = [f"{name!r} is missing" for name in missing]
    problems += [f"{name!r} {why}" for name, v in values.items()
                 if (why := type_problem(v, str(fields[name].type)))]
    if problems:
        raise TlearnError(f"{where}: in {cls.__name__}, " + "; ".join(problems[:5]))
    return cls(**values)
