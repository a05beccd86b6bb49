"""Small torch nets for the baseline stage, built from plain arguments (no recipe types here).

Images: MLP, CNN and ResNet classifiers over [B, C, H, W] inputs. Sequences: RNN, LSTM, GRU and a
tiny causal Transformer language model over [B, T] token ids. Batch norm and dropout are options
of every image net; `init_weights` applies Xavier or He initialisation to any of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

VISION_NETS = ("mlp", "cnn", "resnet")
SEQUENCE_NETS = ("rnn", "lstm", "gru", "transformer")


def init_weights(module: nn.Module, scheme: str) -> None:
    """Xavier (variance kept for tanh/linear units) or He (for ReLU units) on every weight matrix
    and kernel, zero biases; `default` keeps torch's own initialisation."""
    if scheme == "default":
        return
    for sub in module.modules():
        if isinstance(sub, nn.Linear | nn.Conv2d):
            if scheme == "xavier":
                nn.init.xavier_uniform_(sub.weight)
            elif scheme == "he":
                nn.init.kaiming_normal_(sub.weight, nonlinearity="relu")
            else:
                raise ValueError(f"unknown init scheme {scheme!r} (default, xavier, he)")
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _norm_1d(width: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm1d(width) if batch_norm else nn.Identity()


def _norm_2d(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class MLP(nn.Module):
    """Flatten -> [Linear -> (BatchNorm) -> ReLU -> Dropout] per hidden width -> Linear."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        dropout: float,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), _norm_1d(size, batch_norm), nn.ReLU()]
            layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, classes]
        return self.net(images)


class CNN(nn.Module):
    """Per width: 3x3 conv -> (BatchNorm) -> ReLU, halving the resolution between widths;
    then global average pooling -> Dropout -> Linear."""

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        num_classes: int,
        dropout: float,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for i, size in enumerate(channels):
            if i > 0:
                layers.append(nn.MaxPool2d(2))  # [B, C, H, W] -> [B, C, H/2, W/2]
            layers += [nn.Conv2d(width, size, 3, padding=1), _norm_2d(size, batch_norm), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(width, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class ResidualBlock(nn.Module):
    """out = ReLU(x' + conv(ReLU(conv(x)))), x' a strided 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=not batch_norm)
        self.norm1 = _norm_2d(out_channels, batch_norm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=not batch_norm)
        self.norm2 = _norm_2d(out_channels, batch_norm)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.skip = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=not batch_norm),
                _norm_2d(out_channels, batch_norm),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.skip(x) + self.norm2(self.conv2(out)))


class ResNet(nn.Module):
    """3x3 stem, then `blocks` residual blocks per width (stride 2 entering each later width),
    global average pooling -> Dropout -> Linear."""

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        blocks: int,
        num_classes: int,
        dropout: float,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=not batch_norm),
            _norm_2d(channels[0], batch_norm),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        width = channels[0]
        for i, size in enumerate(channels):
            for b in range(blocks):
                stride = 2 if i > 0 and b == 0 else 1
                stages.append(ResidualBlock(width, size, stride, batch_norm))
                width = size
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(width, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(images)))


def build_vision_net(
    net: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (128,),
    channels: Sequence[int] = (16, 32),
    blocks: int = 1,
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Module:
    """An image classifier over [B, C, H, W] inputs of `image_shape` (C, H, W)."""
    in_channels, height, width = image_shape
    if net == "mlp":
        return MLP(in_channels * height * width, hidden, num_classes, dropout, batch_norm)
    if net == "cnn":
        return CNN(in_channels, channels, num_classes, dropout, batch_norm)
    if net == "resnet":
        return ResNet(in_channels, channels, blocks, num_classes, dropout, batch_norm)
    raise ValueError(f"unknown vision net {net!r} (known: {', '.join(VISION_NETS)})")


class RecurrentLM(nn.Module):
    """Embedding -> RNN/LSTM/GRU -> Linear: next-token logits at every position."""

    def __init__(
        self,
        cell: str,
        vocab_size: int,
        embed_dim: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
    ) -> None:
        super().__init__()
        recurrent = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.rnn = recurrent(
            embed_dim,
            hidden_size,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, V]
        out, _ = self.rnn(self.embed(tokens))  # [B, T, hidden]
        return self.head(out)


class TransformerLM(nn.Module):
    """Token + learned position embeddings -> pre-norm causal Transformer encoder -> Linear."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        embed_dim: int,
        num_layers: int,
        num_heads: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.position = nn.Embedding(seq_len, embed_dim)
        layer = nn.TransformerEncoderLayer(
            embed_dim,
            num_heads,
            4 * embed_dim,
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, V]
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        x = self.embed(tokens) + self.position(positions)  # [B, T, D]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


def build_sequence_net(
    net: str,
    vocab_size: int,
    seq_len: int,
    *,
    embed_dim: int = 64,
    hidden_size: int = 128,
    num_layers: int = 1,
    num_heads: int = 4,
    dropout: float = 0.0,
) -> nn.Module:
    """A next-token model over [B, T] ids (T <= seq_len); the Transformer's width is embed_dim."""
    if net in ("rnn", "lstm", "gru"):
        return RecurrentLM(net, vocab_size, embed_dim, hidden_size, num_layers, dropout)
    if net == "transformer":
        return TransformerLM(vocab_size, seq_len, embed_dim, num_layers, num_heads, dropout)
    raise ValueError(f"unknown sequence net {net!r} (known: {', '.join(SEQUENCE_NETS)})")
