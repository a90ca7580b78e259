"""Weights from files o2m did not write: checked from the safetensors header before any real model is built.

A model file's config (its o2m metadata, a ``config.json``, a manifest) decides how big the model is; its
tensors only fill it. Building first and reading the tensors after lets a 2 KB file with a crafted config
allocate gigabytes. So, before anything real is allocated:

1. the header alone is read (safetensors' own parser: it refuses a header whose data offsets overrun the
   file, so a truncated file is refused here too), and every tensor must be floating point;
2. the model is built on the ``meta`` device (shapes, no storage) and its parameters and buffers counted:
   more bytes than the file could fill (by a wide margin) or than a hard cap is refused;
3. the meta model's state_dict must match the header's names and shapes exactly.

Only then are the tensors read and the real model built (``build_checked``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.fsutil import human_bytes, read_metadata
from o2mcli.models.families.base import check_state_shapes

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the dtypes o2m loads weights as
MAX_MODEL_BYTES = 64 << 30  # no model o2m serves comes near; a config beyond it is crafted or a mistake
# The model is built in float32, so an F16/BF16 file fills twice its bytes; buffers a file need not hold
# (non-persistent ones) are small. Past 4x the file (plus 16 MiB for tiny files) the config is not the file's.
FILE_FACTOR, FILE_SLACK = 4, 16 << 20

Header = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)


def tensor_header(path: Path, allow_int: Callable[[str], bool] = lambda name: False) -> Header:
    """Every tensor's dtype and shape from the header of ``path`` (no tensor data is read); a corrupt or truncated
    file, or a tensor that is not floating point (unless ``allow_int(name)``), is a one-line ``O2MError``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    read_metadata(path)  # o2m's bounded header reader first: size limits and one-line errors for a broken header
    try:
        with safe_open(str(path), framework="pt") as f:
            header = {k: (str(f.get_slice(k).get_dtype()), tuple(int(d) for d in f.get_slice(k).get_shape()))
                      for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise O2MError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0][:120]})") from e
    for name in sorted(header):
        dtype = header[name][0]
        if dtype not in FLOAT_DTYPES and not allow_int(name):
            raise O2MError(f"{path}: tensor {name!r} has dtype {dtype}; o2m loads floating-point weights only "
                           f"({', '.join(FLOAT_DTYPES)})")
    return header


def implied_bytes(model: nn.Module) -> int:
    """The bytes a (meta) model's parameters and buffers take once built for real."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def check_size(planned: nn.Module, where: Path) -> int:
    """The bytes a (meta) model would take, refused over the hard cap."""
    need = implied_bytes(planned)
    if need > MAX_MODEL_BYTES:
        raise O2MError(f"{where}: the model config implies {human_bytes(need)} of weights; refused (at most "
                       f"{human_bytes(MAX_MODEL_BYTES)})")
    return need


def check_plan(planned: nn.Module, header: Header, path: Path, where: Path,
               ignore: Callable[[str], bool] = lambda name: False) -> None:
    """Refuse a meta-built model that the file at ``path`` cannot fill: too many bytes for the file or the hard
    cap, or a state_dict whose names or shapes differ from the header's (one line naming the tensor); names
    ``ignore`` picks are left out of the comparison on both sides."""
    need, have = check_size(planned, where), Path(path).stat().st_size
    if need > FILE_FACTOR * have + FILE_SLACK:
        raise O2MError(f"{where}: the model config implies {human_bytes(need)} of weights but {Path(path).name} "
                       f"holds {human_bytes(have)}; refused (the config does not describe this file's weights)")
    check_state_shapes({k: tuple(v.shape) for k, v in planned.state_dict().items() if not ignore(k)},
                       {k: shape for k, (_, shape) in header.items() if not ignore(k)}, where)


def build_checked(build: Callable[[Optional[dict[str, torch.Tensor]]], nn.Module], path: Path, where: Path,
                  header: Optional[Header] = None, ignore: Callable[[str], bool] = lambda name: False) -> nn.Module:
    """``build(state)`` with the weights of ``path``, after ``build(None)`` on the meta device has passed
    :func:`check_plan` against the file's header (read here unless given; ``ignore`` as there): nothing real is
    allocated for a config the file does not fill."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = tensor_header(path) if header is None else header
    with torch.device("meta"):
        planned = build(None)
    check_plan(planned, header, path, where, ignore)
    del planned
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise O2MError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0][:120]})") from e
    return build(state)
