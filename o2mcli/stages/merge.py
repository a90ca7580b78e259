"""``o2m merge``: task-arithmetic merge of the K students of one run into one UNet.

theta = theta_0 + lambda * sum_k w_k (theta_k - theta_0), with theta_0 the students' shared
initialization (the template, or the teacher for ``--init teacher`` runs), found through the
students' provenance and verified by sha256. The default lambda = 1/K with unit weights is the
plain average. The output is one self-describing ``.safetensors`` file (serving all timesteps),
or, when ``out`` does not end in ``.safetensors``, a ``merged`` stage directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from o2mcli.models.conditioning import describe
from o2mcli.outputs import run_scope
from o2mcli.errors import O2MError, OptionError
from o2mcli.merge import MERGE_METHODS
from o2mcli.parsing import cli, number_list
from o2mcli.stages import fields

ARTIFACT = "merged.safetensors"
MAX_T = 100_000  # the most training timesteps a scheduler config may have (models.configs.check_scheduler_config)


# Every method's own options (o2mcli.merge: task arithmetic's lambda) are fields of the config, flat.
_METHOD_OPTIONS = tuple(dict.fromkeys(o for o in (getattr(f, "options", None) for f in MERGE_METHODS.values()) if o))


class MergeConfig(*_METHOD_OPTIONS, BaseModel):  # type: ignore[misc]
    """Every setting of a merge (recorded in the output's provenance and manifest); its fields are o2m merge's
    options."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    inputs: tuple[str, ...] = Field(json_schema_extra=cli(argument=True, unset=True), description="A students "
                                    "directory (o2m distill's output), or student files; default: the newest students "
                                    "directory here.")
    out: Path = Field(Path("merged.safetensors"), json_schema_extra=cli("-o", "--out", unset=True), description="A "
                      ".safetensors file (default merged.safetensors, or merged-2.safetensors...) or a directory.")
    method: Literal["task-arithmetic", "average"] = Field("task-arithmetic", description="task-arithmetic (theta_0 + "
                                                          "lambda sum w_k task vectors) or average (weighted mean).")
    weights: Optional[tuple[float, ...]] = Field(None, description="Per-student weights w_k, e.g. 1,1,2,1.")
    _parse_weights = field_validator("weights", mode="before")(classmethod(lambda cls, v: number_list(v)))
    force: bool = fields.force()


@dataclass
class StudentRef:
    """One student file and what its provenance says about where it started."""

    path: Path
    timestep_range: tuple[int, int]
    provenance: dict
    sha256: str
    config: dict  # the model config its metadata records (architecture checks before any tensor is read)


# 1. Finding the students and their shared initialization ------------------------------------------------

def _file_meta(path: Path) -> dict:
    from o2mcli.fsutil import read_metadata

    from o2mcli.models.io import CONFIG_KEYS

    meta = read_metadata(path)
    if meta.get("format") not in CONFIG_KEYS:
        raise O2MError(f"{path}: not an o2m student file (no o2m metadata)")
    return meta


def collect_students(inputs: tuple[str, ...]) -> list[StudentRef]:
    """Every student named by ``inputs`` (students directories or student files), verified."""
    from o2mcli.fsutil import loads_bounded, sha256_file
    from o2mcli.manifest import is_stage_dir, read_manifest, require_kind
    from o2mcli.models.io import check_timestep_range, provenance_of, recorded_paths
    from o2mcli.outputs import note_input

    found: list[StudentRef] = []
    for spec in inputs:
        p = Path(spec)
        if not p.exists():
            raise O2MError(f"{p}: no such students directory or student file")
        if p.is_dir():
            if not is_stage_dir(p):
                raise O2MError(f"{p}: not an o2m students directory (no manifest.json)")
            man = read_manifest(p, verify=True)  # a missing or altered student file is refused here
            require_kind(man, p, ("students",))
            files = [(p / m.artifact, tuple(m.timestep_range)) for m in man.models]
        else:
            rng = loads_bounded(_file_meta(p).get("o2m.timestep_range", "[0, 1000]"),
                                f"{p}: o2m metadata 'o2m.timestep_range'")
            files = [(p, tuple(check_timestep_range(rng, MAX_T, p)))]
        note_input(p, "a student this merge reads")
        for f, rng in files:
            meta = _file_meta(f)
            if meta.get("o2m.kind") != "students":
                raise O2MError(f"{f}: a {meta.get('o2m.kind', 'model')} file, not a distilled student")
            prov = provenance_of(meta, f)
            for where, what in recorded_paths(prov):  # theta_0 and the teacher: never this merge's output
                note_input(where, f"{what}, recorded by {f}")
            found.append(StudentRef(f, rng, prov, sha256_file(f), _config(meta, f)))
    if len(found) < 2:
        raise O2MError(f"{', '.join(inputs)}: holds {len(found)} student; merging needs at least 2")
    return found


def _config(meta: dict, path: Path) -> dict:
    from o2mcli.fsutil import loads_bounded
    from o2mcli.models.io import CONFIG_KEYS

    key = CONFIG_KEYS[meta["format"]]
    cfg = loads_bounded(meta.get(key, "{}"), f"{path}: o2m metadata '{key}'")
    if not isinstance(cfg, dict):
        raise O2MError(f"{path}: o2m metadata '{key}' is not a JSON object")
    return cfg


def check_same_architecture(students: list[StudentRef], configs: bool = True) -> None:
    """Refuse students of different model classes (named both) or, with ``configs``, of different configs (naming
    the first key that differs): task vectors only add up between tensors of one architecture."""
    from o2mcli.models.families import DEFAULT_FAMILY

    first = students[0]
    name0 = first.config.get("_class_name", DEFAULT_FAMILY)
    for s in students[1:]:
        name = s.config.get("_class_name", DEFAULT_FAMILY)
        if name != name0:
            raise O2MError(f"{s.path} and {first.path}: students of different architectures ({name} vs {name0}); "
                           "merge the students of one run")
        keys = configs and sorted(k for k in set(s.config) | set(first.config) if not k.startswith("_")
                      and s.config.get(k) != first.config.get(k))
        if keys:
            k = keys[0]
            raise O2MError(f"{s.path} and {first.path}: {name} students of different configs ({k} "
                           f"{s.config.get(k)!r} vs {first.config.get(k)!r}); merge the students of one run")


def shared_init(students: list[StudentRef]):
    """theta_0: the initialization every student started from, loaded and checked against its recorded sha256."""
    from o2mcli.models.io import load_model

    first = students[0]
    for s in students:
        if not s.provenance.get("init_sha256"):
            raise O2MError(f"{s.path}: records no shared initialization (trained from --student-config's random "
                           "init?); task arithmetic needs theta_0, use --method average")
        if s.provenance["init_sha256"] != first.provenance["init_sha256"]:
            raise O2MError(f"{s.path} and {first.path}: students of different initializations "
                           f"({s.provenance['init_sha256'][:12]} vs {first.provenance['init_sha256'][:12]}); "
                           "merge the students of one run")
    prov = first.provenance
    path = Path(prov.get("template") if prov.get("init") == "template" else prov.get("teacher") or "")
    if not str(path) or not path.exists():
        raise O2MError(f"{first.path}: its initialization {path} is gone; task arithmetic needs theta_0")
    base = load_model(path, "cpu")
    if base.sha256 != prov["init_sha256"]:
        raise O2MError(f"{path}: changed since the students started from it (sha256 {base.sha256[:12]}, recorded "
                       f"{prov['init_sha256'][:12]})")
    return path, base


def check_same_shapes(base: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]],
                      students: list[StudentRef]) -> None:
    """Refuse, naming the tensor, any student whose tensors differ from theta_0's in name or shape."""
    for s, st in zip(students, states):
        for k, v in base.items():
            if k not in st:
                raise O2MError(f"{s.path}: lacks tensor {k} that the shared initialization has")
            if tuple(st[k].shape) != tuple(v.shape):
                raise O2MError(f"{s.path}: tensor {k} is {tuple(st[k].shape)}, the shared initialization's is "
                               f"{tuple(v.shape)}")
        extra = sorted(set(st) - set(base))
        if extra:
            raise O2MError(f"{s.path}: has tensor {extra[0]} that the shared initialization lacks")


def _classes(provenance: dict) -> str:
    """A student's conditioning in words, for a refusal."""
    return describe(provenance.get("conditioning"))


def check_finite(merged: dict[str, torch.Tensor], cfg: MergeConfig, lam: float, weights: list[float],
                 states: list[dict[str, torch.Tensor]], students: list[StudentRef], base_path: Optional[Path],
                 base: Optional[dict[str, torch.Tensor]]) -> None:
    """Refuse a merge with an inf or NaN anywhere, before anything is written, naming the cause: an input tensor
    already non-finite, else the option that scaled a finite one past float32's range (--lambda or --weights)."""
    from o2mcli.merge import first_nonfinite

    key = first_nonfinite(merged)
    if key is None:
        return
    inputs = list(zip([s.path for s in students], states)) + ([(base_path, base)] if base is not None else [])
    for path, state in inputs:
        bad = first_nonfinite(state)
        if bad is not None:
            raise O2MError(f"{path}: tensor {bad} holds non-finite values (inf or NaN), so the merge would too; "
                           "nothing was written")
    why = f"the merged tensor {key} overflows float32 (inf or NaN); nothing was written"
    if cfg.lam is not None and cfg.method == "task-arithmetic":
        with_w = "" if cfg.weights is None else f" (with --weights {','.join(f'{w:g}' for w in weights)})"
        raise OptionError("lam", lam, f"{why}{with_w}; use a smaller --lambda (the plain average is 1/K)")
    if cfg.weights is not None:
        raise OptionError("weights", tuple(weights), f"{why}; use smaller --weights")
    raise O2MError(f"{cfg.out}: {why}")


# 2. The stage ----------------------------------------------------------------------------------------------

@run_scope
def run_merge(cfg: MergeConfig) -> Path:
    """Merge the students named by ``cfg.inputs``; write one file or a ``merged`` directory at ``cfg.out``."""
    from safetensors.torch import load_file

    from o2mcli.outputs import atomic_dir, reserve_output
    from o2mcli.manifest import parent_ref, write_manifest
    from o2mcli.merge import get_method
    from o2mcli.models.io import load_model, model_record, save_model_file

    # 1. Refuse bad outputs and inputs before any work.
    out = Path(cfg.out)
    reserve_output(out, cfg.force, inputs=cfg.inputs)
    students = collect_students(cfg.inputs)
    check_same_architecture(students, configs=False)  # the model classes first, named
    k = len(students)
    weights = list(cfg.weights) if cfg.weights is not None else [1.0] * k
    if len(weights) != k:
        raise OptionError("weights", weights, f"{len(weights)} values for {k} students")
    if cfg.method == "average" and sum(weights) <= 0:
        raise OptionError("weights", weights, "must sum to a positive number for an average")
    lam = cfg.lam if cfg.lam is not None else 1.0 / k
    if cfg.method == "task-arithmetic" and (lam == 0 or all(w == 0 for w in weights)):
        raise OptionError(*(("lam", lam) if lam == 0 else ("weights", tuple(weights))),
                          "every task vector is weighted 0, so the result would be the initialization (theta_0) "
                          "itself; give some student a nonzero weight")

    conditioning = students[0].provenance.get("conditioning")
    for s in students[1:]:
        if s.provenance.get("conditioning") != conditioning:
            raise O2MError(f"{s.path} and {students[0].path}: students conditioned differently "
                           f"({_classes(s.provenance)} vs {_classes(students[0].provenance)}); merge the students "
                           "of one run")
    check_same_architecture(students)  # then the configs (after the conditioning, which says more)

    # 2. theta_0 and the students' tensors.
    base_path, base = (None, None)
    if cfg.method == "task-arithmetic":
        base_path, base = shared_init(students)
    states = [load_file(str(s.path)) for s in students]
    reference = base.denoiser.state_dict() if base is not None else states[0]
    check_same_shapes(reference, states, students)

    # 3. Merge and build the model from theta_0's (or the first student's) config.
    merged = get_method(cfg.method)(reference if base is not None else None, states, weights, lam)
    check_finite(merged, cfg, lam, weights, states, students, base_path, reference if base is not None else None)
    shell = base if base is not None else load_model(students[0].path)
    template = shell.denoiser
    template.load_state_dict(merged)
    sched = shell.scheduler_config
    T = int(sched.get("num_train_timesteps", 1000))
    provenance = {"stage": "merge", "method": cfg.method, "lambda": lam, "weights": weights,
                  "students": [{"path": str(s.path.resolve()), "sha256": s.sha256, "range": list(s.timestep_range)}
                               for s in students],
                  "theta_0": str(base_path.resolve()) if base_path else None,
                  "theta_0_sha256": base.sha256 if base is not None else None,
                  "teacher": students[0].provenance.get("teacher"),
                  "teacher_sha256": students[0].provenance.get("teacher_sha256")}
    if conditioning is not None:  # the merged model asks for classes as its students did
        provenance["conditioning"] = conditioning

    # 4. Write: one self-describing file, or a stage directory.
    if out.suffix == ".safetensors":
        save_model_file(out, template, sched, kind="merged", timestep_range=(0, T), provenance=provenance,
                        force=cfg.force)
        return out
    with atomic_dir(out, force=cfg.force) as tmp:
        save_model_file(tmp / ARTIFACT, template, sched, kind="merged", timestep_range=(0, T), provenance=provenance)
        parents = [parent_ref(Path(x)) for x in cfg.inputs] + ([parent_ref(base_path)] if base_path else [])
        write_manifest(tmp, "merged", {**cfg.model_dump(mode="json"), "lam": lam, "weights": weights},
                       parents=parents, models=[model_record("merged", ARTIFACT, template, (0, T))],
                       scheduler_config=sched, summary={"students": k, "method": cfg.method, "lambda": lam})
    return out
