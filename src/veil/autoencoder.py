"""A small convolutional autoencoder: the pre-processing defense of Section 5.4 of the
frequency-domain backdoor paper, and the attacker's augmentation against it.

The paper ("Defending against frequency-based backdoor attacks") passes every input through "an
autoencoder trained on CIFAR10" before classification (after Liu et al., *Neural Trojans*, 2017)
and reports that this "can almost completely deactivate the frequency-based backdoor"; the attacker
answers by training on autoencoded images (Tables 6-8). The paper gives no architecture, so veil
uses a deliberately small one whose strided bottleneck acts as a learned low-pass filter:

::

    encoder  conv 3x3 stride 2, C -> 32, ReLU              32 x 16 x 16   (for a 32 x 32 input)
             conv 3x3 stride 2, 32 -> 64, ReLU             64 x  8 x  8
             conv 3x3, 64 -> 16                            16 x  8 x  8   (the code)
    decoder  transposed conv 4x4 stride 2, 16 -> 64, ReLU  64 x 16 x 16
             transposed conv 4x4 stride 2, 64 -> 32, ReLU  32 x 32 x 32
             conv 3x3, 32 -> C, sigmoid                     C x 32 x 32

The code holds 16 x 8 x 8 = 1,024 numbers for 3,072 input values (3x compression), about 78k
parameters. Images whose sides are not multiples of 4 are padded (replicate) and the output is
cropped back. Trained with the mean squared reconstruction error and Adam on *clean* images (the
defender's clean data; for the attacker's augmentation, the clean training set). Cost: about the
same per image as training veil's width-16 PreAct ResNet-18 (roughly 800 images per second on one
CPU core), seconds on a GPU.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from veil.data.base import ImageDataset, to_float
from veil.errors import CheckpointError, ConfigError
from veil.inference import batched, module_device
from veil.records import atomic_save_tensors, load_tensors

log = logging.getLogger(__name__)

FORMAT = "veil-autoencoder-1"


def _memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on CUDA only, as in :class:`veil.train.Trainer` (on the CPU, torch 2.15's
    channels-last convolution backward corrupts memory for some shapes)."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder for images in ``[0, 1]`` (architecture in the module docstring).

    Args:
        in_channels: image channels (3 for RGB).
        hidden: channels of the first encoder layer (the second has ``2 * hidden``).
        latent_channels: channels of the 4x-downsampled code.

    Example:
        >>> ae = ConvAutoencoder()
        >>> ae(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, in_channels: int = 3, hidden: int = 32, latent_channels: int = 16) -> None:
        super().__init__()
        if min(in_channels, hidden, latent_channels) < 1:
            raise ConfigError("autoencoder channel counts must be positive")
        self.in_channels = in_channels
        self.hidden = hidden
        self.latent_channels = latent_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * hidden, latent_channels, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent_channels, 2 * hidden, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * hidden, hidden, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, in_channels, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct ``x`` ``(B, C, H, W)`` in ``[0, 1]``; same shape out."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        out = self.decoder(self.encoder(x))
        return out[..., :h, :w]

    def architecture(self) -> dict[str, int]:
        return {"in_channels": self.in_channels, "hidden": self.hidden, "latent_channels": self.latent_channels}


def dataset_fingerprint(dataset: ImageDataset) -> str:
    """A short hash of a dataset's images (to tell whether a cached autoencoder fits a dataset)."""
    h = hashlib.sha256()
    h.update(str(tuple(dataset.images.shape)).encode())
    h.update(dataset.images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def autoencode(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Pass images through ``model`` in batches, in eval mode, without gradients.

    Args:
        model: the autoencoder (its device is used).
        x: ``uint8`` or float ``[0, 1]`` images ``(B, C, H, W)`` on any device.

    Returns:
        Float reconstructions in ``[0, 1]`` on ``x``'s device.
    """
    if x.shape[0] == 0:
        return torch.empty(x.shape, dtype=torch.float32, device=x.device)
    dev = module_device(model)
    out = batched(model, x, lambda m, xb: m(xb).contiguous(), batch_size=batch_size,
                  channels_last=_memory_format(dev) == torch.channels_last, keep_device=True)
    return out.to(x.device)


@torch.no_grad()
def reconstruction_mse(model: nn.Module, images: Tensor, batch_size: int = 512) -> float:
    """Mean squared reconstruction error on ``[0, 1]`` images (``uint8`` or float)."""
    total, n = 0.0, 0
    for i in range(0, images.shape[0], batch_size):
        xb = images[i : i + batch_size]
        xf = to_float(xb) if xb.dtype == torch.uint8 else xb.float()
        rec = autoencode(model, xf, batch_size)
        total += float(F.mse_loss(rec, xf, reduction="sum"))
        n += xf.numel()
    return total / max(n, 1)


def train_autoencoder(
    train: ImageDataset,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 1e-3,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    hidden: int = 32,
    latent_channels: int = 16,
) -> ConvAutoencoder:
    """Train a :class:`ConvAutoencoder` to reconstruct the (clean) images of ``train``.

    Mean squared error, Adam, uint8 images kept on the device and converted per batch (as
    :class:`veil.train.Trainer` does). Deterministic under ``seed`` (weight initialisation and
    shuffling) without touching the global RNG.

    Args:
        train: clean images (labels are ignored).
        epochs: passes over ``train`` (default 5: about 6,000 Adam steps on the GTSRB training set).
        batch_size: images per Adam step (default 32: more, smaller steps reconstruct better for
            the same compute; on an 8,000-image GTSRB subset, 5 epochs give a test reconstruction
            PSNR of 26.1 dB at batch 32 against 22.1 dB at batch 128).
        lr: Adam learning rate (default 1e-3, Adam's usual value).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a device.
        seed: seed of initialisation and shuffling.
        progress: show a progress bar.
        hidden, latent_channels: architecture (see :class:`ConvAutoencoder`).

    Returns:
        The trained autoencoder in eval mode on ``device``; ``model.history`` lists the mean
        training loss per epoch.
    """
    from veil.train import resolve_device

    if epochs < 1:
        raise ConfigError(f"autoencoder epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"autoencoder batch size must be at least 1, got {batch_size}")
    if not lr > 0:
        raise ConfigError(f"autoencoder learning rate must be positive, got {lr}")
    if len(train) == 0:
        raise ConfigError("cannot train an autoencoder on an empty dataset")
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConvAutoencoder(train.image_shape[0], hidden=hidden, latent_channels=latent_channels)
    model.to(dev).train()
    fmt = _memory_format(dev)
    model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    images = train.images.to(dev)
    n = len(train)
    steps = math.ceil(n / batch_size)
    history: list[float] = []
    bar = tqdm(total=epochs * steps, desc="autoencoder", unit="step", leave=False, disable=not progress or None)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).to(dev)
        total = 0.0
        for s in range(steps):
            xb = to_float(images[order[s * batch_size : (s + 1) * batch_size]]).contiguous(memory_format=fmt)
            loss = F.mse_loss(model(xb), xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * xb.shape[0]
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, mse=f"{total / min(n, (s + 1) * batch_size):.5f}")
        history.append(total / n)
        log.info("autoencoder epoch %d/%d: reconstruction mse %.6f", epoch + 1, epochs, history[-1])
    bar.close()
    model.eval()
    model.history = history  # type: ignore[assignment]
    return model


def save_autoencoder(model: ConvAutoencoder, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save the weights (safetensors, atomically) with the architecture and ``metadata``."""
    meta = {"format": FORMAT, **{k: str(v) for k, v in model.architecture().items()}, **(metadata or {})}
    atomic_save_tensors(path, dict(model.state_dict()), metadata=meta)


def autoencoder_metadata(path: str | Path) -> dict[str, str]:
    """The metadata stored by :func:`save_autoencoder` (empty if the file has none)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for corrupted headers
        raise CheckpointError(f"autoencoder file {path} is corrupted or truncated ({exc})") from exc


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> ConvAutoencoder:
    """Load an autoencoder saved by :func:`save_autoencoder`.

    Raises:
        CheckpointError: the file is missing, corrupted, or not a veil autoencoder.
    """
    state = load_tensors(path)
    meta = autoencoder_metadata(path)
    try:
        arch = {k: int(meta[k]) for k in ("in_channels", "hidden", "latent_channels")}
        model = ConvAutoencoder(**arch)
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a veil autoencoder ({type(exc).__name__}: {exc})") from exc
    dev = torch.device(device)
    return model.to(dev).to(memory_format=_memory_format(dev)).eval()


def cached_autoencoder(
    path: str | Path,
    train: ImageDataset,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 1e-3,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
) -> ConvAutoencoder:
    """Load the autoencoder at ``path`` if it was trained with these settings on these images,
    else train one with :func:`train_autoencoder` and save it there.

    The settings and a fingerprint of ``train``'s images are kept in the file's metadata, so a
    changed training set or option retrains instead of silently reusing a stale model.
    """
    from veil.train import resolve_device

    dev = resolve_device(device)
    path = Path(path)
    wanted = {
        "epochs": str(epochs),
        "batch_size": str(batch_size),
        "lr": repr(float(lr)),
        "seed": str(seed),
        "train_fingerprint": dataset_fingerprint(train),
        "train_size": str(len(train)),
    }
    if path.is_file():
        try:
            meta = autoencoder_metadata(path)
            if all(meta.get(k) == v for k, v in wanted.items()):
                log.info("reusing the autoencoder in %s", path)
                return load_autoencoder(path, dev)
            log.info("the autoencoder in %s was trained differently; retraining", path)
        except CheckpointError as exc:
            log.warning("%s; retraining", exc)
    model = train_autoencoder(train, epochs=epochs, batch_size=batch_size, lr=lr, device=dev, seed=seed, progress=progress)
    history = getattr(model, "history", [])
    save_autoencoder(model, path, {**wanted, "final_mse": repr(history[-1]) if history else ""})
    return model
