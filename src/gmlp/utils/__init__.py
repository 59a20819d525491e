"""Small shared utilities (file I/O); depends on torch and safetensors only."""

from .io import CheckpointError, atomic_write, load_state_dict_file, save_state_dict_file

__all__ = ["CheckpointError", "atomic_write", "load_state_dict_file", "save_state_dict_file"]
