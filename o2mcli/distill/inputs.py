"""A run's inputs: the teacher a template names (hash-checked), fresh students from a config, and the
checks that teacher, students and data fit together."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from o2mcli.errors import O2MError
from o2mcli.models.conditioning import takes_prompts


def resolve_teacher(template_path: Path, loaded_template: Any, override: Optional[str]) -> tuple[Path, Any]:
    """The teacher: ``--teacher``, else the template manifest's parent (hash-checked), else the file's provenance."""
    from o2mcli.chain import resolve_model_spec
    from o2mcli.models.io import load_model

    if override is not None:
        path = resolve_model_spec(override)
        return path, load_model(path, "cpu")
    man = loaded_template.manifest
    if man is not None and man.parents:
        ref = man.parents[0]
        path, want = Path(ref.path), ref.sha256
    else:
        from o2mcli.fsutil import read_metadata
        from o2mcli.models.io import provenance_of

        prov = provenance_of(read_metadata(template_path), template_path) if template_path.is_file() else {}
        if not isinstance(prov.get("teacher"), str):
            raise O2MError(f"{template_path}: does not name its teacher; pass --teacher")
        path, want = Path(prov["teacher"]), prov.get("teacher_sha256")
    if not path.exists():
        raise O2MError(f"{template_path}: its teacher {path} is gone; pass --teacher")
    teacher = load_model(path, "cpu")
    if want and teacher.sha256 != want:
        raise O2MError(f"{path}: the teacher changed since {template_path} was pruned from it (sha256 "
                       f"{teacher.sha256[:12]}, recorded {want[:12]}); pass --teacher to use it anyway")
    return path, teacher


def check_fit(teacher: Any, student_cfg: Any, data_shape: tuple[int, ...] | None, where: Path, tpath: Path) -> None:
    """Students take the teacher's image size and channels (and predict C or 2C); so do the data. Each side's shapes
    come from its family, so a DiT and a UNet are compared alike."""
    from o2mcli.models.families import family_of, family_for_config

    c, s, s_w = family_of(teacher.denoiser).input_shape(teacher.denoiser)
    (sc, sh, sw), s_out = family_for_config(student_cfg, where).config_io(student_cfg)
    if (sc, sh, sw) != (c, s, s_w):
        size = f"{sh}^2" if sh == sw else f"{sh}x{sw}"
        want = f"{s}^2" if s == s_w else f"{s}x{s_w}"
        raise O2MError(f"{where}: the student takes {sc}x{size} images but the teacher {tpath} takes {c}x{want}")
    if s_out not in (c, 2 * c):
        raise O2MError(f"{where}: {s_out} output channels; expected {c} or {2 * c}")
    if data_shape is not None and tuple(data_shape) != (c, s, s_w):
        raise O2MError(f"--data: images are {'x'.join(map(str, data_shape))} (CxHxW) but the teacher {tpath} "
                       f"takes {c}x{s}x{s_w}")


def check_conditioning(teacher_cfg: Any, teacher_path: Path, student_cfg: Any, where: Path,
                       labelled: Optional[bool] = None) -> None:
    """Students condition as the teacher does: on text of the same width, on the teacher's label table, or on
    nothing.

    ``labelled``: whether the run's batches carry class labels (the teacher's ``conditioning`` is a class record);
    None: whenever the teacher's config has a label table. Each family says how its config takes labels
    (:class:`LabelInput`), so a UNet and a DiT are compared by the labels they accept (a UNet's
    ``num_class_embeds`` = K + 1 is a DiT's ``num_embeds_ada_norm`` = K: K classes, then the null class). A student
    that runs without labels on its null class (a DiT) may serve an unconditional teacher. A class-conditional
    teacher's student must take its labels: distilling only the teacher's null-class branch into an unconditional
    student is refused, since that branch saw only the label-dropout fraction of training and the result would
    silently be the teacher's weakest model.
    """
    from o2mcli.models.families import family_for_config

    t_fam, s_fam = family_for_config(teacher_cfg, teacher_path), family_for_config(student_cfg, where)
    t_text = t_fam.condition is not None and t_fam.condition.prompts
    s_text = s_fam.condition is not None and s_fam.condition.prompts
    if t_text != s_text:
        what = "a text-conditioned" if s_text else f"a {student_cfg.get('_class_name', 'UNet2DModel')} (not text-" \
                                                   "conditioned)"
        raise O2MError(f"{where}: {what} student under the teacher {teacher_path} "
                       f"({teacher_cfg.get('_class_name', 'UNet2DModel')}); students take the teacher's condition")
    t_shape, s_shape = t_fam.condition_shape(teacher_cfg), s_fam.condition_shape(student_cfg)
    if t_text and t_shape != s_shape:
        key = next((k for k in t_shape if t_shape.get(k) != (s_shape or {}).get(k)), None)
        raise O2MError(f"{where}: {key} {(s_shape or {}).get(key)} but the teacher {teacher_path} takes a "
                       f"condition of width {t_shape.get(key)} there (students take the teacher's condition)")
    t_in, s_in = t_fam.label_input(teacher_cfg), s_fam.label_input(student_cfg)
    t_n = t_in.rows if t_in is not None else None
    if labelled is not None and not labelled:
        t_n = None
    s_n = s_in.rows if s_in is not None else None
    if not t_n and s_n and not s_in.optional:
        raise O2MError(f"{where}: a class-conditional student ({s_in.value} {s_in.noun}) under the unconditional "
                       f"teacher {teacher_path}; drop {s_in.key} from the student")
    if t_n and not s_n:
        if s_in is None:
            raise O2MError(f"{where}: a {student_cfg.get('_class_name', 'UNet2DModel')} takes no class labels but "
                           f"the teacher {teacher_path} is class-conditional ({t_n - 1} classes and the null class)")
        want = t_n - s_in.offset
        raise O2MError(f"{where}: the student has no class embedding but the teacher {teacher_path} is "
                       f"class-conditional; set {s_in.key} to {want} (its classes and null class)")
    if t_n and s_n and int(t_n) != int(s_n):
        want = t_n - s_in.offset  # the student's setting that takes the teacher's labels
        has = str(t_in.value) if t_in.noun == s_in.noun else f"{t_in.value} {t_in.noun} ({t_n - 1} classes " \
                                                              "and the null class)"
        raise O2MError(f"{where}: {s_in.value} {s_in.noun}, the teacher {teacher_path} has {has}; use {want}")
    if t_n and t_in.key == s_in.key:
        for key, value in t_in.same:
            theirs = dict(s_in.same).get(key)
            if theirs != value:
                raise O2MError(f"{where}: {key}={theirs!r} but the teacher {teacher_path} has {value!r}")


def load_student_config(path: Path, seed: int) -> torch.nn.Module:
    """A fresh, randomly initialized model from a diffusers config JSON (``--student-config``; its family by
    ``_class_name``, UNet2DModel without one)."""
    from o2mcli.models.io import build_denoiser, read_model_config

    ucfg = read_model_config(Path(path), "student config")
    torch.manual_seed(seed)
    return build_denoiser(ucfg, None, Path(path))


def load_inputs(cfg: Any) -> tuple[Optional[Path], Any, Path, Any, torch.nn.Module, Path]:
    """(template path, template, teacher path, teacher, the students' initial UNet, where it came from).

    The students start from the template (``o2m prune``'s output; its teacher found from its manifest)
    or, with ``student_config``, fresh from a diffusers config under ``--teacher``.
    """
    from o2mcli.chain import resolve_model_spec
    from o2mcli.models.io import load_model

    if cfg.student_config is not None:
        if cfg.teacher is None:
            raise O2MError("--student-config: name the teacher with --teacher (there is no template to find it from)")
        template_path, template = None, None
        student_unet = load_student_config(cfg.student_config, cfg.seed)
        teacher_path = resolve_model_spec(cfg.teacher)
        teacher = load_model(teacher_path, "cpu")
        where = Path(cfg.student_config)
    else:
        if cfg.template is None:
            raise O2MError("name a template (o2m prune's output) or give --student-config")
        template_path = resolve_model_spec(cfg.template)
        template = load_model(template_path, "cpu")
        if template.is_group:
            raise O2MError(f"{template_path}: a group of {len(template.ranges)} students; distill starts from one "
                           "template")
        teacher_path, teacher = resolve_teacher(template_path, template, cfg.teacher)
        student_unet, where = template.denoiser, template_path
        if template.num_train_timesteps != teacher.num_train_timesteps:
            raise O2MError(f"{template_path}: T={template.num_train_timesteps} but the teacher has "
                           f"T={teacher.num_train_timesteps}")
    if teacher.is_group:
        raise O2MError(f"{teacher_path}: the teacher must be one model, not a group of students")
    from o2mcli.models.io import denoiser_config_of

    cond = teacher.conditioning
    check_conditioning(denoiser_config_of(teacher.denoiser), teacher_path, denoiser_config_of(student_unet), where,
                       labelled=None if takes_prompts(cond) else cond is not None)
    return template_path, template, teacher_path, teacher, student_unet, where


def template_feature_pairs(template: Any) -> Optional[dict[str, str]]:
    """The student-block -> teacher-block pairs a BK-SDM template records for feature KD (None: pair by name)."""
    from o2mcli.fsutil import read_metadata

    if template is None:
        return None
    if template.form == "o2m-file":
        path = Path(template.source)
    elif template.manifest is not None and template.manifest.models:
        path = Path(template.source) / template.manifest.models[0].artifact
    else:
        return None
    from o2mcli.models.io import provenance_of

    prov = provenance_of(read_metadata(path), path)
    blocks = prov.get("blocks")
    pairs = blocks.get("feature_pairs") if isinstance(blocks, dict) else None
    if isinstance(pairs, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in pairs.items()):
        return dict(pairs)
    return None
