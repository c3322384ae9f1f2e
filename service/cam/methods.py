"""CAM methods: what each one needs from the pass, what it costs, and how it turns that into maps.

A method is an entry of the ``METHODS`` table (name -> :class:`CamMethod`), added with
:func:`register_method`, which refuses a name twice. The engine reads :attr:`CamMethod.needs` to know
what the shared pass must provide (the target layer's activations always; gradients from the one
batched backward; a replay of the layers after the target layer; full forwards of perturbed inputs)
and hands the method a :class:`CamContext`. The method answers with *weighted activations*
``(T, n, C, h, w)`` (the map is their channel sum, or with ``smooth="eigen"`` their first principal
component) or, like EigenCAM, with maps directly.

Work that needs extra forwards is written as a generator that yields once per bounded chunk, so the
engine (and the scheduler above it) decides when the next chunk runs and can serve other requests
of the model in between, or stop.

Shapes: ``n`` images of a group, ``T`` targets (rows past an image's own targets repeat its last
one), ``C`` channels, ``(h, w)`` the layer's grid; ``A`` is ``(n, C, h, w)`` and ``G`` ``(T, n, C, h, w)``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from service.errors import InvalidArgument

# Keeps the GradCAM++ and XGradCAM denominators away from zero where a channel is silent.
_EPS = 1e-7

#: A method's computation: yields once after each chunk of extra work, returns ``(T, n, h, w)`` maps before ReLU.
Work = Generator[None, None, Tensor]


class Cost(StrEnum):
    """How a method's price grows, as listed by ``/models/{name}``."""

    FREE = "free"  # from the shared forward and backward
    REPLAY = "replay"  # one replay of the layers after the target layer per channel (closed form where possible)
    FORWARDS = "forwards"  # one full forward of a masked input per channel of the target layer
    BACKWARD = "backward"  # a second forward and backward down to the input


@dataclass(frozen=True)
class Needs:
    """What the engine must provide beyond the target layer's activations."""

    gradients: bool = False
    replay: bool = False
    forwards: bool = False
    input_gradients: bool = False

    @property
    def deferred(self) -> bool:
        """Work beyond the shared pass, run in chunks after it."""
        return self.replay or self.forwards or self.input_gradients


@dataclass(frozen=True)
class LinearHead:
    """The layers after the target layer are global average pooling then ``logits = W @ pooled + b``."""

    weight: Tensor  # (K, C)
    bias: Tensor | None  # (K,)


#: ``(output, images, rows)`` -> ``(B, T)`` float32: the targets of the group's images ``images`` ``(B,)`` scored on
#: rows ``rows`` ``(B,)`` of ``output`` (by default row ``b`` is image ``images[b]``'s), without gradients.
Rescore = Callable[[Any, Tensor, "Tensor | None"], Tensor]


@dataclass
class CamContext:
    """What the engine provides to a method for one group of images (same layer, same method).

    Extra passes (``forward``, ``replay``) return the model's own output; ``rescore`` reads the targets off it:
    a classifier's target logits, or another task's objectives, re-matched on the perturbed image (a detection
    that is lost scores 0, ``service.cam.tasks``)."""

    activations: Tensor  # (n, C, h, w) float32, detached
    gradients: Tensor | None  # (T, n, C, h, w) float32, when the method needs them
    targets: Tensor  # (T, n) int64 class indices (another task: its target columns)
    logits: Tensor  # (n, K) float32 of the shared forward (another task: (n, T) target scores)
    inputs: Tensor  # (n, 3, H, W) the model inputs
    forward: Callable[[Tensor], Any]  # (B, 3, H, W) -> the model's output, no grad
    # (B, C, h, w) activations at the layer, (B,) their images -> the output of the layers after it
    replay: Callable[[Tensor, Tensor], Any]
    rescore: Rescore
    head: LinearHead | None  # set when the replay has a closed form
    chunk_rows: int  # images per extra forward
    replay_rows: int = 0  # activations per replay chunk; 0: chunk_rows
    smooth: str | None = None
    guided: Callable[[], Tensor] | None = None  # -> (T, n, 3, H, W) guided-backprop input gradients


def reduce_weighted(weighted: Tensor, smooth: str | None) -> Tensor:
    """``(T, n, C, h, w)`` -> ``(T, n, h, w)``: channel sum, or the first principal component (``smooth="eigen"``)."""
    if smooth == "eigen":
        t, n, c, h, w = weighted.shape
        return principal_projection(weighted.reshape(t * n, c, h, w)).view(t, n, h, w)
    return weighted.sum(dim=2)


def _immediately(value: Tensor) -> Work:
    yield from ()
    return value


class CamMethod:
    """A CAM method. Subclasses set the class attributes and override :meth:`weighted` or :meth:`run`."""

    name: str = ""
    needs: Needs = Needs()
    cost: Cost = Cost.FREE
    citation: str = ""

    def extra_forwards(self, channels: int, closed_form: bool) -> int:
        """Extra forward (or replay) images per explained image, at a layer of ``channels`` channels."""
        return 0

    def weighted(self, ctx: CamContext) -> Tensor:
        """``(T, n, C, h, w)``: the activations weighted per channel (or per location)."""
        raise NotImplementedError

    def run(self, ctx: CamContext) -> Work:
        """Maps ``(T, n, h, w)`` before ReLU; a generator so that chunked work can be scheduled."""
        return _immediately(reduce_weighted(self.weighted(ctx), ctx.smooth))

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "cost": self.cost.value, "needs_gradients": self.needs.gradients}


METHODS: dict[str, CamMethod] = {}

M = TypeVar("M", bound=CamMethod)


def register_method(cls: type[M]) -> type[M]:
    """Class decorator: add one instance of ``cls`` to ``METHODS`` under ``cls.name``; names are unique."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS:
        raise ValueError(f"a CAM method named {cls.name!r} is already registered")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> CamMethod:
    """Look a method up by name, with the list of known names in the error."""
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidArgument(
            "method", f"`method` must be one of {', '.join(METHODS)}, got {name!r}"
        ) from None


# -- gradient methods: one weighting function each, all from the shared batched backward ----------

WeightFn = Callable[[Tensor, Tensor], Tensor]


class GradientMethod(CamMethod):
    """``map = ReLU(sum_k w_k(A, G) * A_k)`` (Selvaraju et al. 2017); ``w`` broadcasts to ``(T, n, C, h, w)``.

    ``channel_weights(A[None], G)`` sees ``A`` as ``(1, n, C, h, w)`` and ``G`` as ``(T, n, C, h, w)``; a method whose
    weights are one per channel (``(T, n, C, 1, 1)``) sets ``per_channel``, and its map is then a matrix product."""

    needs = Needs(gradients=True)
    per_channel = False

    @staticmethod
    def channel_weights(a: Tensor, g: Tensor) -> Tensor:
        raise NotImplementedError

    def gradients(self, ctx: CamContext) -> Tensor:
        """``ctx.gradients``, which the engine fills for every method that declares it needs them."""
        if ctx.gradients is None:
            raise ValueError(f"method {self.name!r} needs gradients")
        return ctx.gradients

    def weighted(self, ctx: CamContext) -> Tensor:
        a = ctx.activations[None]  # broadcast over the targets, not copied once per target
        return self.channel_weights(a, self.gradients(ctx)) * a

    def maps(self, ctx: CamContext) -> Tensor:
        """``(T, n, h, w)`` before ReLU."""
        if self.per_channel and ctx.smooth is None:
            # The channel sum of per-channel weights times A is a (T, C) x (C, h*w) product per image: no
            # (T, n, C, h, w) tensor (at lraspp's 960 x 14 x 14 with 8 images x 5 targets, 16 ms against 1 ms).
            a = ctx.activations
            weights = self.channel_weights(a[None], self.gradients(ctx))[..., 0, 0]
            return torch.einsum("tnc,nchw->tnhw", weights, a)
        return reduce_weighted(self.weighted(ctx), ctx.smooth)

    def run(self, ctx: CamContext) -> Work:
        return _immediately(self.maps(ctx))


@register_method
class GradCAM(GradientMethod):
    name = "gradcam"
    citation = "Selvaraju et al. 2017"
    per_channel = True

    @staticmethod
    def channel_weights(a: Tensor, g: Tensor) -> Tensor:
        return g.mean(dim=(-2, -1), keepdim=True)


@register_method
class GradCAMPlusPlus(GradientMethod):
    name = "gradcam++"
    citation = "Chattopadhay et al. 2018"
    per_channel = True

    @staticmethod
    def channel_weights(a: Tensor, g: Tensor) -> Tensor:
        # Eq. 19, with the exponential of the score folded into the gradient powers, the closed form
        # used by the reference implementations.
        g2 = g.pow(2)
        g3 = g2 * g
        denom = 2 * g2 + a.sum(dim=(-2, -1), keepdim=True) * g3
        alpha = g2 / (denom + _EPS)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        return (alpha * g.clamp(min=0)).sum(dim=(-2, -1), keepdim=True)


@register_method
class XGradCAM(GradientMethod):
    name = "xgradcam"
    citation = "Fu et al. 2020"
    per_channel = True

    @staticmethod
    def channel_weights(a: Tensor, g: Tensor) -> Tensor:
        # Gradients weighted by the activation's share of its channel total.
        total = a.sum(dim=(-2, -1), keepdim=True)
        return (g * a / (total + _EPS)).sum(dim=(-2, -1), keepdim=True)


@register_method
class HiResCAM(GradientMethod):
    name = "hirescam"
    citation = "Draelos & Carin 2020"

    @staticmethod
    def channel_weights(a: Tensor, g: Tensor) -> Tensor:
        # No spatial averaging, so the map is faithful to the logit.
        return g


@register_method
class LayerCAM(GradientMethod):
    name = "layercam"
    citation = "Jiang et al. 2021"

    @staticmethod
    def channel_weights(a: Tensor, g: Tensor) -> Tensor:
        return g.clamp(min=0)  # only positive gradients, per location


@register_method
class GradCAMElementwise(GradientMethod):
    """ReLU of gradient times activation per location, summed over channels."""

    name = "gradcam-elementwise"
    citation = "pytorch-grad-cam's GradCAMElementWise"

    def weighted(self, ctx: CamContext) -> Tensor:
        g = self.gradients(ctx)
        return (g * ctx.activations[None]).clamp(min=0)


@register_method
class EigenGradCAM(GradientMethod):
    """The first principal component of gradient times activation (sign as :func:`principal_projection`)."""

    name = "eigengradcam"
    citation = "pytorch-grad-cam's EigenGradCAM, after Muhammad & Yeasin 2020"

    def run(self, ctx: CamContext) -> Work:
        g = self.gradients(ctx)
        t, n, c, h, w = g.shape
        prod = (g * ctx.activations[None]).reshape(t * n, c, h, w)
        return _immediately(principal_projection(prod).view(t, n, h, w))


# -- gradient-free ----------------------------------------------------------------------------------

def principal_projection(a: Tensor) -> Tensor:
    """Project each location's activation vector on the first principal component.

    ``a``: ``(B, C, h, w)`` -> ``(B, h, w)``. Sign convention: SVD leaves the sign of the component
    arbitrary, so it is chosen to make the projection correlate positively with the channel-mean
    map of ``a``; a map that shows where the layer fires strongly, not where it is quiet.
    """
    b, c, h, w = a.shape
    x = a.reshape(b, c, h * w).transpose(1, 2).double()  # (B, hw, C): one row per location
    x = x - x.mean(dim=1, keepdim=True)
    # The projection on the first right singular vector, from the smaller Gram matrix's top eigenvector:
    # an eigendecomposition of a min(hw, C)-square matrix costs a fraction of an SVD of the whole (hw, C)
    # matrix (measured 3x on the shapes layer, 32 images). Double precision keeps the squared spectrum accurate.
    if h * w <= c:
        vals, vecs = torch.linalg.eigh(x @ x.transpose(1, 2))  # ascending: the last is the largest
        proj = vecs[:, :, -1] * vals[:, -1:].clamp(min=0).sqrt()
    else:
        _, vecs = torch.linalg.eigh(x.transpose(1, 2) @ x)
        proj = (x @ vecs[:, :, -1:]).squeeze(-1)
    proj = proj.float()
    mean_map = a.reshape(b, c, h * w).float().mean(dim=1)
    mean_map = mean_map - mean_map.mean(dim=1, keepdim=True)
    sign = torch.where((proj * mean_map).sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
    out: Tensor = (proj * sign).reshape(b, h, w)
    return out


@register_method
class EigenCAM(CamMethod):
    """The first principal component of the activations; the same map for every target."""

    name = "eigencam"
    citation = "Muhammad & Yeasin 2020"

    def run(self, ctx: CamContext) -> Work:
        t = ctx.targets.shape[0]
        proj = principal_projection(ctx.activations)  # (n, h, w)
        return _immediately(proj[None].expand(t, *proj.shape))


# -- perturbation methods: extra forwards, in chunks, shared by all targets of an image -------------

@register_method
class ScoreCAM(CamMethod):
    """Wang et al. 2020: each channel, upsampled and scaled to [0, 1], masks the input; the target's
    logit on each masked input, softmaxed over channels, weighs the channels.

    All targets of an image share its ``C`` masked forwards (the logits of every class come out of each).
    A channel that is constant over its map (a dead ReLU channel, common in the last block) scales to
    an all-zero mask, and every image masked by one is the same all-zero input: one forward of it
    serves all of them, exactly. The reference libraries run it once per such channel."""

    name = "scorecam"
    needs = Needs(forwards=True)
    cost = Cost.FORWARDS
    citation = "Wang et al. 2020"

    def extra_forwards(self, channels: int, closed_form: bool) -> int:
        return channels

    def run(self, ctx: CamContext) -> Work:
        a, x = ctx.activations, ctx.inputs
        n, c = a.shape[:2]
        size = (x.shape[2], x.shape[3])

        flat = a.flatten(2)
        live = ((flat.amax(dim=2) - flat.amin(dim=2)) > 0).flatten().nonzero()[:, 0]  # (image, channel) rows
        scores = a.new_zeros(n * c, ctx.targets.shape[0])  # (n * C, T): each target's score on each masked input
        step = max(1, ctx.chunk_rows)
        for start in range(0, live.numel(), step):
            # Only this chunk's masks exist at once.
            rows = live[start : start + step]
            img, ch = rows // c, rows % c
            up = F.interpolate(a[img, ch][:, None], size=size, mode="bilinear", align_corners=True)
            lo = up.amin(dim=(2, 3), keepdim=True)
            hi = up.amax(dim=(2, 3), keepdim=True)
            scores[rows] = ctx.rescore(ctx.forward(x[img] * ((up - lo) / (hi - lo + 1e-8)).to(x.dtype)), img, None)
            yield
        if live.numel() < n * c:
            # Every dead channel's mask is the same all-zero input: one forward of it, scored for every image.
            dead = torch.ones(n * c, dtype=torch.bool, device=a.device)
            dead[live] = False
            zero = ctx.rescore(ctx.forward(torch.zeros_like(x[:1])), torch.arange(n, device=a.device),
                               torch.zeros(n, dtype=torch.long, device=a.device))  # (n, T)
            scores[dead] = zero[dead.nonzero()[:, 0] // c]
            yield
        weights = scores.view(n, c, -1).permute(2, 0, 1).softmax(dim=-1)  # (T, n, C)
        return reduce_weighted(weights[..., None, None] * a[None], ctx.smooth)


@register_method
class AblationCAM(CamMethod):
    """Desai & Ramaswamy 2020: zero one channel at a time after the target layer; the relative drop
    of the target's score, ``(y - y_k) / y``, weighs channel ``k``.

    Only the layers after the target layer run, on the captured activation with one channel zeroed per
    row; a global-pool + linear head has the closed form ``y - y_k = W[c, k] * mean(A_k)``."""

    name = "ablationcam"
    needs = Needs(replay=True)
    cost = Cost.REPLAY
    citation = "Desai & Ramaswamy 2020"

    def extra_forwards(self, channels: int, closed_form: bool) -> int:
        return 0 if closed_form else channels + 1  # one replay per channel, and one of the image as it is

    def run(self, ctx: CamContext) -> Work:
        a = ctx.activations
        n, c = a.shape[:2]
        if ctx.head is not None:
            base = _gather_targets(ctx.logits[:, None, :], ctx.targets)[..., 0]  # (T, n)
            # (T, n, C): W[target, k] * mean(A_k)
            drop = ctx.head.weight.float()[ctx.targets] * a.mean(dim=(2, 3))[None]
            yield from ()
        else:
            # The first n rows replay the activations as they are: the base score comes from the same replay
            # as the ablated ones, not the shared forward, because the replay may run at another precision
            # and the drops are small differences of two scores. Row n + i * C + k zeroes channel k of image i.
            total = n + n * c
            step = ctx.replay_rows or ctx.chunk_rows
            outs: list[Tensor] = []
            for start in range(0, total, step):
                rows = torch.arange(start, min(total, start + step), device=a.device)
                ablated = rows - n
                img = torch.where(ablated >= 0, ablated.div(c, rounding_mode="floor"), rows)
                zero = F.one_hot(ablated.remainder(c), c).to(a.dtype) * (ablated >= 0).to(a.dtype)[:, None]
                outs.append(ctx.rescore(ctx.replay(a[img] * (1 - zero)[:, :, None, None], img), img, None))
                yield
            replayed = torch.cat(outs)  # (n + n * C, T)
            base = replayed[:n].T
            drop = base[..., None] - replayed[n:].view(n, c, -1).permute(2, 0, 1)
        weights = drop / base[..., None]
        return reduce_weighted(weights[..., None, None] * a[None], ctx.smooth)


def _gather_targets(scores: Tensor, targets: Tensor) -> Tensor:
    """``scores`` ``(n, R, K)``, ``targets`` ``(T, n)`` -> ``(T, n, R)``: each target's score in every row."""
    t = targets.shape[0]
    n, r, _ = scores.shape
    idx = targets[:, :, None, None].expand(t, n, r, 1)
    return scores[None].expand(t, *scores.shape).gather(3, idx)[..., 0]


@register_method
class GuidedGradCAM(GradientMethod):
    """Selvaraju et al. 2017: guided backpropagation to the input times the upsampled Grad-CAM.

    A map at the input's resolution: per pixel, the largest absolute guided gradient over the colour
    channels (the one-channel reduction of Simonyan et al. 2014), times Grad-CAM's map resized bilinearly."""

    name = "guided-gradcam"
    needs = Needs(gradients=True, input_gradients=True)
    cost = Cost.BACKWARD
    citation = "Selvaraju et al. 2017"
    per_channel = True
    channel_weights = staticmethod(GradCAM.channel_weights)  # Grad-CAM's map, then the guided gradients

    def run(self, ctx: CamContext) -> Work:
        if ctx.guided is None:
            raise ValueError(f"method {self.name!r} needs input gradients")
        cam = self.maps(ctx).clamp(min=0)  # (T, n, h, w)
        guided = ctx.guided()  # (T, n, 3, H, W)
        yield
        t, n, _, height, width = guided.shape
        up = F.interpolate(cam.reshape(t * n, 1, *cam.shape[2:]), size=(height, width), mode="bilinear",
                           align_corners=False).view(t, n, height, width)
        return up * guided.abs().amax(dim=2)
