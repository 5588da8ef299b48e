"""Plain PyTorch models, one per file, registered by name. No Ray, no files, no data loading in here."""

from recdist.models.base import MFTables, Model
from recdist.models.batch import Batch, Dims
from recdist.models.registry import get, names, register, validate

# Importing a model module registers its models (see registry.register).
from recdist.models import autoencoder, mf, mf_mlp, ncf, reliability  # noqa: E402, F401  isort: skip

__all__ = ["Batch", "Dims", "MFTables", "Model", "get", "names", "register", "validate"]
