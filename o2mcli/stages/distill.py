"""``o2m distill``: one teacher into K students (O2MKD; K = 1 or p_own = 0 is O2OKD) on one engine.

The output is a ``students`` stage directory:

* ``student_0.safetensors`` ... ``student_{K-1}.safetensors``: EMA weights, each with its
  timestep range (in the file's metadata and in the manifest), so ``o2m sample students/``
  routes every denoising step to the student that owns it;
* ``metrics.jsonl``: step, student, loss terms, lr, images/s; ``loss.png``: the curves;
* ``manifest.json``: the full config, template and teacher as parents, a summary.

An unfinished run keeps its checkpoint in ``OUT.partial/`` (safetensors + JSON, written
atomically every ``save_every`` steps); ``resume`` continues it bit-for-bit on CPU.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from o2mcli.errors import O2MError

MODES = ("o2mkd", "dkdm")


class DistillConfig(BaseModel):
    """Every setting of a distillation run (recorded in full in the manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    template: Optional[str] = None
    teacher: Optional[str] = None
    student_config: Optional[Path] = None
    mode: Literal["o2mkd", "dkdm"] = "o2mkd"
    students: Optional[int] = Field(None, ge=1)  # None: 4 for o2mkd, 1 for dkdm (the paper's single student)
    boundaries: Optional[str] = None
    p_own: float = Field(0.5, ge=0, le=1)
    kd: str = "output"
    alpha: float = Field(1.0, ge=0)
    init: Literal["template", "teacher"] = "template"
    data: Optional[str] = None  # o2mkd: default digits; dkdm: refused
    rho: float = 0.4
    init_steps: Optional[int] = Field(None, ge=1)
    init_batch: int = Field(1024, ge=1)
    kl_weight: float = Field(1.0, ge=0)
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-4, gt=0)
    lr_warmup: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    vlb_weight: float = Field(0.001, ge=0)
    seed: int = Field(0, ge=0, lt=2**63)
    device: str = "auto"
    save_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    resume: bool = False
    force: bool = False
    out: Path = Path("students")

    @model_validator(mode="after")
    def _students_by_mode(self) -> "DistillConfig":
        """``-k`` unset: O2MKD's 4 students, or DKDM's single student (data-free O2MKD is ``-k 4``)."""
        if self.students is None:
            object.__setattr__(self, "students", 1 if self.mode == "dkdm" else 4)
        return self


class _Quiet(list):
    """A progress bar stand-in for ranks other than 0."""

    def set_postfix(self, **_: object) -> None:
        """Silent."""


def _fingerprint(cfg: DistillConfig) -> dict:
    # `steps` may grow on resume (constant LR after warm-up); paths and devices may move.
    return cfg.model_dump(mode="json", exclude={"resume", "force", "device", "save_every", "log_every", "out",
                                                "steps", "template", "teacher", "data"})


# 1. Inputs ----------------------------------------------------------------------------------------

def resolve_teacher(template_path: Path, loaded_template, override: Optional[str]):
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
        import json

        from safetensors import safe_open
        try:
            with safe_open(str(template_path), framework="pt") as f:
                prov = json.loads((f.metadata() or {}).get("o2m.provenance", "{}"))
        except Exception:  # noqa: BLE001
            prov = {}
        if "teacher" not in prov:
            raise O2MError(f"{template_path}: does not name its teacher; pass --teacher")
        path, want = Path(prov["teacher"]), prov.get("teacher_sha256")
    if not path.exists():
        raise O2MError(f"{template_path}: its teacher {path} is gone; pass --teacher")
    teacher = load_model(path, "cpu")
    if want and teacher.sha256 != want:
        raise O2MError(f"{path}: the teacher changed since {template_path} was pruned from it (sha256 "
                       f"{teacher.sha256[:12]}, recorded {want[:12]}); pass --teacher to use it anyway")
    return path, teacher


def _check_fit(teacher, student_cfg: dict, data_shape: tuple[int, ...] | None, where: Path, tpath: Path) -> None:
    tc = teacher.unet.config
    c, s = int(tc.in_channels), int(tc.sample_size)
    if int(student_cfg["in_channels"]) != c or int(student_cfg["sample_size"]) != s:
        raise O2MError(f"{where}: the student takes {student_cfg['in_channels']}x{student_cfg['sample_size']}^2 "
                       f"images but the teacher {tpath} takes {c}x{s}^2")
    if int(student_cfg["out_channels"]) not in (c, 2 * c):
        raise O2MError(f"{where}: {student_cfg['out_channels']} output channels; expected {c} or {2 * c}")
    if data_shape is not None and tuple(data_shape) != (c, s, s):
        raise O2MError(f"--data: images are {'x'.join(map(str, data_shape))} (CxHxW) but the teacher {tpath} "
                       f"takes {c}x{s}x{s}")


def make_distiller(cfg: DistillConfig, student_unet, teacher, plan, device, dist, make_source):
    """Students, KD modules, source and generators for ``cfg``: the engine ``run_distill`` trains (and benchmarks time).

    ``make_source(terms, device)`` builds the data source. The plan's coins come from a generator
    shared by all ranks; data (and the buffer's reverse-step noise) from a per-rank generator.
    """
    from diffusers import DDPMScheduler

    from o2mcli.diffusion.gaussian import DiffusionTerms
    from o2mcli.distill.engine import Distiller, Hyper, Student
    from o2mcli.distill.features import matched_points
    from o2mcli.distill.losses import build_kd_loss, kd_class
    from o2mcli.distill.objective import Objective, dkdm_kl

    # Denormal floats (near-clean buffer samples, tiny gradients) slow CPU kernels several-fold;
    # flushing them to zero costs no accuracy that matters (measured: DKDM step 1.07x -> 1.00x).
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    gen_plan = torch.Generator().manual_seed(cfg.seed)
    gen_data = torch.Generator().manual_seed(cfg.seed + 1_000_003 * (dist.rank + 1))
    sched = DDPMScheduler.from_config({k: v for k, v in teacher.scheduler_config.items() if not k.startswith("_")})
    terms = DiffusionTerms(sched.betas)
    source = make_source(terms, device)
    init_unet = copy.deepcopy(teacher.unet if cfg.init == "teacher" else student_unet).cpu()
    tunet = teacher.unet.cpu()
    s_ch: dict[str, int] = {}
    t_ch: dict[str, int] = {}
    if kd_class(cfg.kd).needs_features:
        _, s_ch, t_ch = matched_points(init_unet, tunet)
    tunet.to(device)
    hyper = Hyper(batch_size=cfg.batch_size, lr=cfg.lr, lr_warmup=cfg.lr_warmup, weight_decay=cfg.weight_decay,
                  ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip)
    students = []
    for k in range(cfg.students):
        g = torch.Generator().manual_seed(cfg.seed + 7919 * k)  # each student's KD heads, reproducibly
        kd = build_kd_loss(cfg.kd, s_ch, t_ch, g).to(device)
        students.append(Student(k, copy.deepcopy(init_unet).to(device).train(), kd, hyper, dist))
    if cfg.mode == "dkdm":
        both_learned = _learned(teacher.unet.config) and _learned(init_unet.config)
        # The KL's teacher mean is clipped like the buffer's reverse step (the teacher's clip_sample).
        objective = Objective(alpha=cfg.alpha, base="output", kl_weight=cfg.kl_weight if both_learned else 0.0,
                              kl=functools.partial(dkdm_kl, clip=source.clip) if both_learned else None)
    else:
        objective = Objective(alpha=cfg.alpha, base="diffusion", vlb_weight=cfg.vlb_weight)
    return Distiller(teacher=tunet, students=students, source=source, plan=plan, objective=objective, terms=terms,
                     hyper=hyper, device=device, dist=dist, gen_plan=gen_plan, gen_data=gen_data)


def teacher_reverse_settings(sched: dict, where: Path) -> tuple[str, float | None]:
    """(variance_type, x0 clip range or None) of the teacher's reverse step, as diffusers' DDPMScheduler reads them."""
    from o2mcli.diffusion.gaussian import check_variance_type

    if str(sched.get("prediction_type", "epsilon")) != "epsilon":
        raise O2MError(f"{where}: prediction_type {sched.get('prediction_type')!r} is not supported by DKDM here "
                       "(only 'epsilon')")
    if sched.get("thresholding", False):
        raise O2MError(f"{where}: scheduler config sets thresholding (dynamic thresholding) which o2m's reverse step "
                       "does not implement")
    variance = str(sched.get("variance_type", "fixed_small"))
    check_variance_type(variance, f"{where}: scheduler config")
    if not sched.get("clip_sample", True):
        return variance, None
    clip = sched.get("clip_sample_range", 1.0)
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not clip > 0 or clip == float("inf"):
        raise O2MError(f"{where}: scheduler config clip_sample_range {clip!r} must be a positive number")
    return variance, float(clip)


def _learned(unet_cfg) -> bool:
    return int(unet_cfg["out_channels"]) == 2 * int(unet_cfg["in_channels"])


def load_student_config(path: Path, seed: int):
    """A fresh, randomly initialized UNet2DModel from a diffusers config JSON (``--student-config``)."""
    import json

    from o2mcli.models.io import build_unet

    try:
        ucfg = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise O2MError(f"{path}: no such student config") from e
    except (OSError, json.JSONDecodeError) as e:
        raise O2MError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(ucfg, dict):
        raise O2MError(f"{path}: expected a JSON object (a diffusers UNet2DModel config)")
    torch.manual_seed(seed)
    return build_unet(ucfg, None, Path(path))


# 2. The stage ---------------------------------------------------------------------------------------

def run_distill(cfg: DistillConfig) -> Path:
    """Distil the teacher into ``cfg.students`` students; write a ``students`` stage directory."""
    from o2mcli.chain import resolve_model_spec
    from o2mcli.data import load_dataset
    from o2mcli.devices import resolve_device
    from o2mcli.distill.losses import kd_class
    from o2mcli.distill.plan import TimestepPlan, parse_boundaries, uniform_boundaries
    from o2mcli.distill.sources import ImageSource
    from o2mcli.distill.sources.buffer import DynamicBuffer, buffer_slots
    from o2mcli.engine.checkpoint import check_partial, load_checkpoint, save_checkpoint
    from o2mcli.engine.dist import barrier, init_distributed, local_device, shutdown
    from o2mcli.engine.run import JsonlLog, progress
    from o2mcli.fsutil import check_output_free
    from o2mcli.models.io import load_model, unet_config_of

    # 1. Refuse bad options, then bad outputs, before any work (options first: a bad --kd is not "a run is there").
    kd_class(cfg.kd)  # an unknown --kd is refused before any loading
    device = resolve_device(cfg.device)
    dkdm = cfg.mode == "dkdm"
    if dkdm and cfg.data is not None:
        raise O2MError(f"--data {cfg.data}: DKDM takes no data (the teacher is its only input); drop --data, "
                       "or use --mode o2mkd to distil on images")
    if dkdm and cfg.kd == "none":
        raise O2MError("--kd none with --mode dkdm: a data-free student learns only from the teacher; "
                       "use --kd none with --mode o2mkd (plain training on the data)")
    if not cfg.rho > 0:
        raise O2MError(f"--rho {cfg.rho}: must be positive (the buffer holds rho*T*b samples)")
    out = Path(cfg.out)
    check_output_free(out, cfg.force, inputs=[cfg.template, cfg.teacher, cfg.data, cfg.student_config])
    work = check_partial(out, cfg.resume, cfg.force)

    # 2. Student initialization, teacher, data, plan.
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
        student_unet, where = template.unet, template_path
        if template.num_train_timesteps != teacher.num_train_timesteps:
            raise O2MError(f"{template_path}: T={template.num_train_timesteps} but the teacher has "
                           f"T={teacher.num_train_timesteps}")
    if teacher.is_group:
        raise O2MError(f"{teacher_path}: the teacher must be one UNet, not a group of students")
    reverse_cfg = teacher_reverse_settings(teacher.scheduler_config, teacher_path) if dkdm else ("fixed_small", 1.0)
    scfg = unet_config_of(teacher.unet if cfg.init == "teacher" else student_unet)
    if dkdm and _learned(scfg) and not _learned(unet_config_of(teacher.unet)):
        raise O2MError(f"{where}: a learned-variance student under the fixed-variance teacher {teacher_path}: "
                       "there is no teacher variance to learn from (use a student with "
                       f"{teacher.unet.config.in_channels} output channels)")
    data = None if dkdm else load_dataset(cfg.data or "digits")
    _check_fit(teacher, scfg, None if data is None else data.shape, where, teacher_path)
    T = teacher.num_train_timesteps
    if dkdm and cfg.init_steps is not None and cfg.init_steps > T - 1:
        raise O2MError(f"--init-steps {cfg.init_steps}: the teacher {teacher_path} has T={T}, so a slot is at most "
                       f"{T - 1} steps from noise; use at most {T - 1} (10 is plenty: see the README)")
    bounds = parse_boundaries(cfg.boundaries, T) if cfg.boundaries else uniform_boundaries(T, cfg.students)
    if cfg.boundaries and len(bounds) - 1 != cfg.students:
        raise O2MError(f"--boundaries {cfg.boundaries!r} makes {len(bounds) - 1} ranges but --students is {cfg.students}")
    plan = TimestepPlan(tuple(bounds), cfg.p_own)

    # 3. Processes, devices, the data source, the engine.
    dist = init_distributed(device.type)
    try:
        device = local_device(dist, device)
        if dist.is_main and work.exists() and not cfg.resume:
            shutil.rmtree(work)  # --force: start over
        tc = teacher.unet.config
        if dkdm:
            slots = buffer_slots(cfg.rho, T, cfg.batch_size, min_slots=cfg.batch_size * plan.max_draws_per_step)
            if dist.is_main and slots > round(cfg.rho * T * cfg.batch_size):
                print(f"note: --rho {cfg.rho} asks for {cfg.rho * T * cfg.batch_size:.3g} buffer slots; using {slots}, "
                      f"the minimum for {plan.max_draws_per_step} disjoint batches of {cfg.batch_size} per step",
                      file=sys.stderr)

            def make_source(terms, dev):
                return DynamicBuffer((int(tc.in_channels), int(tc.sample_size), int(tc.sample_size)), slots, terms,
                                     dev, variance_type=reverse_cfg[0], learned=_learned(unet_config_of(teacher.unet)),
                                     clip=reverse_cfg[1])
        else:
            images = data.to_model_range()

            def make_source(terms, dev):
                return ImageSource(images, terms, dev)
        engine = make_distiller(cfg, student_unet, teacher, plan, device, dist, make_source)
        students = engine.students
        init_info: dict = {}

        # 4. Resume, or build the DKDM buffer (checkpointed at step 0: it can be the costly part).
        start, last_good = 0, None
        if cfg.resume:
            tensors, state = load_checkpoint(work)
            if state.get("config_fingerprint") != _fingerprint(cfg):
                raise O2MError(f"{work}: checkpoint was made with other settings; resume with the same options")
            start = engine.load_state(tensors, state)
            init_info = state.get("init_info", {})
            last_good = start
            if start > cfg.steps:
                raise O2MError(f"{work}: checkpoint is at step {start}; pass --steps {start} or more to continue")
        if dist.is_main:
            work.mkdir(parents=True, exist_ok=True)
        barrier(dist)

        def save(step: int) -> None:
            """Every rank contributes its state (RNGs, buffer); rank 0 writes the checkpoint atomically."""
            tensors, meta = engine.state(step)
            if dist.is_main:
                meta.update(config_fingerprint=_fingerprint(cfg), init_info=init_info)
                save_checkpoint(work, tensors, meta)
            barrier(dist)

        if dkdm and not cfg.resume:
            buf = engine.source

            def say(msg: str) -> None:
                print(msg + (f" (x {dist.world} ranks)" if dist.enabled else ""), file=sys.stderr, flush=True)

            t0 = time.perf_counter()
            buf.initialize(engine.teacher, engine.gen_data, cfg.init_steps, cfg.init_batch,
                           log=say if dist.is_main else None)
            init_info = {"seconds": round(time.perf_counter() - t0, 3), "teacher_forwards": buf.init_forwards,
                         "slots": buf.n, "bytes": buf.bytes, "init_steps": cfg.init_steps}
            save(0)
            last_good = 0
        log = JsonlLog(work / "metrics.jsonl", keep_until_step=start if cfg.resume else None) if dist.is_main else None

        # 5. The loop.
        steps = range(start, cfg.steps)
        bar = progress(steps, total=cfg.steps, initial=start, desc=f"distill K={cfg.students}") if dist.is_main \
            else _Quiet(steps)
        t_last, seen, t_run, seen_run = time.perf_counter(), 0, time.perf_counter(), 0
        for step in bar:
            parts = engine.step()
            done = step + 1
            seen += cfg.batch_size * cfg.students * dist.world
            at_log = done % cfg.log_every == 0 or done == cfg.steps
            at_save = done % cfg.save_every == 0 and done < cfg.steps
            if at_log or at_save:
                rows = engine.check_finite(parts, done, last_good, work)
                now = time.perf_counter()
                ips = seen / max(now - t_last, 1e-9)
                seen_run += seen
                t_last, seen = now, 0
                if at_log and log is not None:
                    for st, row in zip(students, rows):
                        log.write({"step": done, "student": st.k, **row, "lr": st.sched.get_last_lr()[0],
                                   "images_per_s": ips})
                    bar.set_postfix(loss=f"{sum(r['loss'] for r in rows) / len(rows):.4f}")
            if at_save:
                save(done)
                last_good = done
        seconds = time.perf_counter() - t_run
        if log is not None:
            log.close()

        # 6. Write the students (rank 0): EMA weights, manifest, log, loss curve.
        if dist.is_main:
            _write(cfg, out, work, engine, students, plan, template_path, teacher_path, teacher, template,
                   seconds, seen_run or 1, init_info)
        barrier(dist)
    finally:
        shutdown(dist)
    return out


def _write(cfg, out, work, engine, students, plan, template_path, teacher_path, teacher, template, seconds, seen,
           init_info):
    from o2mcli.diffusion.schedulers import scheduler_config_for_outputs
    from o2mcli.engine.run import read_jsonl
    from o2mcli.fsutil import atomic_dir
    from o2mcli.manifest import parent_ref, write_manifest
    from o2mcli.models.io import model_record, save_model_file
    from o2mcli.viz import line_plot

    rows = read_jsonl(work / "metrics.jsonl")
    config = cfg.model_dump(mode="json")
    config.update(template=str(template_path.resolve()) if template_path else None,
                  teacher=str(Path(teacher_path).resolve()), boundaries=",".join(map(str, plan.boundaries)),
                  world_size=engine.dist.world, data=None if cfg.mode == "dkdm" else (cfg.data or "digits"))
    if cfg.student_config is not None:
        config["student_config"] = str(Path(cfg.student_config).resolve())
    init_from = teacher if cfg.init == "teacher" else template
    # The students' own variance type (a C-channel student of a learned-variance teacher samples as fixed_small).
    scfg = students[0].raw.config
    student_sched = scheduler_config_for_outputs(teacher.scheduler_config, int(scfg.in_channels),
                                                 int(scfg.out_channels))
    records = []
    steps_run = max(1, cfg.steps)
    with atomic_dir(out, force=cfg.force) as tmp:
        for st, rng in zip(students, plan.ranges):
            model = copy.deepcopy(st.raw).cpu().eval()
            st.ema.copy_to(model)
            name = f"student_{st.k}.safetensors"
            prov = {"stage": "distill", "mode": cfg.mode, "kd": cfg.kd, "student": st.k, "teacher": config["teacher"],
                    "teacher_sha256": teacher.sha256, "template": config["template"], "init": cfg.init,
                    "init_sha256": init_from.sha256 if init_from is not None else None,
                    "student_config": config.get("student_config")}
            save_model_file(tmp / name, model, student_sched, kind="students", timestep_range=rng,
                            provenance=prov)
            records.append(model_record(f"student_{st.k}", name, model, rng))
        shutil.copy(work / "metrics.jsonl", tmp / "metrics.jsonl")
        curves = {f"student {k} ({lo}-{hi})": ([r["step"] for r in rows if r["student"] == k],
                                              [r["loss"] for r in rows if r["student"] == k])
                  for k, (lo, hi) in enumerate(plan.ranges)}
        line_plot(curves, tmp / "loss.png", title=f"o2m distill {cfg.mode} K={cfg.students} kd={cfg.kd}", logy=True)
        last = {k: next((r for r in reversed(rows) if r["student"] == k), {}) for k in range(cfg.students)}
        summary = {
            "ranges": [list(r) for r in plan.ranges],
            "p_own": cfg.p_own,
            "own_range_fraction": [round(n / steps_run, 4) for n in engine.own_steps],
            "final": [{k: v for k, v in last[i].items() if k not in ("step", "student")} for i in range(cfg.students)],
            "seconds": round(seconds, 3),
            "student_images_per_s": round(seen / max(seconds, 1e-9), 3),
            "teacher_forwards_per_student_sample": round(engine.teacher_samples / max(1, steps_run * cfg.batch_size
                                                                                         * cfg.students), 4),
            "world_size": engine.dist.world,
            "losses": _losses_text(cfg, engine, records),
        }
        if cfg.mode == "dkdm":
            buf = engine.source
            summary["buffer"] = {**init_info, "restarts": buf.restarts, "data": "none (teacher only)"}
        parents = ([parent_ref(template_path)] if template_path else []) + [parent_ref(Path(teacher_path))]
        write_manifest(tmp, "students", config, parents=parents, models=records,
                       scheduler_config=student_sched, summary=summary)
    shutil.rmtree(work, ignore_errors=True)


def _losses_text(cfg, engine, records) -> str:
    learned = bool(records) and _learned(records[0].unet_config)
    obj = engine.objective
    kd = "" if (cfg.mode == "dkdm" and cfg.kd == "output") or cfg.kd == "none" else f" + {cfg.alpha} * L_KD({cfg.kd})"
    if cfg.mode == "dkdm":
        if obj.kl is not None:
            return f"||eps_T - eps_S||^2{kd} + {obj.kl_weight} * KL(p_T || p_S) (learned variances)"
        return (f"||eps_T - eps_S||^2{kd} only: fixed-variance "
                + ("teacher" if not _learned(engine.teacher.config) else "student") + ", no KL term")
    kd += " (no KD: the teacher was never run)" if cfg.kd == "none" else ""
    return f"L_diff{kd}" + (" (L_diff includes the improved-DDPM vlb term: learned-variance student)" if learned else "")
