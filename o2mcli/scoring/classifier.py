"""A small CNN classifier of the 8x8 digits whose 64-d penultimate layer is the digits FID feature space.

Inception features (trained on 299x299 ImageNet photos) say little about 8x8 digits upscaled
37-fold; a classifier trained on the digits themselves is the domain feature network, as the
MNIST-classifier FIDs of the diffusion-distillation literature. The shipped weights
(``o2mcli/assets/digits_classifier.safetensors``) are reproduced by ``recipes/digits-classifier.sh``:

    python -m o2mcli.scoring.classifier --out o2mcli/assets/digits_classifier.safetensors --seed 0

It first trains on a fixed 80/20 split and reports the held-out accuracy, then trains the shipped
model the same way on all 1,797 images. Deterministic on CPU (one thread) for a given seed and torch version.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from o2mcli.errors import O2MError

ARCHITECTURE = "o2m-digits-cnn/1"  # conv3x3 1->32, pool, conv3x3 32->64, pool, linear 256->64, linear 64->10
FORMAT = "o2m-digits-classifier/1"
FEATURE_DIM = 64
INPUT_SHAPE = (1, 8, 8)
ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits_classifier.safetensors"


class DigitsCNN(nn.Module):
    """1x8x8 images in [0, 1] -> 10 logits.

    ``features`` is the 64-d feature layer (the linear layer before the ReLU and the logits),
    standardised per dimension with the mean and std it has on the 1,797 training digits
    (buffers ``feat_mean``, ``feat_std``, fixed when the model is made). The pre-activation has
    a full-rank covariance (after the ReLU about half the units are zero on every digit, which
    makes FID's covariance singular), and standardising puts KID's cubic kernel
    ``(x.y / d + 1)^3`` on the scale it was designed for.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 2 * 2, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)
        self.dropout = nn.Dropout(0.3)
        self.register_buffer("feat_mean", torch.zeros(FEATURE_DIM))
        self.register_buffer("feat_std", torch.ones(FEATURE_DIM))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 32 x 4 x 4
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 64 x 2 x 2
        return self.fc(x.flatten(1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.hidden(x) - self.feat_mean) / self.feat_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(F.relu(self.hidden(x))))

    @torch.no_grad()
    def set_feature_stats(self, x: torch.Tensor) -> None:
        """Fix the standardisation of ``features`` to the statistics of the images ``x``."""
        h = self.eval().hidden(x)
        self.feat_mean.copy_(h.mean(0))
        self.feat_std.copy_(h.std(0).clamp_min(1e-6))


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel in each direction (zero fill), one per image."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(8).view(1, 8))  # (n, 8)
    cols = (dx.view(n, 1) + torch.arange(8).view(1, 8))
    idx_n = torch.arange(n).view(n, 1, 1)
    return padded[idx_n, 0, rows.view(n, 8, 1), cols.view(n, 1, 8)].unsqueeze(1)


def _fit(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int, batch_size: int = 128,
         lr: float = 4e-3) -> DigitsCNN:
    """AdamW with cosine decay, 1-pixel shift augmentation; all randomness from one seeded generator."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        xb = _shift(x[idx], gen)
        loss = F.cross_entropy(model(xb), y[idx].long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of images classified correctly."""
    return float((model.eval()(x).argmax(1) == y.long()).float().mean())


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits as (1797, 1, 8, 8) floats in [0, 1] (value / 16) and their labels."""
    from o2mcli.data.digits import digits_arrays

    images, labels = digits_arrays()
    return torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def train_digits_classifier(seed: int = 0, steps: int = 1500, verbose: bool = True) -> tuple[DigitsCNN, float]:
    """Held-out accuracy from a fixed 80/20 split, then the final model trained on all 1,797 digits."""
    x, y = digits_tensors()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1234))  # the split is fixed
    n_train = int(round(0.8 * x.shape[0]))
    tr, te = perm[:n_train], perm[n_train:]
    probe = _fit(x[tr], y[tr], seed, steps)
    acc = accuracy(probe, x[te], y[te])
    if verbose:
        print(f"held-out accuracy (train {len(tr)}, test {len(te)}): {acc:.4f}", flush=True)
    model = _fit(x, y, seed, steps)
    model.set_feature_stats(x)
    if verbose:
        print(f"final model, training accuracy on all {x.shape[0]}: {accuracy(model, x, y):.4f}", flush=True)
    return model, acc


def save_classifier(path: Path, model: DigitsCNN, heldout_accuracy: float, seed: int, steps: int,
                    force: bool = True) -> Path:
    """Write the weights as safetensors with self-describing metadata, atomically."""
    from o2mcli.fsutil import atomic_file, check_output_free, save_safetensors

    path = Path(path)
    check_output_free(path, force)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "architecture": ARCHITECTURE,
        "heldout_accuracy": f"{heldout_accuracy:.4f}",
        "heldout_split": "80/20, permutation seed 1234",
        "seed": str(seed),
        "steps": str(steps),
        "feature_dim": str(FEATURE_DIM),
        "features": "linear 256->64 pre-activation, standardised with the training digits' mean and std",
        "input_shape": json.dumps(list(INPUT_SHAPE)),
        "input_range": "[0, 1] (digit value / 16)",
        "train_images": "1797",
        "torch": torch.__version__,
    }
    with atomic_file(path) as tmp:
        save_safetensors(state, tmp, metadata=meta)
    return path


def load_classifier(path: Path = ASSET) -> tuple[DigitsCNN, dict[str, str]]:
    """The classifier from its safetensors file (the shipped asset by default), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from o2mcli.fsutil import read_metadata

    path = Path(path)
    if not path.is_file():
        raise O2MError(f"{path}: the digits classifier is missing from this install "
                       "(recreate it with recipes/digits-classifier.sh)")
    try:
        meta = read_metadata(path)
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, O2MError) as e:
        raise O2MError(f"{path}: corrupt digits classifier ({str(e).splitlines()[0][:120]})") from e
    if meta.get("format") != FORMAT or meta.get("architecture") != ARCHITECTURE:
        raise O2MError(f"{path}: not an {ARCHITECTURE} classifier (metadata {meta.get('architecture')!r})")
    model = DigitsCNN()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise O2MError(f"{path}: weights do not match {ARCHITECTURE} ({str(e).splitlines()[0][:120]})") from e
    return model.eval(), meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m o2mcli.scoring.classifier", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ASSET)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one thread: the same bits on any machine, and fast enough (under a minute)
    t0 = time.perf_counter()
    model, acc = train_digits_classifier(seed=args.seed, steps=args.steps)
    save_classifier(args.out, model, acc, args.seed, args.steps)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
