"""3D sine positional encoding of a dense voxel grid (spec 03, section 2.2)."""

from __future__ import annotations

import math

import torch
from torch import nn


class SinePositionalEncoding3D(nn.Module):
    """DETR-style sine/cosine encoding of voxel positions, one channel block per axis.

    For a grid of size (X, Y, Z) the normalised coordinate along x is ``e = (i + 1) / (X + eps) * scale``
    (i = 0..X-1; likewise y, z). Channel ``2j`` of an axis block is ``sin(e / tau_j)`` and channel
    ``2j + 1`` is ``cos(e / tau_j)`` with ``tau_j = temperature ** (2j / num_feats)``. The output
    concatenates the blocks ``[x | y | z]``, so it has ``3 * num_feats`` channels. The operations are
    ordered like the released module so the float32 values agree bit for bit.

    Args:
        num_feats: channels per axis (must be even); 64 for 192-wide features.
        temperature: base of the frequency ladder.
        normalize: divide the 1-based index by the axis length and multiply by ``scale``.
        scale: the range of the normalised coordinate (``2 * pi``).
        eps: added to the axis length before dividing.
        offset: added to the 1-based index before normalising.
    """

    def __init__(
        self,
        *,
        num_feats: int = 64,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        if num_feats <= 0 or num_feats % 2:
            raise ValueError(
                f"SinePositionalEncoding3D: num_feats must be a positive even number, got {num_feats}"
            )
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    @property
    def out_channels(self) -> int:
        return 3 * self.num_feats

    def _axis_encoding(self, length: int, device: torch.device) -> torch.Tensor:
        """[length, num_feats] encoding of the 1-based positions along one axis."""
        embed = torch.arange(1, length + 1, dtype=torch.float32, device=device)  # = cumsum of ones
        if self.normalize:
            last = torch.tensor(float(length), dtype=torch.float32, device=device)
            embed = (embed + self.offset) / (last + self.eps) * self.scale
        index = torch.arange(self.num_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / self.num_feats)
        angles = embed[:, None] / dim_t  # [length, num_feats]
        # interleave: channel 2j = sin, channel 2j+1 = cos (both of frequency tau_j)
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(1)

    def forward(
        self,
        size: tuple[int, int, int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Encoding of every voxel of a grid, flattened in row-major (x, y, z) order (z fastest).

        Returns:
            [X * Y * Z, 3 * num_feats] tensor.
        """
        if len(size) != 3 or any(int(s) <= 0 for s in size):
            raise ValueError(f"SinePositionalEncoding3D: size must be three positive ints, got {tuple(size)}")
        sx, sy, sz = (int(s) for s in size)
        device = torch.device(device) if device is not None else torch.device("cpu")
        pos_x = self._axis_encoding(sx, device)[:, None, None, :].expand(sx, sy, sz, self.num_feats)
        pos_y = self._axis_encoding(sy, device)[None, :, None, :].expand(sx, sy, sz, self.num_feats)
        pos_z = self._axis_encoding(sz, device)[None, None, :, :].expand(sx, sy, sz, self.num_feats)
        pos = torch.cat((pos_x, pos_y, pos_z), dim=-1)  # [X, Y, Z, 3 * num_feats]
        return pos.reshape(sx * sy * sz, self.out_channels).to(dtype)
