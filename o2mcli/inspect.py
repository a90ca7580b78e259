"""``o2m info``: what is in a stage directory or a model input, as a dict and as readable text.

``describe(path)`` returns a JSON-able dict; ``format_text(info)`` renders it for a person.
Stage directories are read from their manifest (artifacts are verified, a mismatch is reported,
not fatal); model inputs (o2m ``.safetensors`` files, diffusers model or pipeline directories)
are loaded on the CPU to count parameters and MACs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from o2mcli.models.conditioning import kind_of
from o2mcli.chain import resolve_model_spec
from o2mcli.errors import O2MError
from o2mcli.fsutil import human_bytes, loads_bounded

DENOISER_FIELDS = ("_class_name", "sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
               "down_block_types", "up_block_types", "norm_num_groups", "attention_head_dim")
SCHED_FIELDS = ("_class_name", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "variance_type",
                "prediction_type", "clip_sample")
MAX_ARTIFACT_LINES = 12


# 1. Describing ------------------------------------------------------------------------------------

def describe(spec: str | Path) -> dict[str, Any]:
    """A JSON-able description of a stage directory or any model input (a path or a built-in name)."""
    from o2mcli.manifest import is_stage_dir

    path = resolve_model_spec(spec)
    if not path.exists():
        raise O2MError(f"{path}: no such file or directory")
    if is_stage_dir(path):
        return _describe_stage(path)
    return _describe_model(path)


def _describe_stage(path: Path) -> dict[str, Any]:
    from o2mcli.manifest import read_manifest, verify_artifacts

    man = read_manifest(path, verify=False)
    try:
        verify_artifacts(path, man)
        integrity = "ok"
    except O2MError as e:
        integrity = str(e)
    d = man.model_dump(mode="json")
    return {
        "path": str(path.resolve()),
        "type": "stage-dir",
        "kind": man.kind,
        "created_at": man.created_at,
        "versions": d["versions"],
        "config": d["config"],
        "parents": d["parents"],
        "artifacts": [{"path": a["path"], "size": a["size"], "sha256": a["sha256"]} for a in d["artifacts"]],
        "total_size": sum(a.size for a in man.artifacts),
        "models": [{"name": m["name"], "artifact": m["artifact"], "params": m["params"], "macs": m["macs"],
                    "timestep_range": list(m["timestep_range"]), "denoiser_config": _pick(m["denoiser_config"], DENOISER_FIELDS)}
                   for m in d["models"]],
        "scheduler_config": d["scheduler_config"],
        "summary": d["summary"],
        "integrity": integrity,
    }


def _describe_model(path: Path) -> dict[str, Any]:
    from o2mcli.models.io import FORMAT, load_model, provenance_of
    from o2mcli.models.stats import count_macs, count_params

    loaded = load_model(path, "cpu")  # O2MError for anything that is not a model
    unet = loaded.denoiser
    info: dict[str, Any] = {
        "path": str(path.resolve()),
        "type": loaded.form,
        "sha256": loaded.sha256,
        "class": type(unet).__name__,
        "denoiser_config": _pick(loaded.denoiser_configs[0], DENOISER_FIELDS),
        "params": count_params(unet),
        "macs": count_macs(unet),
        "timestep_range": list(loaded.ranges[0]),
        "scheduler_config": loaded.scheduler_config,
        "conditioning": loaded.conditioning,
    }
    if path.is_file():
        info["size"] = path.stat().st_size
    if loaded.form == "o2m-file":
        meta = _o2m_metadata(path)
        info["format"] = meta.get("format", FORMAT)
        info["kind"] = meta.get("o2m.kind")
        info["provenance"] = provenance_of(meta, path)
    if loaded.form == "diffusers-pipeline":
        index = path / "model_index.json"
        if index.is_file():
            try:
                found = loads_bounded(index.read_bytes(), str(index))
            except (OSError, O2MError):
                found = None
            info["pipeline_class"] = found.get("_class_name") if isinstance(found, dict) else None
    if loaded.notes:
        info["notes"] = list(loaded.notes)
    return info


def _o2m_metadata(path: Path) -> dict[str, str]:
    from o2mcli.fsutil import read_metadata

    return read_metadata(path)


def _pick(cfg: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any]:
    cfg = cfg or {}
    return {k: cfg[k] for k in keys if k in cfg}


# 2. Rendering -------------------------------------------------------------------------------------

def human_size(n: int) -> str:
    return human_bytes(n, binary=False)


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_num(v) for v in x) + "]"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_num(v)}" for k, v in x.items()) + "}"
    return str(x)


def _compact(d: dict[str, Any] | None, width: int = 100, indent: str = "  ") -> list[str]:
    """``k=v`` pairs wrapped to ``width`` columns."""
    if not d:
        return [indent + "(none)"]
    lines, cur = [], ""
    for k, v in d.items():
        item = f"{k}={_num(v)}"
        if cur and len(indent) + len(cur) + 1 + len(item) > width:
            lines.append(indent + cur)
            cur = item
        else:
            cur = f"{cur} {item}" if cur else item
    lines.append(indent + cur)
    return lines


def _params(n: int) -> str:
    return f"{n / 1e6:.3g} M params"


def _macs(n: int) -> str:
    return f"{n / 1e9:.3g} G MACs"


def _sched_lines(s: dict[str, Any] | None) -> list[str]:
    return _compact({k.lstrip("_"): s[k] for k in SCHED_FIELDS if k in s} if s else None)


def _unet_line(u: dict[str, Any]) -> str:
    keys = ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block", "norm_num_groups")
    return ", ".join(f"{k}={_num(u[k])}" for k in keys if k in u)


def format_text(info: dict[str, Any]) -> str:
    """A readable multi-line summary of ``describe``'s output."""
    out = [f"path:        {info['path']}"]
    if info["type"] == "stage-dir":
        out.append(f"kind:        {info['kind']} (o2m stage directory)")
        out.append(f"created_at:  {info['created_at']}")
        out.append("versions:    " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
        out.append("config:")
        out += _compact(info["config"])
        out.append("parents:" + ("" if info["parents"] else "     (none)"))
        for p in info["parents"]:
            out.append(f"  {p['kind']:<14} {p['path']}  sha256 {p['sha256'][:12]}")
        arts = info["artifacts"]
        out.append(f"artifacts:   {len(arts)} files, {human_size(info['total_size'])}")
        for a in arts[:MAX_ARTIFACT_LINES]:
            out.append(f"  {a['path']:<32} {human_size(a['size']):>10}  {a['sha256'][:12]}")
        if len(arts) > MAX_ARTIFACT_LINES:
            rest = arts[MAX_ARTIFACT_LINES:]
            out.append(f"  ... and {len(rest)} more ({human_size(sum(a['size'] for a in rest))})")
        if info["models"]:
            out.append(f"models:      {len(info['models'])}")
            for m in info["models"]:
                lo, hi = m["timestep_range"]
                out.append(f"  {m['name']:<12} {m['artifact']:<24} {_params(m['params'])}, {_macs(m['macs'])}, "
                           f"t in [{lo}, {hi})")
                out.append(f"  {'':<12} {_unet_line(m['denoiser_config'])}")
        if info["scheduler_config"]:
            out.append("scheduler:")
            out += _sched_lines(info["scheduler_config"])
        out.append("summary:")
        out += _compact(info["summary"])
        out.append(f"integrity:   {info['integrity']}")
        return "\n".join(out)

    out.append(f"form:        {info['type']}" + (f" ({info['pipeline_class']})" if info.get("pipeline_class") else ""))
    if "kind" in info:
        out.append(f"kind:        {info['kind']}")
    out.append(f"class:       {info['class']}")
    if "size" in info:
        out.append(f"size:        {human_size(info['size'])}")
    out.append(f"sha256:      {info['sha256']}")
    out.append(f"params:      {_params(info['params'])} ({info['params']:,})")
    out.append(f"MACs:        {_macs(info['macs'])} per forward of one image")
    lo, hi = info["timestep_range"]
    out.append(f"timesteps:   [{lo}, {hi})")
    kind = kind_of(info.get("conditioning"))
    if kind is not None:
        out.append(kind.info_line(info["conditioning"]))
    out.append("denoiser config:")
    out += _compact(info["denoiser_config"])
    out.append("scheduler:")
    out += _sched_lines(info["scheduler_config"])
    if "provenance" in info:
        out.append("provenance:")
        prov = info["provenance"]
        out += _compact(prov if isinstance(prov, dict) else {"raw": prov})
    for note in info.get("notes", []):
        out.append(f"note:        {note}")
    return "\n".join(out)


def to_json(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, sort_keys=True, default=str)
