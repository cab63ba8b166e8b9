"""Small drawing helpers on numpy/PIL images: text, a class legend, placing images on a canvas.

Text uses the DejaVu Sans font that ships with matplotlib (PIL's built-in bitmap font if it cannot
be loaded), so pictures look the same on every machine without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@lru_cache(maxsize=16)
def font(size: int, bold: bool = False) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans (matplotlib's bundled font) at ``size`` pixels."""
    try:
        from matplotlib import font_manager

        props = font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal")
        return ImageFont.truetype(font_manager.findfont(props, fallback_to_default=True), size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default()


def text_size(text: str, size: int, bold: bool = False) -> tuple[int, int]:
    """``(width, height)`` in pixels of one line of text."""
    box = font(size, bold).getbbox(text)
    return int(box[2]), int(box[3])


def draw_text(
    canvas: Image.Image, xy: tuple[int, int], text: str, *, size: int, bold: bool = False, color=(20, 20, 20)
) -> None:
    """Write ``text`` with its top-left corner at ``xy``."""
    ImageDraw.Draw(canvas).text(xy, text, fill=tuple(color), font=font(size, bold))


def draw_label(canvas: Image.Image, xy: tuple[int, int], text: str, *, size: int = 13) -> None:
    """White text on a dark box (a caption laid over an image)."""
    w, h = text_size(text, size)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((xy[0], xy[1], xy[0] + w + 8, xy[1] + h + 6), fill=(30, 30, 30))
    draw.text((xy[0] + 4, xy[1] + 2), text, fill=(255, 255, 255), font=font(size))


def paste(canvas: Image.Image, image: np.ndarray, top: int, left: int) -> tuple[int, int, int, int]:
    """Paste a uint8 ``[H, W, 3]`` array; return its region ``(top, left, height, width)``."""
    canvas.paste(Image.fromarray(np.ascontiguousarray(image)), (left, top))
    return (top, left, image.shape[0], image.shape[1])


def resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize (class maps stay crisp)."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.NEAREST))


def resize_smooth(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area/bicubic resize for photographs."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))


@dataclass(frozen=True)
class LegendEntry:
    name: str
    color: tuple[int, int, int]


SWATCH = 14  # legend colour square, pixels


def legend_layout(entries: Sequence[LegendEntry], width: int, size: int = 13) -> tuple[int, int, int]:
    """``(columns, column width, total height)`` of a legend laid out in ``width`` pixels."""
    if not entries:
        return 0, 0, 0
    column = SWATCH + 6 + max(text_size(e.name, size)[0] for e in entries) + 18
    columns = max(1, min(len(entries), width // column))
    rows = -(-len(entries) // columns)
    return columns, column, rows * (SWATCH + 8)


def draw_legend(
    canvas: Image.Image, entries: Sequence[LegendEntry], top: int, left: int, width: int, size: int = 13
) -> int:
    """Draw colour swatches with names in columns; return the height used."""
    columns, column, height = legend_layout(entries, width, size)
    draw = ImageDraw.Draw(canvas)
    for i, entry in enumerate(entries):
        row, col = divmod(i, columns)
        x, y = left + col * column, top + row * (SWATCH + 8)
        draw.rectangle((x, y, x + SWATCH - 1, y + SWATCH - 1), fill=tuple(entry.color), outline=(90, 90, 90))
        draw.text((x + SWATCH + 6, y - 1), entry.name, fill=(20, 20, 20), font=font(size))
    return height
