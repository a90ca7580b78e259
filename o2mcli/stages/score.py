"""``o2m score``: FID/KID against a reference (via clean-fid), CLIP score, params, MACs and throughput, as a report.

For each samples directory: verify its manifest, load ``samples.npz``, compute features of the
samples and of the reference with one extractor (``o2mcli.scoring.features``), FID (Heusel et al.
2017) and KID (Binkowski et al. 2018) by clean-fid's ``frechet_distance`` and ``kernel_distance``;
load the model that made the samples (checking it is byte-identical to the one sampled), count its
parameters and MACs and time full sampling runs with the samples' sampler and steps. The report is
a ``scores`` stage directory with ``report.json`` and ``report.md`` (Table 1 of the O2MKD paper).

Labelled samples (a class-conditional model's): their labels must be the model's classes (read from its
conditioning record where the model is there, else bounded by the classifier's classes); class accuracy is the
share the digits classifier reads as the label asked for.

Text-conditioned (Stable Diffusion) samples: with ``--clip-weights DIR`` (a local transformers CLIPModel or
OpenCLIP directory), each row also gets the CLIP score of its images against the prompts stored in ``samples.npz``
(``o2mcli.scoring.clip``: max(100 * mean cos, 0), torchmetrics' CLIPScore) and the raw mean cosine (BK-SDM's and
the O2MKD paper's number). MACs are the UNet's alone,
one call at the latent size with a 77-token text embedding, reported per UNet call and per sampling step
with classifier-free guidance (two calls); throughput times the UNet's latent denoising loop alone (one
call per step, a zero text embedding: no guidance doubling, text encoding or VAE decoding).

Samples drawn with DeepCache (``o2m sample --deepcache N``): the row keeps the full-step MACs and adds the
DeepCache average, MACs per call averaged over the full and partial calls the sampling run actually made (the
partial step's MACs counted by the same counter as the full step's, on the partial forward itself at the layer branch
used), and its throughput is timed with the same cache schedule (uniform or non-uniform) on. Samples drawn with
DeepCache by an earlier o2m (whose branch counted down/up block pairs; the manifest's DeepCache record has no
``branch_unit``) and with partial steps are refused: re-sample them.

``--compile``: the throughput runs time the denoiser compiled (``o2mcli.diffusion.compile``); the compile happens in
the uncounted warm-up run, and the row's ``throughput.compile`` records how it ran and ``throughput.warmup_s`` that
run's seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from o2mcli.models.conditioning import takes_prompts
from o2mcli.data.samples import model_unavailable
from o2mcli.outputs import run_scope
from o2mcli.errors import O2MError, OptionError
from o2mcli.parsing import cli
from o2mcli.stages import fields


class ScoreConfig(BaseModel):
    """Every setting of a scoring run (recorded in full in the manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    samples: list[Path] = Field(min_length=1, json_schema_extra=cli(argument=True, unset=True),
                                description="Samples directories (o2m sample outputs); default: the newest one here.")
    ref: str = Field("digits", description="Reference images: 'digits' (bundled) or a folder of images.")
    features: str = Field("auto", description="digits (shipped classifier, 1x8x8), inception (clean-fid), or auto.")
    inception_weights: Optional[Path] = Field(None, description="Local inception-2015-12-05.pt (clean-fid's file; "
                                              "never downloaded).")
    clip_weights: Optional[Path] = Field(
        None, description="Local CLIP directory, never downloaded: a transformers CLIPModel (config.json, "
        "model.safetensors) or an OpenCLIP one (open_clip_config.json, open_clip_model.safetensors), with tokenizer "
        "files. Adds the CLIP score (torchmetrics: max(100 x mean cos, 0)) and the raw mean cosine of each image "
        "against its prompt (text-conditioned samples).")
    throughput_batch: int = Field(64, ge=1, description="Batch size of the timed sampling runs.")
    throughput_steps: Optional[int] = Field(None, ge=1, description="Sampler steps of the timed runs; default: the "
                                            "samples' steps.")
    throughput_repeats: int = Field(2, ge=1, description="Timed runs after one warm-up.")
    # torch.compile the timed model (o2mcli.diffusion.compile); compiling happens in the uncounted warm-up run
    compile: bool = Field(False, description="Time the sampling runs with the denoiser compiled (as o2m sample "
                          "--compile); the compile is in the warm-up run, its seconds reported apart. Not for samples "
                          "drawn with DeepCache.")
    kid_subsets: int = Field(100, ge=1, description="KID subsets (mean and std are over these).")
    kid_subset_size: int = Field(1000, ge=2, description="Largest KID subset.")
    seed: int = fields.seed("Seed of the KID subsets and the throughput noise.")
    device: str = fields.device()
    out: Path = fields.stage_out("scores")
    force: bool = fields.force()

    @field_validator("features")
    @classmethod
    def _features(cls, v: str) -> str:
        from o2mcli.scoring.features import available

        if v not in available():
            raise ValueError(f"expected one of {', '.join(available())}")
        return v


# 1. Inputs ------------------------------------------------------------------------------------------

def _shape_text(shape: tuple[int, ...]) -> str:
    c, h, w = shape
    return f"{c}x{h}x{w} (CxHxW)"


def _to_float01(images_nhwc_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_nhwc_u8.transpose(0, 3, 1, 2))).float() / 255.0


def is_text_conditioned(loaded) -> bool:
    """Whether a loaded model takes prompts (a text-to-image UNet or a group of them)."""
    return takes_prompts(loaded.conditioning)


# 2. The model that made the samples ---------------------------------------------------------------

def unmeasured_model(man, reason: str) -> dict[str, Any]:
    """The model fields of a row whose model is unavailable: its name and hash as the samples recorded them,
    no params, MACs or throughput, and the reason."""
    parent = man.parents[0]
    return {"model": None, "model_name": Path(parent.path).name, "model_sha256": parent.sha256,
            "model_form": None, "students": None, "params": None, "macs": None, "macs_cfg": None,
            "text_conditioned": None, "macs_what": None, "partial_macs": None, "throughput": None,
            "model_unavailable": reason,
            "model_notes": [f"params, MACs and throughput unavailable: {reason} (FID/KID are from the samples alone)"]}


def measure_model(man, samples_dir: Path, device: torch.device, cfg: ScoreConfig) -> dict[str, Any]:
    """Params, MACs and throughput of the samples' parent model, refusing one changed since sampling; a model
    that is gone or unreadable gives a row without them (see :func:`model_unavailable`)."""
    from o2mcli.diffusion.sampler import measure_throughput
    from o2mcli.models.denoise import input_shape
    from o2mcli.models.io import load_model
    from o2mcli.models.stats import count_deepcache_macs, count_macs, count_params

    parent = man.parents[0]
    reason = model_unavailable(parent.path)
    if reason is not None:
        return unmeasured_model(man, reason)
    try:
        loaded = load_model(parent.path, device=device)
    except O2MError as e:
        raise O2MError(f"{samples_dir}: cannot load the model that made these samples: {e}") from e
    if loaded.sha256 != parent.sha256:
        raise O2MError(f"{parent.path}: model changed since sampling (sha256 {loaded.sha256[:12]}, "
                       f"{samples_dir} recorded {parent.sha256[:12]}); re-sample it or restore the model")
    unet = loaded.denoiser.eval()
    notes: list[str] = []
    params = count_params(unet)
    nets = list(unet.students) if loaded.is_group else [unet]
    per_student = [count_macs(s) for s in nets]
    macs = max(per_student)
    if loaded.is_group:
        notes.append(f"{len(per_student)} students: params summed over all students; MACs are one student's "
                     "(one student runs per denoising step)"
                     + ("" if len(set(per_student)) == 1 else "; students differ in size, the largest is shown"))
    spec = deepcache_of(man, samples_dir)
    partial_macs = None if spec is None else max(count_deepcache_macs(s, spec.branch) for s in nets)
    if spec is not None and loaded.is_group and len(set(per_student)) > 1:
        notes.append("DeepCache MACs: the largest student's full and partial forwards")
    text = is_text_conditioned(loaded)
    macs_what, calls = None, 2
    steps = cfg.throughput_steps or int(man.config["steps"])
    tp = measure_throughput(unet, str(man.config["scheduler"]), loaded.scheduler_config, steps,
                            cfg.throughput_batch, device, repeats=cfg.throughput_repeats, seed=cfg.seed,
                            deepcache=spec, compile=cfg.compile)
    tp["repeats"] = cfg.throughput_repeats
    if text:
        # The sampler's loop with cond None: the family feeds a zero 77-token embedding, one UNet call per step.
        tp["what"] = ("UNet latent denoising only: one UNet call per step with a zero text embedding; no "
                      "classifier-free guidance doubling, text encoding or VAE decoding")
        shape = "x".join(str(v) for v in input_shape(unet))
        # Guidance at or below 1 runs the conditional branch alone (o2m sample, as diffusers): one call per step.
        w = man.summary.get("guidance", man.config.get("guidance"))
        calls = 1 if isinstance(w, (int, float)) and not isinstance(w, bool) and w <= 1.0 else 2
        macs_what = (f"UNet only, one call on a {shape} latent with {loaded.family.stand_in()}: "
                     f"{_g(macs)} GMACs per UNet call, {_g(calls * macs)} GMACs per sampling step "
                     + ("with classifier-free guidance (x2: conditional and unconditional branch)" if calls == 2 else
                        f"at guidance {float(w):g} (at most 1: no guidance, one call)")
                     + "; VAE and text encoder not counted")
    return {"model": parent.path, "model_name": Path(parent.path).name, "model_sha256": loaded.sha256,
            "model_form": loaded.form, "students": len(loaded.ranges), "params": int(params), "macs": int(macs),
            "macs_cfg": int(calls * macs) if text else None, "text_conditioned": text, "macs_what": macs_what,
            "partial_macs": partial_macs, "throughput": tp, "model_unavailable": None,
            "model_notes": notes + list(loaded.notes)}


def deepcache_of(man, samples_dir: Path):
    """The DeepCache schedule the samples were drawn with (``DeepCacheSpec``), or None."""
    from o2mcli.diffusion.deepcache import BRANCH_UNIT, DeepCacheSpec

    n = man.config.get("deepcache")
    if n is None:
        return None
    if "deepcache" not in man.summary:
        raise O2MError(f"{samples_dir}: the manifest's config asks for DeepCache but its summary has no call counts")
    rec = man.summary["deepcache"]
    if rec.get("branch_unit", "block") != BRANCH_UNIT and int(rec.get("partial_calls", 0)) > 0:
        raise O2MError(f"{samples_dir}: drawn with DeepCache by an earlier o2m, whose --cache-branch counted down/up "
                       "block pairs, not layers; its partial steps cannot be costed now: re-sample it")
    schedule = man.config.get("deepcache_schedule") or rec.get("schedule") or "uniform"
    return DeepCacheSpec(int(n), int(man.config.get("cache_branch") or 0), str(schedule))


def deepcache_summary(man, samples_dir: Path, full_macs: Optional[int],
                      partial_macs: Optional[int]) -> Optional[dict[str, Any]]:
    """The row's DeepCache record: schedule, calls made (from the samples' manifest), full and partial MACs per
    call and their average over the calls made (MACs None where the model was unavailable)."""
    from o2mcli.diffusion.deepcache import average_macs

    spec = deepcache_of(man, samples_dir)
    if spec is None:
        return None
    rec = man.summary["deepcache"]
    full, partial = int(rec["full_calls"]), int(rec["partial_calls"])
    if full_macs is None or partial_macs is None:  # the model is unavailable: the schedule and calls, no MACs
        return {**spec.record(), "full_calls": full, "partial_calls": partial,
                "full_macs": None, "partial_macs": None, "macs": None, "macs_saved": None}
    avg = average_macs(full, partial, full_macs, partial_macs)
    return {**spec.record(), "full_calls": full, "partial_calls": partial,
            "full_macs": int(full_macs), "partial_macs": int(partial_macs), "macs": float(avg),
            "macs_saved": 1.0 - avg / full_macs}


def effective_macs(row: dict[str, Any]) -> Optional[float]:
    """MACs per call as sampled: the DeepCache average where the samples used it, else the full forward's; None
    where the model was unavailable."""
    dc = row.get("deepcache")
    macs = dc["macs"] if dc else row.get("macs")
    return None if macs is None else float(macs)


def _g(macs: int) -> str:
    return f"{macs / 1e9:.4g}"


# 3. The stage -----------------------------------------------------------------------------------------

@run_scope
def run_score(cfg: ScoreConfig) -> Path:
    """Score every samples directory against the reference; write a ``scores`` stage directory."""
    from o2mcli.data import load_dataset, load_samples
    from o2mcli.data.samples import has_labels, load_sample_labels, load_sample_prompts, model_classes
    from o2mcli.devices import resolve_device
    from o2mcli.fsutil import atomic_write_bytes, atomic_write_json
    from o2mcli.outputs import atomic_dir, notice, reserve_output
    from o2mcli.manifest import parent_ref, write_manifest
    from o2mcli.scoring.features import get_extractor, resolve_name
    from o2mcli.scoring.metrics import fid_from_features, kid_from_features, kid_subset_size, size_warnings
    from o2mcli.scoring.report import markdown_report
    from o2mcli.viz import line_plot

    # 1. Refuse bad outputs and inputs before any work.
    out = Path(cfg.out)
    reserve_output(out, cfg.force, inputs=[*cfg.samples, cfg.ref, cfg.inception_weights, cfg.clip_weights])
    dirs = [Path(d) for d in cfg.samples]
    resolved = [d.resolve() for d in dirs]
    if len(set(resolved)) != len(resolved):
        raise O2MError("the same samples directory is named twice")
    if out.resolve() in resolved:
        raise O2MError(f"{out}: the output would replace a samples directory being scored")
    device = resolve_device(cfg.device)
    if cfg.clip_weights is not None:
        from o2mcli.scoring.clip import check_clip_dir

        check_clip_dir(cfg.clip_weights)  # a bad directory is refused before any work

    # 2. Samples (verified) and the reference, all the same shape.
    loaded = [(d, *load_samples(d)) for d in dirs]
    ref = load_dataset(cfg.ref, labels=False)  # a reference's labels play no part
    ref_shape = tuple(int(s) for s in ref.shape)
    for d, _, images in loaded:
        shape = (int(images.shape[3]), int(images.shape[1]), int(images.shape[2]))
        if shape != ref_shape:
            raise O2MError(f"{d}: samples are {_shape_text(shape)} but the reference {cfg.ref} is "
                           f"{_shape_text(ref_shape)}; score against data of the samples' shape (--ref)")
    if cfg.compile:
        for d, man, _ in loaded:
            if man.config.get("deepcache") is not None:
                # Their throughput is timed with the cache on, and DeepCache's partial forwards are not compiled.
                raise OptionError("compile", True, f"{d} was sampled with DeepCache, whose partial forwards are not "
                                  "compiled; score it without --compile")
    prompts = {d: load_sample_prompts(d, images.shape[0]) for d, _, images in loaded}
    if cfg.clip_weights is not None:
        for d, _, _ in loaded:
            if prompts[d] is None:
                raise O2MError(f"{d}: --clip-weights scores images against their prompts, and {d / 'samples.npz'} "
                               "holds none (only samples of a text-conditioned model carry 'prompts')")
    clip = None
    if cfg.clip_weights is not None:
        from o2mcli.scoring.clip import load_clip

        clip = load_clip(cfg.clip_weights, device)  # before the features: a bad model fails fast

    # 3. Features: the reference once, as 8-bit images like the samples.
    name = resolve_name(cfg.features, ref_shape)
    extractor = get_extractor(name, inception_weights=cfg.inception_weights, device=device, shape=ref_shape)
    # Labels must be classes of the model that made them (its conditioning record), or where the model cannot be
    # read, classes the classifier that judges them knows.
    judged = classifier_classes(extractor)
    labels = {}
    for d, man, images in loaded:
        names, whence = model_classes(d, man) if has_labels(d) else ([], "")
        k = None if names is None else len(names)
        if names is None and judged is not None:
            k, whence = judged, (f"the classes of the {extractor.name} classifier that judges them; the model that "
                                 f"made them is unavailable: {whence}")
        labels[d] = load_sample_labels(d, images.shape[0], k, whence)
    ref_u8 = np.clip(np.rint(ref.images.numpy() * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    ref_feats = extractor(_to_float01(ref_u8))
    notes = size_warnings(len(ref), extractor.dim, f"reference images ({cfg.ref})")

    # 4. One row per samples directory.
    rows, models, noticed = [], {}, set()
    for d, man, images in loaded:
        warnings: list[str] = []
        feats = extractor(_to_float01(images))
        fid = fid_from_features(feats, ref_feats, notes=warnings)
        kid_mean, kid_std = kid_from_features(feats, ref_feats, subsets=cfg.kid_subsets,
                                              subset_size=cfg.kid_subset_size, seed=cfg.seed)
        warnings += size_warnings(images.shape[0], extractor.dim, "samples")
        accuracy = None
        if labels[d] is not None and judged is not None and int(labels[d].max()) >= judged:
            warnings.append(f"no class accuracy: labels reach {int(labels[d].max())} but the {extractor.name} "
                            f"classifier knows {judged} classes")
        elif labels[d] is not None:
            predicted = extractor.classify(images)
            accuracy = None if predicted is None else float((predicted == labels[d]).mean())
        cs = clip.score(images, prompts[d]) if clip is not None else None
        if cs is not None and cs["truncated_prompts"]:
            warnings.append(f"{cs['truncated_prompts']} prompt(s) longer than CLIP's {clip.max_tokens} tokens were "
                            "cut for the CLIP score")
        key = (man.parents[0].path, man.parents[0].sha256, man.config["scheduler"], man.config["steps"],
               man.config.get("deepcache"), man.config.get("cache_branch"), man.config.get("deepcache_schedule"))
        if key not in models:
            models[key] = measure_model(man, d, device, cfg)
            why = models[key]["model_unavailable"]
            if why and why not in noticed:  # one line per missing model, however many rows it made
                noticed.add(why)
                notice(f"{d}: the model that made these samples is unavailable ({why}); scoring FID/KID from the "
                       "samples alone, params, MACs and throughput marked unavailable")
        m = models[key]
        warnings += m["model_notes"]
        rows.append({
            "name": d.name, "samples": str(d.resolve()), "model": m["model"], "model_name": m["model_name"],
            "model_sha256": m["model_sha256"], "model_unavailable": m["model_unavailable"],
            "model_form": m["model_form"], "students": m["students"],
            "params": m["params"], "macs": m["macs"], "macs_cfg": m["macs_cfg"],
            "text_conditioned": m["text_conditioned"], "macs_what": m["macs_what"],
            "deepcache": deepcache_summary(man, d, m["macs"], m["partial_macs"]),
            "throughput": m["throughput"],
            "fid": fid, "kid_mean": kid_mean, "kid_std": kid_std, "class_accuracy": accuracy,
            "clip_score": None if cs is None else cs["mean"], "clip_cosine": None if cs is None else cs["cosine"],
            "clip_score_std": None if cs is None else cs["std"],
            "n_samples": int(images.shape[0]), "n_reference": len(ref),
            "features": extractor.name, "feature_dim": extractor.dim,
            "scheduler": man.config["scheduler"], "steps": int(man.config["steps"]), "seed": man.config.get("seed"),
            "warnings": warnings,
        })

    # 5. The report, written whole or not at all. Rows compare only at equal sampling settings.
    settings = sorted({(r["scheduler"], r["steps"], str(r["seed"]), r["n_samples"]) for r in rows})
    if len(settings) > 1:
        notes.append("rows differ in sampler, steps, seed or sample count ("
                     + "; ".join(f"{a} {b} steps seed {c} n={d}" for a, b, c, d in settings)
                     + "): compare FIDs only between rows with equal settings")
    report = {
        "rows": rows,
        "device": str(device),
        "throughput_repeats": cfg.throughput_repeats,
        "features": extractor.info(),
        "clip": None if clip is None else clip.info(),
        "reference": {"spec": cfg.ref, "name": ref.name, "source": ref.source, "sha256": ref.sha256,
                      "n": len(ref), "shape": list(ref_shape)},
        "kid": {"subsets": cfg.kid_subsets, "subset_size": cfg.kid_subset_size, "seed": cfg.seed,
                "subset_sizes": sorted({kid_subset_size(r["n_samples"], r["n_reference"], cfg.kid_subset_size)
                                        for r in rows}),
                "subsets_of": "both sets, without replacement; size min(cap, half the smaller set)"},
        "notes": notes,
    }
    summary = {"rows": [{"name": r["name"], "fid": r["fid"], "kid_mean": r["kid_mean"], "params": r["params"],
                         "macs": r["macs"],
                         "images_per_s": None if r["throughput"] is None else r["throughput"]["images_per_s"],
                         **({"model_unavailable": r["model_unavailable"]} if r["model_unavailable"] else {}),
                         **({"macs_deepcache": r["deepcache"]["macs"]} if r["deepcache"] else {}),
                         **({"clip_score": r["clip_score"], "clip_cosine": r["clip_cosine"]}
                            if r["clip_score"] is not None else {}),
                         **({"macs_cfg": r["macs_cfg"]} if r["macs_cfg"] is not None else {})} for r in rows],
               "features": extractor.name, "reference": cfg.ref, "device": str(device)}
    with atomic_dir(out, force=cfg.force) as tmp:
        atomic_write_json(tmp / "report.json", report)
        atomic_write_bytes(tmp / "report.md", markdown_report(report).encode())
        measured = [r for r in rows if effective_macs(r) is not None]  # a row without its model has no MACs
        if measured:
            line_plot({r["name"]: ([effective_macs(r) / 1e9], [r["fid"]]) for r in measured},
                      tmp / "fid_vs_macs.png", title="FID against MACs (O2MKD paper, Fig. 6 style)",
                      xlabel="GMACs per denoising step", ylabel="FID")
        _grids(dirs, tmp / "grids.png")
        write_manifest(tmp, "scores", cfg.model_dump(mode="json"), parents=[parent_ref(d) for d in dirs],
                       summary=summary)
    return out


def classifier_classes(extractor) -> Optional[int]:
    """How many classes the feature extractor's classifier tells apart (its head's outputs), or None where it is no
    classifier (clean-fid's Inception)."""
    from o2mcli.scoring.features import FeatureExtractor

    if type(extractor).classify is FeatureExtractor.classify:
        return None
    head = getattr(getattr(extractor, "net", None), "head", None)
    n = getattr(head, "out_features", None)
    return int(n) if isinstance(n, int) else None


def _grids(dirs: list[Path], path: Path, most: int = 6) -> None:
    """The scored rows' sample grids side by side, labelled (skipped when a row was sampled with --no-png)."""
    from PIL import Image

    from o2mcli.viz import save_png, side_by_side

    grids = [d / "grid.png" for d in dirs[:most]]
    if len(grids) < 2 or not all(g.is_file() for g in grids):
        return
    panels = []
    for d, g in zip(dirs, grids):
        with Image.open(g) as im:
            panels.append((d.name, im.copy()))
    save_png(side_by_side(panels), path)
