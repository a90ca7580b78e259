"""DeepCache's partial step against the full step per layer branch: MACs of the SD 1.x, SDXL, ddpm-cifar10-32 U-Nets.

Every model is built on the meta device (shapes only: no memory, no download; MACs do not depend on the weights)
at its real size: SD 1.x (runwayml/stable-diffusion-v1-5's U-Net config) on 64x64 latents (512 px), SDXL base 1.0's
U-Net on 128x128 latents (1024 px), both with a 77-token text embedding (SDXL: and its pooled text and time ids), and
google/ddpm-cifar10-32 on 32x32 images. The full step is one forward; the partial step of layer branch B is the
forward ``o2m sample --deepcache N --cache-branch B`` runs between full steps (``o2mcli.models.families.unet_cache``:
conv_in, the down layers making skips 1..B, the up layers consuming skips B..0, the head), both counted by
``o2mcli.models.stats`` (convolutions and linear layers; attention-score matmuls not counted) at batch 1. DeepCache
reports branch 0 of SD 1.5 as about 6% of a full step (21 of 339 GMACs).

    python benchmarks/bench_deepcache.py [--branches 0,1,2] [--json]     (default: every branch of every model)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from o2mcli.models.configs import DDPM_CIFAR10_32
from o2mcli.models.families import family_of
from o2mcli.models.stats import count_deepcache_macs, count_macs
from o2mcli.pruning.pruners.sdxl_blocks import SDXL_BASE_CONFIG
from o2mcli.pruning.widths import reference_unet

# runwayml/stable-diffusion-v1-5's unet/config.json (the fields that shape the network)
SD15_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
    "attention_head_dim": 8, "norm_num_groups": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}

MODELS: dict[str, dict[str, Any]] = {
    "SD 1.x U-Net, 64x64 latents": SD15_CONFIG,
    "SDXL base U-Net, 128x128 latents": {**SDXL_BASE_CONFIG, "sample_size": 128},
    "ddpm-cifar10-32, 32x32": dict(DDPM_CIFAR10_32),
}


def rows(branches: list[int]) -> list[dict[str, Any]]:
    """Full and partial MACs per model and layer branch (the branches a model lacks are skipped)."""
    out = []
    for name, cfg in MODELS.items():
        unet = reference_unet(cfg)  # meta device
        n = family_of(unet).deepcache_branches(unet)
        full = count_macs(unet)
        for b in [b for b in branches if b < n] if branches else range(n):
            partial = count_deepcache_macs(unet, b)
            out.append({"model": name, "branches": n, "branch": b, "full_GMACs": full / 1e9,
                        "partial_GMACs": partial / 1e9, "ratio": partial / full})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--branches", default="", help="comma-separated layer branches (default: all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    got = rows([int(b) for b in args.branches.split(",") if b.strip()])
    if args.json:
        print(json.dumps({"rows": got}, indent=2))
        return
    print("| model | layer branches | B | full (GMACs) | partial (GMACs) | partial / full |")
    print("|---|--:|--:|--:|--:|--:|")
    for r in got:
        print(f"| {r['model']} | {r['branches']} | {r['branch']} | {r['full_GMACs']:.2f} | "
              f"{r['partial_GMACs']:.2f} | {r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
