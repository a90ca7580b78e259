"""The score report: rows as JSON, and a Markdown table in the style of the O2MKD paper's Table 1."""

from __future__ import annotations

from typing import Any, Callable

COLUMNS = ("Model", "Params (M)", "MACs (G)", "Throughput (img/s)", "FID", "KID x1e3", "n")


def _num(x: float) -> str:
    """Three significant figures for small numbers, one decimal for large ones."""
    x = float(x)
    if x != x:  # NaN
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


UNAVAILABLE = "unavailable"


def unavailable_text(row: dict[str, Any]) -> str:
    """'unavailable (reason)' for a row scored without its model (the samples moved away from it)."""
    why = row.get("model_unavailable")
    return f"{UNAVAILABLE} ({why})" if why else UNAVAILABLE


def _measured(value: Any, show: Callable[[Any], str]) -> str:
    """A cell of the model's measurements: ``show(value)``, or 'unavailable' where there was no model to measure."""
    return UNAVAILABLE if value is None else show(value)


def row_label(row: dict[str, Any]) -> str:
    """What the Model column says: the model's name, its sampler and steps (and DeepCache's N, layer branch and
    schedule)."""
    dc = row.get("deepcache")
    cache = f", DeepCache N={dc['interval']} B={dc['branch']} {dc.get('schedule') or 'uniform'}" if dc else ""
    return f"{row['model_name']} ({row['scheduler']}, {row['steps']} steps{cache})"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The Table-1-style Markdown table of score rows (with class accuracy where samples carry labels, the CLIP
    score where one was computed, MACs per guided step where a model is text-conditioned, and the DeepCache average
    where samples were drawn with it)."""
    acc = any(r.get("class_accuracy") is not None for r in rows)
    clip = any(r.get("clip_score") is not None for r in rows)
    cfg = any(r.get("macs_cfg") is not None for r in rows)
    dc = any(r.get("deepcache") for r in rows)
    cols = list(COLUMNS)
    if dc:
        cols.insert(cols.index("MACs (G)") + 1, "MACs w/ DeepCache (G)")
    if cfg:
        cols.insert(cols.index("MACs (G)") + 1, "MACs/step w/ CFG (G)")
    if clip:
        cols += ["CLIP score", "CLIP cos"]
    if acc:
        cols.append("Class acc.")
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for r in rows:
        cells = [
            row_label(r).replace("|", "\\|"),
            # Params names why a row has no measurements; the other cells say only 'unavailable'.
            unavailable_text(r).replace("|", "\\|") if r.get("params") is None else _num(r["params"] / 1e6),
            _measured(r.get("macs"), lambda v: _num(v / 1e9)),
            *([("-" if not r.get("deepcache") else _measured(r["deepcache"]["macs"], lambda v: _num(v / 1e9)))]
              if dc else []),
            *([(_num(r["macs_cfg"] / 1e9) if r.get("macs_cfg") is not None
                 else UNAVAILABLE if r.get("model_unavailable") else "-")] if cfg else []),
            _measured(r.get("throughput"), lambda tp: _num(tp["images_per_s"])),
            _num(r["fid"]),
            f"{_num(r['kid_mean'] * 1e3)} ± {_num(r['kid_std'] * 1e3)}",
            str(r["n_samples"]),
        ]
        if clip:
            cells.append("-" if r.get("clip_score") is None else _num(r["clip_score"]))
            cells.append("-" if r.get("clip_cosine") is None else f"{r['clip_cosine']:.4f}")
        if acc:
            cells.append("-" if r.get("class_accuracy") is None else f"{r['class_accuracy']:.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(report: dict[str, Any]) -> str:
    """``report.md``: the table, then what the numbers were measured with."""
    rows = report["rows"]
    feat, ref = report["features"], report["reference"]
    timed = [r["throughput"] for r in rows if r.get("throughput")]
    tp = timed[0] if timed else {}
    lines = ["# o2m scores", "", markdown_table(rows), ""]
    if timed:
        runs = report["throughput_repeats"]
        lines.append(f"- Device: {report['device']}; throughput = images/s of full sampling runs at batch "
                     f"{tp.get('batch_size', '?')} ({runs} timed run{'s' if runs != 1 else ''} after one warm-up), "
                     "with each row's sampler and steps.")
    else:
        lines.append(f"- Device: {report['device']}; no throughput measured (no row's model was available).")
    lines.append(f"- Features: {feat['name']} ({feat['description']}).")
    for what in dict.fromkeys(r["macs_what"] for r in rows if r.get("macs_what")):
        lines.append(f"- MACs of text-conditioned models: {what}. The MACs column is per UNet call; "
                     "'MACs/step w/ CFG' is per sampling step with classifier-free guidance (x2).")
    if any(r.get("deepcache") and r["deepcache"].get("macs") is not None for r in rows):
        lines.append("- DeepCache (Ma et al. 2024): 'MACs (G)' is one full forward; 'MACs w/ DeepCache' is MACs per "
                     "call averaged over the full and partial calls the sampling run made ("
                     + "; ".join(f"{r['name']}: {r['deepcache']['full_calls']} full x "
                                 f"{_num(r['deepcache']['full_macs'] / 1e9)} G + "
                                 f"{r['deepcache']['partial_calls']} partial x "
                                 f"{_num(r['deepcache']['partial_macs'] / 1e9)} G"
                                 for r in rows if r.get("deepcache") and r["deepcache"].get("macs") is not None)
                     + "); throughput is timed with the same cache schedule on.")
    for what in dict.fromkeys(t.get("what") for t in timed if t.get("what")):
        lines.append(f"- Throughput of text-conditioned models: {what}.")
    clip = report.get("clip")
    if clip:
        lines.append(f"- CLIP score (Hessel et al. 2021) = {clip['scaling']}, each image against its own prompt; "
                     f"CLIP weights {clip['weights']} ({clip.get('format_text', 'transformers CLIPModel')}, sha256 "
                     f"{clip['weights_sha256'][:12]}), images "
                     f"{clip['image_size']}x{clip['image_size']} ({clip['preprocessing']}), prompts cut at "
                     f"{clip['max_tokens']} tokens.")
    shape = "x".join(str(v) for v in ref["shape"])
    lines.append(f"- Reference: {ref['spec']} ({ref['n']} images of {shape}, {ref['source']}, "
                 f"sha256 {ref['sha256'][:12]}); FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) "
                 f"via clean-fid; KID mean ± std over {report['kid']['subsets']} subsets drawn from both sets "
                 f"(size {', '.join(map(str, report['kid'].get('subset_sizes', [])))}: half the smaller set, at "
                 f"most {report['kid']['subset_size']}).")
    notes = list(report.get("notes", []))
    for r in rows:
        notes += [f"{r['name']}: {w}" for w in r.get("warnings", [])]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
