"""Image file -> CLIP pixels float32 [3, S, S], exactly as LLaVA-1.5 (docs/REFERENCE.md §3.7).

`pad` (LLaVA finetune/eval): expand2square onto fill (122, 116, 104) at ((S-w)//2, (S-h)//2),
then PIL BICUBIC resize to SxS.  `square` (LLaVA pretraining): shortest edge -> S (long side
int(S*long/short)), then centre crop.  Then x/255, CLIP mean/std.

Speed without changing a single pixel.  PIL's resize is two separable passes (horizontal then
vertical) with uint8 rounding in between, and an output value differs by >=1/255 (~0.015 after
normalisation) when anything changes, so the 1e-4 parity budget means bit-identical uint8.
For a landscape image the square canvas only adds constant fill rows: their horizontal pass is
the fill colour exactly (PIL's fixed-point weights sum to 1 within rounding that cannot move a
value by a level).  So we run PIL's horizontal pass on the image rows only, paste that narrow
[S_rows, size] result onto fill, and run PIL's vertical pass: the same coefficients, the same
arithmetic, no full-resolution canvas (`resize_pad`).  A portrait image needs its padded
columns inside the horizontal pass, so it takes the canvas path (`resize_pad_reference`); the
only saving there is skipping the copy `convert('RGB')` makes of an RGB image.  JPEG `draft()`
and `reducing_gap` are not used: both change pixels well beyond the tolerance.
"""
from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from vflan_jax.data import skips
from vflan_jax.data.skips import BadRecord

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA: tuple(int(x * 255) for x in image_processor.image_mean)
PAD_FILL = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
ASPECTS = ("pad", "square")

# value v of channel c -> (v/255 - mean_c)/std_c, computed like the processor (float32 rescale,
# then normalise); a table lookup is ~10x cheaper than the arithmetic on every pixel.
_LUT = ((np.arange(256, dtype=np.float32)[None, :] * np.float32(1 / 255) - np.array(CLIP_MEAN, np.float32)[:, None])
        / np.array(CLIP_STD, np.float32)[:, None]).astype(np.float32)


def open_image(path: str | os.PathLike | BinaryIO, *, exif_transpose: bool = False,
               max_pixels: int | None = None) -> Image.Image:
    """Opens and decodes one image as mode RGB, like LLaVA's `Image.open(p).convert('RGB')`.

    `max_pixels` (default PIL's Image.MAX_IMAGE_PIXELS, 89.5 MP) is checked from the header,
    before decoding, so a decompression bomb costs nothing.  To admit images above PIL's own
    limit raise `PIL.Image.MAX_IMAGE_PIXELS` too.  Raises BadRecord (MISSING_IMAGE or
    UNREADABLE_IMAGE) whose message names the file; the caller adds the record id.
    """
    name = str(getattr(path, "name", path))
    cap = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        # Between 1x and 2x PIL's limit, open() only warns; the cap below rejects it.  (No
        # warnings.catch_warnings here: it is not thread-safe and Grain maps run in threads.)
        with Image.open(path) as img:
            w, h = img.size
            if cap is not None and w * h > cap:
                raise BadRecord(skips.UNREADABLE_IMAGE, f"image {name}: {w}x{h} = {w * h} pixels exceeds "
                                                        f"the cap of {cap} (decompression bomb?)")
            img.load()  # decoded data stays valid after the file closes
        if exif_transpose:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except FileNotFoundError as e:
        raise BadRecord(skips.MISSING_IMAGE, f"image {name}: file not found") from e
    except Image.DecompressionBombError as e:
        raise BadRecord(skips.UNREADABLE_IMAGE, f"image {name}: decompression bomb: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:  # truncated, corrupt, unknown format
        raise BadRecord(skips.UNREADABLE_IMAGE, f"image {name}: {type(e).__name__}: {e}") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """Mode -> RGB, deliberately per mode.

    RGB: unchanged (no copy).  RGBA/LA/PA/RGBa: alpha dropped, colour kept, exactly LLaVA's
    convert('RGB') (transparent pixels show whatever colour they store; not composited).
    P (also with transparency) / L / 1 / CMYK / YCbCr: PIL convert('RGB'), as LLaVA.
    I;16*, I (16-bit greyscale PNG/TIFF): scaled to 8 bit by round(v/257), where convert('RGB')
    would clip everything above 255 to white (deliberate difference from LLaVA).
    F: clipped to [0, 255] and rounded.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        v = np.asarray(img).astype(np.float32)
        v = np.clip(np.rint(v / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(v, "L").convert("RGB")
    if mode == "F":
        v = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return Image.fromarray(v, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        # Direct P->RGB warns about byte transparency; through RGBA gives the same colours.
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def expand2square(img: Image.Image, fill=PAD_FILL) -> Image.Image:
    """LLaVA's expand2square, verbatim: centre (floor) on a max(w,h) square of `fill`."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_pad_reference(img: Image.Image, size: int) -> Image.Image:
    """The literal path: full-resolution square canvas, then BICUBIC to size x size."""
    return expand2square(img).resize((size, size), Image.BICUBIC)


def resize_pad(img: Image.Image, size: int) -> Image.Image:
    """Same uint8 pixels as `resize_pad_reference` without the full-size canvas (module doc)."""
    w, h = img.size
    if h >= w:  # square or portrait: padded columns must be inside the horizontal pass
        return resize_pad_reference(img, size)
    # Landscape: canvas is w x w, image rows at w//2-ish; horizontal pass on image rows only.
    rows = img if w == size else img.resize((size, h), Image.BICUBIC)  # horizontal pass only
    tall = Image.new("RGB", (size, w), PAD_FILL)
    tall.paste(rows, (0, (w - h) // 2))
    return tall if w == size else tall.resize((size, size), Image.BICUBIC)  # vertical pass only


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """CLIPImageProcessor: shortest edge -> size, long -> int(size*long/short), centre crop."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    out = img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    if (new_w, new_h) == (size, size):
        return out
    return out.crop((left, top, left + size, top + size))


def normalize(img: Image.Image) -> np.ndarray:
    """RGB uint8 image -> float32 [3, H, W], (v/255 - mean)/std per channel."""
    chw = np.asarray(img).transpose(2, 0, 1)
    out = np.empty(chw.shape, np.float32)
    for c in range(3):
        out[c] = _LUT[c].take(chw[c])  # (np.take with out= is several times slower)
    return out


def pixels_from_image(img: Image.Image, *, image_size: int = 336, aspect: str = "pad",
                      exact_path: bool = False) -> np.ndarray:
    """RGB PIL image -> float32 [3, image_size, image_size]. `exact_path` forces the literal canvas."""
    if aspect == "pad":
        resized = (resize_pad_reference if exact_path else resize_pad)(img, image_size)
    elif aspect == "square":
        resized = resize_square(img, image_size)
    else:
        raise ValueError(f"image_aspect must be one of {ASPECTS}, got {aspect!r}")
    return normalize(resized)


def load_pixels(path: str | os.PathLike | BinaryIO, *, image_size: int = 336, aspect: str = "pad",
                exif_transpose: bool = False, max_pixels: int | None = None,
                exact_path: bool = False) -> np.ndarray:
    """File -> float32 [3, image_size, image_size]; raises BadRecord naming the file."""
    img = open_image(path, exif_transpose=exif_transpose, max_pixels=max_pixels)
    return pixels_from_image(img, image_size=image_size, aspect=aspect, exact_path=exact_path)
