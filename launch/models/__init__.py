"""Model families: each module here that defines `FAMILY` (a `launch.models.family.ModelFamily`)
is one architecture, and the only place that knows it: the model builder (`launch.model`),
the dry run's parameter count and memory model, the throughput's FLOPs and the Hugging Face
export all ask the run's family. Adding a family is one file here (plus its tests); the
config's `model.family` choices follow.

A config names its family with `model.family`, or leaves it `auto`: then the family is the
one whose signature (position embedding, normalization, activation) the model's fields match.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from launch.models.family import ModelFamily

if TYPE_CHECKING:
    from launch.config import ModelConfig


def _discover() -> dict[str, ModelFamily]:
    modules = (importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__))
    families = (module.FAMILY for module in modules if hasattr(module, "FAMILY"))
    return {family.name: family for family in sorted(families, key=lambda f: f.name)}


FAMILIES = _discover()


def family_problems(model: ModelConfig) -> list[str]:
    """Why no family, or not the named one, owns this model; empty when one does."""
    keys = dict.fromkeys(key for family in FAMILIES.values() for key in family.signature)
    given = ", ".join(f"{key}={getattr(model, key)}" for key in keys)
    if model.family == "auto":
        matching = [f for f in FAMILIES.values() if _matches(f, model)]
        if len(matching) == 1:
            return []
        if matching:
            names = ", ".join(f.name for f in matching)
            return [f"model {given} fits the families {names}: set model.family to one of them"]
        known = "; ".join(f.describe() for f in FAMILIES.values())
        return [f"model {given} is no model family's: set the fields of one of {known}"]
    family = FAMILIES[model.family]
    wrong = [f"model.{key}={value}" for key, value in family.signature.items() if getattr(model, key) != value]
    if wrong:
        return [
            f"model.family={family.name} needs {', '.join(wrong)} (the config has {given}):"
            " set those or model.family=auto"
        ]
    return []


def family_of(model: ModelConfig) -> ModelFamily:
    """The family that owns this model; ConfigError when none does (`family_problems`)."""
    problems = family_problems(model)
    if problems:
        from launch.config import ConfigError

        raise ConfigError(problems[0])
    if model.family != "auto":
        return FAMILIES[model.family]
    return next(f for f in FAMILIES.values() if _matches(f, model))


def _matches(family: ModelFamily, model: ModelConfig) -> bool:
    return all(getattr(model, key) == value for key, value in family.signature.items())
