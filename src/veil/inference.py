"""Running a trained network over many images: one eval-mode context manager and one batched
inference helper that every evaluation, attack and defense uses.

* :func:`eval_mode` puts modules in eval mode and restores each one's own mode afterwards, also
  when the body raises (torchattacks' ``forward`` does the same around an attack).
* :func:`batched` applies a function to a tensor of images in chunks, without gradients, in eval
  mode: uint8 images become floats in ``[0, 1]``, each chunk moves to the model's device (in the
  channels-last layout where asked), bfloat16 autocast is on where asked and the device is CUDA,
  and the results are concatenated on the CPU (or kept on the device).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from veil.data.base import to_float


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); the CPU for a module without either."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode for ``modules`` inside the block; each gets its own earlier mode back after it."""
    was = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, was, strict=True):
            m.train(mode)


@torch.no_grad()
def batched(
    model: nn.Module,
    images: Tensor,
    fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    amp: bool = False,
    channels_last: bool = False,
    keep_device: bool = False,
    progress: bool = False,
    desc: str = "inference",
) -> Tensor:
    """``fn(model, chunk)`` over ``images`` ``(N, C, H, W)`` (uint8 or float in ``[0, 1]``) in
    chunks of ``batch_size``, concatenated along the first dimension.

    Args:
        model: the network, put in eval mode for the call (its mode is restored afterwards).
        fn: what to compute for a chunk (default ``model(chunk)``, as float32).
        device: where the chunks run (default: the model's device).
        amp: bfloat16 autocast on CUDA (ignored elsewhere).
        channels_last: give 4-D chunks the channels-last layout (the trainer's layout on the CPU).
        keep_device: leave the results on ``device`` instead of moving them to the CPU.
        progress: a progress bar over the images, titled ``desc``.

    Returns:
        The concatenated results; an empty tensor when ``images`` is empty.
    """
    dev = module_device(model) if device is None else torch.device(device)
    f = fn if fn is not None else (lambda m, x: m(x).float())
    out = []
    with eval_mode(model), tqdm(total=images.shape[0], desc=desc, unit="img", leave=False, disable=not progress or None) as bar:
        for i in range(0, images.shape[0], batch_size):
            xb = images[i : i + batch_size].to(dev)
            xb = to_float(xb) if xb.dtype == torch.uint8 else xb.float()
            if channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda"):
                r = f(model, xb)
            out.append(r if keep_device else r.cpu())
            bar.update(xb.shape[0])
    return torch.cat(out) if out else torch.empty(0)
