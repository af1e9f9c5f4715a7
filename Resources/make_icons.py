"""Draws DeepMRI's 128x128 icons (extension and modules) so they can be remade and restyled.

Run `python Resources/make_icons.py` from the repository root; it needs only Pillow and numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
SCALE = 4  # drawn at 4x and downsampled, for smooth edges
ROOT = Path(__file__).resolve().parent.parent
BRAIN = (236, 188, 182)
OUTLINE = (120, 52, 60)
TISSUE = {"csf": (80, 160, 230), "gm": (150, 150, 150), "wm": (245, 245, 235)}
ACCENT = (40, 110, 200)


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGBA", (SIZE * SCALE, SIZE * SCALE), (0, 0, 0, 0))
    return image, ImageDraw.Draw(image)


def _s(*values: float) -> list[float]:
    return [value * SCALE for value in values]


def _hemisphere_outline(left: bool, inset: float = 0.0) -> list[tuple[float, float]]:
    """A hemisphere seen from above: a superellipse, fuller than an ellipse, frontal pole narrower."""
    centre_x = 38.0 if left else 90.0
    t = np.linspace(0, 2 * np.pi, 240, endpoint=False)
    rx, ry = 26.0 - inset, 55.0 - inset
    x = np.sign(np.cos(t)) * np.abs(np.cos(t)) ** 0.8 * rx
    y = np.sign(np.sin(t)) * np.abs(np.sin(t)) ** 0.8 * ry
    x *= 1.0 - 0.12 * (y < 0) * (-y / ry)  # narrower towards the front (top)
    return [
        (float(SCALE * (centre_x + a)), float(SCALE * (64.0 + b)))
        for a, b in zip(x, y, strict=True)
    ]


def _gyri(draw: ImageDraw.ImageDraw, colour: tuple[int, int, int], width: float) -> None:
    """Sulci as wavy strokes across each hemisphere, mirrored at the midline."""
    for row, y0 in enumerate(range(22, 112, 14)):
        x = np.linspace(18, 58, 40)
        y = y0 + 3.5 * np.sin((x + 7 * row) / 4.0)
        for mirror in (False, True):
            xs = 128 - x if mirror else x
            draw.line(
                [(SCALE * a, SCALE * b) for a, b in zip(xs, y, strict=True)],
                fill=colour,
                width=int(width * SCALE),
            )


def brain(fill: tuple[int, int, int] = BRAIN) -> Image.Image:
    image, draw = _canvas()
    for left in (True, False):
        draw.polygon(_hemisphere_outline(left), fill=fill)
    gyri, _ = _canvas()
    _gyri(ImageDraw.Draw(gyri), OUTLINE, 2.5)
    mask = Image.new("L", image.size, 0)
    for left in (True, False):
        ImageDraw.Draw(mask).polygon(_hemisphere_outline(left, inset=4), fill=255)
    image.paste(
        gyri, (0, 0), Image.fromarray(np.minimum(np.asarray(mask), np.asarray(gyri.split()[-1])))
    )
    for left in (True, False):
        draw.polygon(_hemisphere_outline(left), outline=OUTLINE, width=4 * SCALE)
    return image


def segmentation_brain() -> Image.Image:
    """Brain with tissue classes: CSF rim, grey-matter band, white-matter core, in label colours."""
    image, draw = _canvas()
    for left in (True, False):
        for inset, colour in ((0, TISSUE["csf"]), (4, TISSUE["gm"]), (11, TISSUE["wm"])):
            draw.polygon(_hemisphere_outline(left, inset), fill=colour)
        draw.polygon(_hemisphere_outline(left), outline=OUTLINE, width=4 * SCALE)
    return image


def network_badge(image: Image.Image, corner: tuple[float, float]) -> Image.Image:
    """A small three-layer network glyph on a white disc: 'a trained model'."""
    draw = ImageDraw.Draw(image)
    cx, cy = corner
    draw.ellipse(
        _s(cx - 27, cy - 27, cx + 27, cy + 27),
        fill=(255, 255, 255),
        outline=ACCENT,
        width=3 * SCALE,
    )
    layers = [[cy - 12, cy, cy + 12], [cy - 6, cy + 6], [cy]]
    xs = [cx - 14, cx, cx + 14]
    for (xa, ya_list), (xb, yb_list) in zip(
        zip(xs, layers, strict=True), zip(xs[1:], layers[1:], strict=True), strict=False
    ):
        for ya in ya_list:
            for yb in yb_list:
                draw.line(_s(xa, ya, xb, yb), fill=ACCENT, width=int(1.5 * SCALE))
    for x, ys in zip(xs, layers, strict=True):
        for y in ys:
            draw.ellipse(_s(x - 4, y - 4, x + 4, y + 4), fill=ACCENT)
    return image


def registration_brains() -> Image.Image:
    """A grey brain behind a shifted, tilted copy, with an arrow: 'align one to the other'."""
    back = brain((205, 205, 212)).resize((SIZE * SCALE * 3 // 4,) * 2, Image.LANCZOS)
    front = brain().resize((SIZE * SCALE * 3 // 4,) * 2, Image.LANCZOS).rotate(-14, expand=False)
    image, draw = _canvas()
    image.alpha_composite(back, (0, 0))
    image.alpha_composite(front, (SIZE * SCALE // 4, SIZE * SCALE // 4))
    draw = ImageDraw.Draw(image)
    draw.line(_s(88, 30, 40, 30), fill=ACCENT, width=6 * SCALE)
    draw.polygon(_s(28, 30, 44, 20, 44, 40), fill=ACCENT)
    return image


def superresolution_brain() -> Image.Image:
    """A brain in thick bands on the left, smooth on the right: 'thick slices to thin'."""
    image = brain()
    pixels = np.asarray(image).copy()
    half = pixels.shape[1] // 2
    band = 14 * SCALE
    for top in range(0, pixels.shape[0], band):
        pixels[top : top + band, :half] = pixels[min(top + band // 2, pixels.shape[0] - 1), :half]
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.line(_s(64, 6, 64, 122), fill=ACCENT, width=3 * SCALE)
    return image


def synthesis_brains() -> Image.Image:
    """A T1-like (white matter bright) and a T2-like (CSF bright) half: 'a new contrast'."""
    t1, t2 = _canvas()[0], _canvas()[0]
    for image, (csf, gm, wm) in (
        (t1, ((40, 40, 48), (130, 130, 135), (235, 235, 235))),
        (t2, ((245, 245, 250), (150, 150, 155), (70, 70, 78))),
    ):
        draw = ImageDraw.Draw(image)
        for left in (True, False):
            for inset, colour in ((0, csf), (4, gm), (11, wm)):
                draw.polygon(_hemisphere_outline(left, inset), fill=colour)
            draw.polygon(_hemisphere_outline(left), outline=OUTLINE, width=4 * SCALE)
    combined = np.asarray(t1).copy()
    combined[:, combined.shape[1] // 2 :] = np.asarray(t2)[:, combined.shape[1] // 2 :]
    return Image.fromarray(combined)


def finish(image: Image.Image, path: Path) -> None:
    shadow = image.split()[-1].filter(ImageFilter.GaussianBlur(3 * SCALE))
    backdrop = Image.new("RGBA", image.size, (0, 0, 0, 0))
    backdrop.putalpha(Image.fromarray((np.asarray(shadow) * 0.35).astype(np.uint8)))
    composed = Image.alpha_composite(backdrop, image)
    path.parent.mkdir(parents=True, exist_ok=True)
    composed.resize((SIZE, SIZE), Image.LANCZOS).save(path, optimize=True)


def main() -> None:
    icons = ROOT / "DeepMRI" / "Resources" / "Icons"
    finish(network_badge(brain(), (96, 96)), ROOT / "Resources" / "DeepMRI.png")
    finish(segmentation_brain(), icons / "DeepMRISegmentation.png")
    finish(network_badge(brain((225, 225, 232)), (96, 96)), icons / "DeepMRIModels.png")
    finish(registration_brains(), icons / "DeepMRIRegistration.png")
    finish(superresolution_brain(), icons / "DeepMRISuperResolution.png")
    finish(network_badge(synthesis_brains(), (100, 100)), icons / "DeepMRISynthesis.png")


if __name__ == "__main__":
    main()
