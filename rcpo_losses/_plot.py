"""A dependency-free line chart: an RGB canvas in numpy, a 5x7 bitmap font, a PNG writer.

Just enough for the demo's figure (``python -m rcpo_losses.demo``): panels with axes,
ticks, grid lines, labelled lines with markers and a legend, written as an 8-bit RGB PNG
with ``zlib`` and ``struct``. Text is drawn in upper case.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np

# 5x7 glyphs, one hex byte per row (top first), bit 4 = leftmost column.
_GLYPHS = {
    line[0]: bytes.fromhex(line[2:])
    for line in [
        "0 0E 11 13 15 19 11 0E",
        "1 04 0C 04 04 04 04 0E",
        "2 0E 11 01 02 04 08 1F",
        "3 1F 02 04 02 01 11 0E",
        "4 02 06 0A 12 1F 02 02",
        "5 1F 10 1E 01 01 11 0E",
        "6 06 08 10 1E 11 11 0E",
        "7 1F 01 02 04 08 08 08",
        "8 0E 11 11 0E 11 11 0E",
        "9 0E 11 11 0F 01 02 0C",
        "A 0E 11 11 11 1F 11 11",
        "B 1E 11 11 1E 11 11 1E",
        "C 0E 11 10 10 10 11 0E",
        "D 1C 12 11 11 11 12 1C",
        "E 1F 10 10 1E 10 10 1F",
        "F 1F 10 10 1E 10 10 10",
        "G 0E 11 10 17 11 11 0F",
        "H 11 11 11 1F 11 11 11",
        "I 0E 04 04 04 04 04 0E",
        "J 07 02 02 02 02 12 0C",
        "K 11 12 14 18 14 12 11",
        "L 10 10 10 10 10 10 1F",
        "M 11 1B 15 15 11 11 11",
        "N 11 11 19 15 13 11 11",
        "O 0E 11 11 11 11 11 0E",
        "P 1E 11 11 1E 10 10 10",
        "Q 0E 11 11 11 15 12 0D",
        "R 1E 11 11 1E 14 12 11",
        "S 0F 10 10 0E 01 01 1E",
        "T 1F 04 04 04 04 04 04",
        "U 11 11 11 11 11 11 0E",
        "V 11 11 11 11 11 0A 04",
        "W 11 11 11 15 15 15 0A",
        "X 11 11 0A 04 0A 11 11",
        "Y 11 11 11 0A 04 04 04",
        "Z 1F 01 02 04 08 10 1F",
        "  00 00 00 00 00 00 00",
        "- 00 00 00 1F 00 00 00",
        ". 00 00 00 00 00 0C 0C",
        ", 00 00 00 00 0C 04 08",
        "( 02 04 08 08 08 04 02",
        ") 08 04 02 02 02 04 08",
        "[ 0E 08 08 08 08 08 0E",
        "] 0E 02 02 02 02 02 0E",
        "= 00 00 1F 00 1F 00 00",
        ": 00 0C 0C 00 0C 0C 00",
        "/ 00 01 02 04 08 10 00",
        "+ 00 04 04 1F 04 04 00",
        "| 04 04 04 04 04 04 04",
        "% 18 19 02 04 08 13 03",
        "_ 00 00 00 00 00 00 1F",
        "? 0E 11 01 02 04 00 04",
    ]
}
_BITS = {
    ch: np.unpackbits(np.frombuffer(rows, np.uint8)[:, None], axis=1)[:, 3:].astype(bool)
    for ch, rows in _GLYPHS.items()
}

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GRID = (225, 225, 225)
GRAY = (150, 150, 150)
BLUE, ORANGE, GREEN, RED, PURPLE = (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)


def write_png(path: str, image: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 array as an 8-bit RGB PNG (no filtering, zlib level 9)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected an (H, W, 3) array, got shape {image.shape}")
    h, w, _ = image.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


class Canvas:
    """An RGB image with a few drawing primitives; coordinates are (x right, y down) pixels."""

    def __init__(self, width: int, height: int, background: tuple[int, int, int] = WHITE):
        self.pixels = np.empty((height, width, 3), np.uint8)
        self.pixels[:] = background

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
        """Fill the rectangle ``[x0, x1) x [y0, y1)``, clipped to the canvas."""
        h, w, _ = self.pixels.shape
        x0, x1, y0, y1 = max(0, x0), min(w, x1), max(0, y0), min(h, y1)
        if x0 < x1 and y0 < y1:
            self.pixels[y0:y1, x0:x1] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: int = 1, dash: int = 0) -> None:
        """A straight line ``width`` pixels thick (squares stamped along it); ``dash > 0``: dashes that long."""
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        t = np.linspace(0.0, 1.0, steps)
        if dash:
            t = t[(np.arange(steps) // dash) % 2 == 0]
        xs = np.rint(x0 + t * (x1 - x0)).astype(int) - (width - 1) // 2
        ys = np.rint(y0 + t * (y1 - y0)).astype(int) - (width - 1) // 2
        h, w, _ = self.pixels.shape
        for dx in range(width):
            for dy in range(width):
                x, y = xs + dx, ys + dy
                keep = (x >= 0) & (x < w) & (y >= 0) & (y < h)
                self.pixels[y[keep], x[keep]] = color

    def marker(self, x: float, y: float, color, hollow: bool = False, size: int = 4) -> None:
        """A filled (or hollow) square marker centred on ``(x, y)``."""
        x, y = int(round(x)), int(round(y))
        self.rect(x - size, y - size, x + size + 1, y + size + 1, color)
        if hollow:
            self.rect(x - size + 2, y - size + 2, x + size - 1, y + size - 1, WHITE)

    def text(self, x: int, y: int, s: str, color=BLACK, scale: int = 2, anchor: str = "left") -> None:
        """Draw ``s`` with its top at ``y``; ``anchor`` ``left``/``center``/``right`` places ``x``."""
        s = s.upper()
        width = text_width(s, scale)
        x -= {"left": 0, "center": width // 2, "right": width}[anchor]
        for i, ch in enumerate(s):
            ys, xs = np.nonzero(_BITS.get(ch, _BITS["?"]))
            for dy in range(scale):
                for dx in range(scale):
                    px, py = x + i * 6 * scale + xs * scale + dx, y + ys * scale + dy
                    keep = (px >= 0) & (px < self.pixels.shape[1]) & (py >= 0) & (py < self.pixels.shape[0])
                    self.pixels[py[keep], px[keep]] = color


def text_width(s: str, scale: int = 2) -> int:
    return max(0, len(s) * 6 * scale - scale)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]`` at a step of 1, 2 or 5 times a power of ten."""
    span = max(hi - lo, 1e-9)
    raw = span / target
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first = math.floor(lo / step + 1e-9)
    return [round(i * step, 10) for i in range(first, math.ceil(hi / step - 1e-9) + 1)]


def line_panel(
    canvas: Canvas,
    box: tuple[int, int, int, int],
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    styles: dict[str, tuple[tuple[int, int, int], bool]],
    log2_x: bool = True,
) -> None:
    """One panel: ``series`` (name -> y values at ``x``) inside ``box = (left, top, right, bottom)``.

    ``styles[name] = (color, dashed)``: dashed lines get hollow markers.
    """
    left, top, right, bottom = box
    px0, px1, py0, py1 = left + 80, right - 10, top + 34, bottom - 58  # plot area inside the box
    xt = [math.log2(v) if log2_x else v for v in x]
    xlo, xhi = (min(xt) - 0.5, max(xt) + 0.5) if len(set(xt)) == 1 else (min(xt), max(xt))
    ys = [v for vals in series.values() for v in vals if math.isfinite(v)] or [0.0, 1.0]
    ticks = nice_ticks(min(ys), max(ys))
    ylo, yhi = ticks[0], ticks[-1] if ticks[-1] > ticks[0] else ticks[0] + 1

    def to_px(xv: float, yv: float) -> tuple[float, float]:
        margin = 0.04 * (px1 - px0)
        fx = (xv - xlo) / (xhi - xlo) if xhi > xlo else 0.5
        return px0 + margin + fx * (px1 - px0 - 2 * margin), py1 - (yv - ylo) / (yhi - ylo) * (py1 - py0)

    decimals = max(0, -math.floor(math.log10(ticks[1] - ticks[0]) + 1e-9)) if len(ticks) > 1 else 2
    for t in ticks:
        _, py = to_px(xlo, t)
        canvas.line(px0, py, px1, py, GRID)
        canvas.text(px0 - 8, int(py) - 7, f"{t:.{decimals}f}", anchor="right")
    for xv, label in zip(xt, x, strict=True):
        px, _ = to_px(xv, ylo)
        canvas.line(px, py0, px, py1, GRID)
        canvas.text(int(px), py1 + 8, f"{label:g}", anchor="center")
    canvas.line(px0, py0, px0, py1, BLACK, 2)
    canvas.line(px0, py1, px1, py1, BLACK, 2)
    canvas.text((px0 + px1) // 2, top + 6, title, anchor="center")
    canvas.text((px0 + px1) // 2, py1 + 32, xlabel, anchor="center")
    canvas.text(left + 4, py0 - 26, ylabel, scale=2)
    for name, vals in series.items():
        color, dashed = styles[name]
        pts = [to_px(xv, yv) for xv, yv in zip(xt, vals, strict=True) if math.isfinite(yv)]
        for (xa, ya), (xb, yb) in zip(pts, pts[1:], strict=False):
            canvas.line(xa, ya, xb, yb, color, 3, dash=8 if dashed else 0)
        for xa, ya in pts:
            canvas.marker(xa, ya, color, hollow=dashed)


def legend(canvas: Canvas, x: int, y: int, columns: Sequence[Sequence[str]], styles) -> None:
    """Line samples with names, one column per list of names."""
    for c, names in enumerate(columns):
        cx = x + sum(max(text_width(n) for n in col) + 70 for col in columns[:c])
        for i, name in enumerate(names):
            color, dashed = styles[name]
            cy = y + i * 24
            canvas.line(cx, cy + 7, cx + 40, cy + 7, color, 3, dash=8 if dashed else 0)
            canvas.marker(cx + 20, cy + 7, color, hollow=dashed)
            canvas.text(cx + 50, cy, name)
