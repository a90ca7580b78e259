"""Model I/O (safetensors only), the K-student group, and size/speed statistics."""

from o2mcli.models.group import StudentGroup
from o2mcli.models.io import LoadedModel, load_model, save_model_file

__all__ = ["LoadedModel", "StudentGroup", "load_model", "save_model_file"]
