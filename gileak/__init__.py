"""gileak: benchmark gradient-inversion attacks and defenses for federated learning."""

import pluggy

from gileak.base import Attack, Client, Component, Dataset, DatasetInfo, Defense, Model, Reconstruction, Splits
from gileak.errors import (
    DataUnavailableError,
    DuplicateComponentError,
    GileakError,
    NotApplicableError,
    ParamsError,
    SpecError,
    UnknownComponentError,
    UserInputError,
)

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("gileak")

__all__ = [
    "Attack",
    "Client",
    "Component",
    "Dataset",
    "DatasetInfo",
    "Defense",
    "Model",
    "Reconstruction",
    "Splits",
    "DataUnavailableError",
    "DuplicateComponentError",
    "GileakError",
    "NotApplicableError",
    "ParamsError",
    "SpecError",
    "UnknownComponentError",
    "UserInputError",
    "hookimpl",
    "__version__",
]
