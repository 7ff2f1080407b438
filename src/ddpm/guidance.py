"""Class-conditional sampling and classifier-free guidance (Ho & Salimans 2022).

A conditional network is called as ``model(x_t, t, labels)``, labels (B,) class indices, where index
``num_classes`` is "no class" (the unconditional model, learned by dropping labels to it in training).
The samplers take a model ``(x_t, t) -> output``; :func:`guided` turns a conditional network and the
requested labels into one, so every sampler, grid and option works unchanged:

    model_output = out_uncond + w (out_cond - out_uncond)

With eps prediction this is the guided noise eps_uncond + w (eps_cond - eps_uncond) of the paper's
eq. 6. The same line serves x0 and v prediction: at a fixed x_t and t, x0 and v are affine functions
of eps (x0 = (x_t - sigma eps) / alpha, v = (eps - sigma x_t) / alpha), and the weights 1 - w and w
add up to 1, so combining the outputs and then converting gives the guided eps exactly. Clipping and
thresholding then act on the guided x0, as on any prediction.

    model = guided(network, labels, guidance=3.0, num_classes=10)
    x = sample(model, schedule, (16, 1, 28, 28))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ddpm.diffusion import Model
from ddpm.validation import check_range

__all__ = ["guided", "class_labels"]


def guided(network: nn.Module | Model, labels: Tensor, guidance: float, num_classes: int) -> Model:
    """The model callable ``(x_t, t) -> output`` of ``network`` guided towards ``labels`` with weight w.

    labels: (B,) int64 class indices in 0..num_classes (num_classes: no class, an unconditional row).
    guidance: w >= 0. w = 1 is the conditional network alone and w = 0 the unconditional one: one call
    each. Any other w evaluates both halves in one batched call of 2B, the "no class" half second.
    """
    check_range("guidance", guidance, minimum=0.0)
    labels = torch.as_tensor(labels)
    if labels.dtype != torch.int64 or labels.ndim != 1:
        raise ValueError(f"labels must be a (B,) int64 tensor of class indices; got {labels.dtype} "
                         f"of shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes} ({num_classes} classes, {num_classes}: no class); "
                         f"got {int(labels.min())}..{int(labels.max())}")
    no_class = torch.full_like(labels, num_classes)
    if guidance == 1.0:
        return lambda x_t, t: network(x_t, t, labels.to(x_t.device))
    if guidance == 0.0:
        return lambda x_t, t: network(x_t, t, no_class.to(x_t.device))
    both = torch.cat([labels, no_class])

    def guided_model(x_t: Tensor, t: Tensor) -> Tensor:
        out = network(torch.cat([x_t, x_t]), torch.cat([t, t]), both.to(x_t.device))
        conditional, unconditional = out.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    return guided_model


def class_labels(asked: int | str | Sequence[int | str] | Tensor, classes: Sequence[str], n: int) -> Tensor:
    """The (n,) int64 class indices of ``asked``: one class (a name of ``classes`` or an index), repeated
    n times, or one per sample. A name wins over an index: for classes ("3", "7"), "7" is index 1.
    Raises ValueError naming an unknown class and listing the known ones."""
    if isinstance(asked, Tensor):
        asked = asked.tolist()
    one = isinstance(asked, (int, str))
    items = [asked] * n if one else list(asked)
    if len(items) != n:
        raise ValueError(f"labels: {len(items)} given for {n} samples; give one class or one per sample")
    names = {name: i for i, name in enumerate(classes)}
    out = []
    for item in items:
        if isinstance(item, str) and item in names:
            out.append(names[item])
        elif (isinstance(item, int) and not isinstance(item, bool)) or (isinstance(item, str) and item.isdigit()):
            index = int(item)
            if not 0 <= index < len(classes):
                raise ValueError(f"class {item!r}: not a class of this run; {_known(classes)}")
            out.append(index)
        else:
            raise ValueError(f"class {item!r}: not a class of this run; {_known(classes)}")
    return torch.tensor(out, dtype=torch.long)


def _known(classes: Sequence[str]) -> str:
    shown = ", ".join(classes[:20]) + (f" and {len(classes) - 20} more" if len(classes) > 20 else "")
    return f"its classes are {shown} (or an index 0..{len(classes) - 1})"
