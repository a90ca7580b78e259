"""A finished run written as a ``students`` stage directory: every student's EMA weights with its
timestep range, the manifest (config, parents, summary), the metrics log and the loss curve."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Optional

from o2mcli.diffusion.schedulers import scheduler_config_for_outputs
from o2mcli.outputs import atomic_dir
from o2mcli.manifest import parent_ref, write_manifest
from o2mcli.models.configs import is_learned_variance
from o2mcli.models.io import model_record, save_model_file
from o2mcli.models.parametrization import parametrization_of
from o2mcli.runtime.run import read_jsonl
from o2mcli.viz import line_plot


def write_students(cfg: Any, mode: Any, out: Path, work: Path, engine: Any, plan: Any, template_path: Optional[Path],
                   teacher_path: Path, teacher: Any, template: Any, result: Any,
                   emas: Optional[dict[int, dict]] = None) -> None:
    """EMA weights of every student, the manifest, the log and the loss curve, as one atomic directory.

    ``emas`` (student index -> EMA weights, from ``engine.finish``) covers students other processes trained;
    without it the engine's own students' EMAs are written.
    """
    rows = read_jsonl(work / "metrics.jsonl")
    config = cfg.model_dump(mode="json")
    config.update(template=str(template_path.resolve()) if template_path else None,
                  teacher=str(Path(teacher_path).resolve()), boundaries=",".join(map(str, plan.boundaries)),
                  world_size=engine.dist.world, data=mode.data_spec())
    if cfg.student_config is not None:
        config["student_config"] = str(Path(cfg.student_config).resolve())
    init_from = teacher if cfg.init == "teacher" else template
    # The students' own variance type (a C-channel student of a learned-variance teacher samples as fixed_small).
    students = engine.students
    base = engine.held[0].raw  # every student shares the architecture: the model the EMA weights go into
    scfg = base.config
    student_sched = scheduler_config_for_outputs(teacher.scheduler_config, int(scfg.in_channels),
                                                 int(scfg.out_channels))
    if parametrization_of(student_sched).name != engine.student_param.name:  # (an eps student of a v teacher)
        student_sched["prediction_type"] = engine.student_param.name
    records = []
    steps_run = max(1, cfg.steps)
    with atomic_dir(out, force=cfg.force) as tmp:
        for st, rng in zip(students, plan.ranges):
            model = copy.deepcopy(base).cpu().eval()
            shadow = emas[st.k] if emas is not None else st.ema.shadow
            model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in shadow.items()})
            name = f"student_{st.k}.safetensors"
            prov = {"stage": "distill", "mode": cfg.mode, "kd": cfg.kd, "student": st.k, "teacher": config["teacher"],
                    "teacher_sha256": teacher.sha256, "template": config["template"], "init": cfg.init,
                    "init_sha256": init_from.sha256 if init_from is not None else None,
                    "student_config": config.get("student_config")}
            if mode.labels is not None:  # what sample and score read: classes, null class, the dropout used
                prov["conditioning"] = mode.labels.record()
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
            "seconds": round(result.seconds, 3),
            # fit counts batch x K per rank (x W ranks); the students' samples per step are batch x K in all
            "student_images_per_s": round(result.seen / engine.dist.world / max(result.seconds, 1e-9), 3),
            "teacher_forwards_per_student_sample": round(engine.teacher_samples / max(1, steps_run * cfg.batch_size
                                                                                         * cfg.students), 4),
            "world_size": engine.dist.world,
            "losses": mode.losses_text(engine, bool(records) and is_learned_variance(records[0].denoiser_config)),
            **mode.summary(engine, result.init_info),
        }
        parents = ([parent_ref(template_path)] if template_path else []) + [parent_ref(Path(teacher_path))]
        write_manifest(tmp, "students", config, parents=parents, models=records,
                       scheduler_config=student_sched, summary=summary)
    shutil.rmtree(work, ignore_errors=True)
