"""Small generative nets for the `generative` baseline task, built from plain arguments.

Every model works on discrete pixels: `levels` grey levels per channel, integer tensors
q [B, C, H, W] in 0..levels-1, and scores a batch by its negative log-likelihood in nats per
image (the VAE: the negative ELBO, an upper bound). Samples are integer pixels on the same grid.

- `VAE`: MLP encoder to a Gaussian latent, MLP decoder to a categorical per pixel.
- `DCGAN`: transposed-conv generator and strided-conv discriminator with batch norm (Radford et
  al. 2016), sized for small square images; no likelihood.
- `RealNVP`: affine coupling layers with alternating checkerboard masks after a logit transform
  (Dinh et al. 2017, without the squeeze/multi-scale levels an 8x8 image does not need); trained
  on uniformly dequantised pixels, whose likelihood bounds the discrete one.
- `PixelCNN`: a masked 7x7 convolution, masked 3x3 residual blocks and a categorical per pixel
  (van den Oord et al. 2016); exact likelihood, sampled one pixel at a time.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

GENERATIVE_NETS = ("vae", "gan", "flow", "pixelcnn")


def to_unit(q: torch.Tensor, levels: int) -> torch.Tensor:
    """Integer pixels 0..levels-1 -> float in [-1, 1] (the nets' input scale)."""
    return q.float() * (2.0 / (levels - 1)) - 1.0


class VAE(nn.Module):
    """x -> MLP -> (mu, log var) of z; z -> MLP -> logits [B, levels, C, H, W]."""

    def __init__(self, shape: tuple[int, int, int], levels: int, hidden: int, latent: int):
        super().__init__()
        self.shape, self.levels, self.latent = shape, levels, latent
        pixels = math.prod(shape)
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
            nn.ReLU(), nn.Linear(hidden, 2 * latent),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, pixels * levels),
        )  # fmt: skip

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # [B, latent] -> [B, levels, C, H, W]
        return self.decoder(z).view(len(z), self.levels, *self.shape)

    def nll(self, q: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Negative ELBO per image (nats): reconstruction cross-entropy + KL(q(z|x) || N(0, I))."""
        mu, log_var = self.encoder(to_unit(q, self.levels)).chunk(2, dim=1)  # [B, latent] each
        noise = torch.randn(mu.shape, generator=generator).to(mu.device)
        z = mu + noise * (0.5 * log_var).exp()
        recon = F.cross_entropy(self.decode(z), q, reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - log_var - 1).sum(1)
        return recon + kl

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Decoder means (the expected grey level per pixel) of z ~ N(0, I), rounded to levels."""
        device = next(self.parameters()).device
        z = torch.randn(count, self.latent, generator=generator).to(device)
        probs = self.decode(z).softmax(dim=1)  # [B, levels, C, H, W]
        grid = torch.arange(self.levels, device=device, dtype=probs.dtype)
        return torch.einsum("blchw,l->bchw", probs, grid).round().long()


class DCGAN(nn.Module):
    """Generator z -> [B, C, H, W] in [-1, 1] and discriminator image -> logit, H = W = 2^k."""

    def __init__(self, shape: tuple[int, int, int], levels: int, width: int, latent: int):
        super().__init__()
        channels, height, _ = shape
        self.latent, self.shape, self.levels = latent, shape, levels
        ups = int(math.log2(height)) - 1  # 2x2 -> H doubles `ups` times
        widths = [width * 2 ** (ups - 1 - i) for i in range(ups)]  # e.g. [2w, w] for 8x8
        gen: list[nn.Module] = [
            nn.Linear(latent, widths[0] * 4), nn.Unflatten(1, (widths[0], 2, 2)),
            nn.BatchNorm2d(widths[0]), nn.ReLU(),
        ]  # fmt: skip
        for a, b in zip(widths, widths[1:], strict=False):
            gen += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.ReLU()]
        gen += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]
        self.generator = nn.Sequential(*gen)
        disc: list[nn.Module] = [nn.Conv2d(channels, widths[-1], 4, 2, 1), nn.LeakyReLU(0.2)]
        for a, b in zip(widths[::-1], widths[::-1][1:], strict=False):
            disc += [nn.Conv2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.LeakyReLU(0.2)]
        disc += [nn.Flatten(), nn.Linear(widths[0] * 4, 1)]
        self.discriminator = nn.Sequential(*disc)

    def generate(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(self.parameters()).device
        z = torch.randn(count, self.latent, generator=generator).to(device)
        return self.generator(z)  # [B, C, H, W] in [-1, 1]

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of telling real images (label 1) from generated ones (label 0)."""
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
        return F.binary_cross_entropy_with_logits(
            real_logits, torch.ones_like(real_logits)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        """Non-saturating generator loss: -log D(G(z))."""
        logits = self.discriminator(fake)
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Generator outputs rounded to the nearest of the grey levels."""
        return ((self.generate(count, generator) + 1) * (self.levels - 1) / 2).round().long()


class AffineCoupling(nn.Module):
    """y = x on the mask, x * exp(s) + t off it, with (s, t) a conv net of the masked x."""

    def __init__(self, channels: int, hidden: int, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)  # [1, 1, H, W] of 0/1
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, 2 * channels, 3, padding=1),
        )  # fmt: skip
        nn.init.zeros_(self.net[-1].weight)  # start as the identity map
        nn.init.zeros_(self.net[-1].bias)
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    def _shift_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = x * self.mask
        raw_s, t = self.net(torch.cat([kept, self.mask.expand(len(x), 1, -1, -1)], 1)).chunk(2, 1)
        free = 1 - self.mask
        return self.scale * torch.tanh(raw_s) * free, t * free  # tanh keeps exp(s) bounded

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self._shift_scale(x)
        return x * s.exp() + t, s.flatten(1).sum(1)  # (y, log |det dy/dx| per image)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        s, t = self._shift_scale(y)  # the masked half is unchanged, so s and t are the same
        return (y - t) * (-s).exp()


class RealNVP(nn.Module):
    """Logit transform, then `layers` affine couplings on alternating checkerboards; z ~ N(0, I)."""

    alpha = 0.05  # logit(alpha + (1 - 2 alpha) x) keeps the logit away from 0 and 1

    def __init__(self, shape: tuple[int, int, int], levels: int, hidden: int, layers: int):
        super().__init__()
        channels, height, width = shape
        self.shape, self.levels = shape, levels
        board = ((torch.arange(height)[:, None] + torch.arange(width)) % 2).float()[None, None]
        self.couplings = nn.ModuleList(
            AffineCoupling(channels, hidden, board if i % 2 == 0 else 1 - board)
            for i in range(layers)
        )

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) (nats) of continuous x [B, C, H, W] in (0, 1)^D."""
        p = self.alpha + (1 - 2 * self.alpha) * x
        y = p.log() - (-p).log1p()
        log_det = (math.log(1 - 2 * self.alpha) - p.log() - (-p).log1p()).flatten(1).sum(1)
        for coupling in self.couplings:
            y, step_log_det = coupling(y)
            log_det = log_det + step_log_det
        normal = -0.5 * (y.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1)
        return normal + log_det

    def nll(self, q: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Dequantised NLL per image (nats): -log p((q + u) / levels) + D log(levels), u ~ U[0, 1).

        Its expectation over u bounds -log P(q) from above (Jensen), so bits/dim are honest.
        """
        u = torch.rand(q.shape, generator=generator).to(q.device)
        x = (q.float() + u) / self.levels
        return -self.log_density(x) + q[0].numel() * math.log(self.levels)

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """z ~ N(0, I) through the inverse flow, binned into the `levels` grey levels."""
        device = next(self.parameters()).device
        y = torch.randn(count, *self.shape, generator=generator).to(device)
        for coupling in reversed(self.couplings):
            y = coupling.inverse(y)
        x = (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)
        return (x * self.levels).floor().clamp(0, self.levels - 1).long()


class MaskedConv2d(nn.Conv2d):
    """A conv that sees only pixels above and to the left (type B: also the centre's features)."""

    def __init__(self, mask_type: str, in_channels: int, out_channels: int, kernel: int):
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2)
        mask = torch.ones_like(self.weight)  # [out, in, k, k]
        centre = kernel // 2
        mask[:, :, centre, centre + (mask_type == "B") :] = 0
        mask[:, :, centre + 1 :] = 0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class MaskedResidual(nn.Module):
    """x + 1x1(ReLU(masked 3x3(ReLU(1x1(ReLU(x)))))), the PixelCNN residual block."""

    def __init__(self, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(hidden, hidden // 2, 1), nn.ReLU(),
            MaskedConv2d("B", hidden // 2, hidden // 2, 3), nn.ReLU(),
            nn.Conv2d(hidden // 2, hidden, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PixelCNN(nn.Module):
    """p(q) = prod over pixels (raster order) of a categorical given the pixels before it.

    The channels of one pixel are predicted independently given the earlier pixels, which is
    still a proper distribution (exact likelihood) for grey and RGB images.
    """

    def __init__(self, shape: tuple[int, int, int], levels: int, hidden: int, layers: int):
        super().__init__()
        channels = shape[0]
        self.shape, self.levels = shape, levels
        self.net = nn.Sequential(
            MaskedConv2d("A", channels, hidden, 7),
            *(MaskedResidual(hidden) for _ in range(layers)),
            nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, channels * levels, 1),
        )  # fmt: skip

    def logits(self, q: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, levels, C, H, W]
        out = self.net(to_unit(q, self.levels))
        return out.view(len(q), self.levels, *self.shape)

    def nll(self, q: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact negative log-likelihood per image (nats); `generator` is unused (no noise)."""
        return F.cross_entropy(self.logits(q), q, reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Ancestral sampling in raster order: one forward pass per pixel."""
        device = next(self.parameters()).device
        q = torch.zeros(count, *self.shape, dtype=torch.long, device=device)
        _, height, width = self.shape
        for row in range(height):
            for col in range(width):
                probs = self.logits(q)[:, :, :, row, col].softmax(dim=1)  # [B, levels, C]
                flat = probs.permute(0, 2, 1).reshape(-1, self.levels).cpu()
                drawn = torch.multinomial(flat, 1, generator=generator).view(count, -1)
                q[:, :, row, col] = drawn.to(device)
        return q


def bits_per_dim(net: nn.Module, pixels: torch.Tensor, batch_size: int = 500) -> float:
    """Mean negative log2-likelihood per pixel of `pixels`, in eval mode, with fixed noise."""
    net.eval()
    generator = torch.Generator().manual_seed(0)  # dequantisation / latent noise, fixed
    with torch.no_grad():
        total = sum(net.nll(b, generator).sum().item() for b in pixels.split(batch_size))
    net.train()
    return total / (pixels.numel() * math.log(2))


def build_generative_net(
    net: str, shape: tuple[int, int, int], levels: int, hidden: int, latent: int, layers: int
) -> nn.Module:
    """A generative net for images of `shape` (C, H, W) with `levels` grey levels per channel."""
    if net == "vae":
        return VAE(shape, levels, hidden, latent)
    if net == "gan":
        return DCGAN(shape, levels, hidden, latent)
    if net == "flow":
        return RealNVP(shape, levels, hidden, layers)
    if net == "pixelcnn":
        return PixelCNN(shape, levels, hidden, layers)
    raise ValueError(f"unknown generative net {net!r} (known: {', '.join(GENERATIVE_NETS)})")
