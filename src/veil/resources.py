"""What a run will need in memory, estimated before anything large is allocated.

A run whose sizes are absurd (``--image-size 100000``, a generator ``width=100000``) would
otherwise try to allocate terabytes and die with ``MemoryError`` or the kernel's OOM killer. The
estimates here are deliberately rough (they only need to tell "fits" from "cannot possibly fit"):

* decoded images: ``N * C * S * S`` bytes (uint8), checked by the dataset loaders before decoding;
* the classifier: its parameters, their gradients and two optimiser moments (4 copies, float32),
  counted on a copy built at a small width and scaled by ``(width / probe width) ** 2``, and its
  activations for one training batch, measured by a forward pass of that copy on one image at a
  small side and scaled linearly in width and batch and quadratically in the image side (the
  outputs the backward pass keeps);
* the attack: what :meth:`veil.attacks.Attack.memory_bytes` says (a generator's weights, a grid).

Counting every leaf module's output overestimates what PyTorch keeps (ResNet-18 at 224x224, batch
128: about 29 GB estimated against 10 to 15 GB used), so a run is refused only when the estimate is
more than :data:`MARGIN` times the memory available: sizes that cannot fit, not runs that are tight.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from veil.errors import ConfigError

#: image side and width at which the classifier is probed (scaled from there)
PROBE_SIDE = 32
PROBE_WIDTH = 8
#: refuse only estimates above this multiple of the available memory
MARGIN = 2.0


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Memory free for a run on ``device``: CUDA's free device memory, else the host's available
    memory (``MemAvailable`` of ``/proc/meminfo``, or physical memory where that is missing)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        # memory this process's caching allocator holds but no tensor uses is free for the run too
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    meminfo = Path("/proc/meminfo")
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def check_fits(needed: float, what: str, hint: str, device: torch.device | str = "cpu") -> None:
    """Raise :class:`ConfigError` naming ``what`` and ``hint`` when ``needed`` bytes exceed
    :data:`MARGIN` times what ``device`` has free."""
    free = available_bytes(device)
    if needed > MARGIN * free:
        raise ConfigError(f"{what} needs about {format_bytes(needed)}, more than the {format_bytes(free)} of memory "
                          f"available; {hint}")


def image_bytes(count: int, image_size: int, channels: int = 3) -> int:
    return int(count) * channels * int(image_size) ** 2


def _leaf_output_numel(module: nn.Module, x: torch.Tensor) -> int:
    """Elements output by the leaf modules of ``module`` in a forward pass on ``x`` (no gradients)."""
    total = 0

    def hook(_m: nn.Module, _inp: object, out: object) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return total


def classifier_bytes(name: str, num_classes: int, image_size: int, width: int | None, batch_size: int,
                     channels: int = 3) -> int:
    """Estimated bytes to train classifier ``name``: 4 float32 copies of its parameters and one of
    a batch's activations (see the module docstring)."""
    from veil.models import create_model, model_class

    cls = model_class(name)
    side = PROBE_SIDE
    try:
        cls.check_image_size(side)
    except ConfigError:
        side = image_size if image_size <= 4 * PROBE_SIDE else 224
    probe_width = PROBE_WIDTH if width is not None else None
    model = create_model(name, num_classes=num_classes, image_size=side, width=probe_width, seed=0)
    params = sum(p.numel() for p in model.parameters())
    acts = _leaf_output_numel(model.eval(), torch.zeros(1, channels, side, side))
    scale = (width / PROBE_WIDTH) if width is not None else 1.0
    param_bytes = 4 * 4 * params * scale**2
    act_bytes = 4 * acts * scale * batch_size * (image_size / side) ** 2
    return int(param_bytes + act_bytes)


def module_bytes(factory: Callable[[], nn.Module], input_shape: tuple[int, ...], batch_size: int,
                 optimizer_copies: int = 4) -> int:
    """Estimated bytes to train the module ``factory()`` builds, measured without allocating it:
    built on PyTorch's meta device, its parameters (``optimizer_copies`` float32 copies: weights,
    gradients, Adam's two moments) and the outputs of its leaf modules for one input of
    ``input_shape`` (float32, times ``batch_size``)."""
    with torch.device("meta"):
        module = factory()
        params = sum(p.numel() for p in module.parameters())
        total = _leaf_output_numel(module, torch.zeros(1, *input_shape))
    return int(4 * optimizer_copies * params + 4 * total * batch_size)
