"""Pixels: parity with transformers' CLIPImageProcessor (PIL backend), modes, bad files."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from vflan_jax.data import image, skips
from vflan_jax.data.skips import BadRecord

FILL = (122, 116, 104)


def llava_expand2square(pil_img, background_color):
    """LLaVA's llava/mm_utils.py expand2square, verbatim (independent of image.py)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


@pytest.fixture(scope="module")
def clip_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    # openai/clip-vit-large-patch14-336 preprocessor_config (docs/REFERENCE.md §3.7), PIL backend
    return CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                 image_std=[0.26862954, 0.26130258, 0.27577711])


def test_fill_colour_is_llava_mean_times_255():
    assert image.PAD_FILL == FILL


def test_parity_with_clip_processor_on_every_real_image(vflan_sample_dir, clip_processor):
    folder = vflan_sample_dir / "images"
    names = sorted(os.listdir(folder))
    assert len(names) >= 100
    worst = {"pad": 0.0, "square": 0.0}
    for name in names:
        rgb = Image.open(folder / name).convert("RGB")       # LLaVA's loading
        for aspect, ref_input in (("pad", llava_expand2square(rgb, FILL)), ("square", rgb)):
            ref = clip_processor(ref_input, return_tensors="np")["pixel_values"][0]
            ours = image.load_pixels(folder / name, image_size=336, aspect=aspect)
            assert ours.shape == (3, 336, 336) and ours.dtype == np.float32
            diff = float(np.abs(ours - ref).max())
            assert diff <= 1e-4, (name, aspect, diff)
            worst[aspect] = max(worst[aspect], diff)
    assert worst["pad"] <= 1e-4 and worst["square"] <= 1e-4


@pytest.mark.parametrize("size", [(97, 40), (40, 97), (1000, 333), (333, 1000), (64, 64), (17, 3), (3, 17),
                                  (500, 499), (336, 200), (200, 336)])
@pytest.mark.parametrize("out", [336, 32])
def test_fast_pad_is_bitwise_the_literal_canvas(size, out):
    rng = np.random.default_rng(sum(size) + out)
    img = Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8))
    fast = np.asarray(image.resize_pad(img, out))
    literal = np.asarray(llava_expand2square(img, FILL).resize((out, out), Image.BICUBIC))
    np.testing.assert_array_equal(fast, literal)


def test_normalize_values():
    img = Image.new("RGB", (2, 2), (0, 128, 255))
    x = image.normalize(img)
    expect = [(0 / 255 - 0.48145466) / 0.26862954, (128 / 255 - 0.4578275) / 0.26130258,
              (255 / 255 - 0.40821073) / 0.27577711]
    assert x.shape == (3, 2, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0], expect, atol=1e-6)


def _save(tmp_path, img, name, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_modes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (20, 30), dtype=np.uint8)

    # RGBA: alpha dropped, stored colour kept (LLaVA's convert('RGB'), no compositing)
    p = _save(tmp_path, Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "rgba.png")
    np.testing.assert_array_equal(np.asarray(image.open_image(p)), rgb)

    # L: grey replicated into 3 channels
    p = _save(tmp_path, Image.fromarray(alpha, "L"), "l.png")
    np.testing.assert_array_equal(np.asarray(image.open_image(p)), np.repeat(alpha[..., None], 3, -1))

    # P with transparency: palette colours, no warning-dependent behaviour
    pal = Image.fromarray(rgb).quantize(16)
    pal.info["transparency"] = 0
    p = _save(tmp_path, pal, "p.png", transparency=0)
    opened = Image.open(p)
    assert opened.mode == "P" and "transparency" in opened.info
    expect = np.asarray(pal.convert("RGBA"))[..., :3]
    np.testing.assert_array_equal(np.asarray(image.open_image(p)), expect)

    # CMYK JPEG -> RGB via PIL, as LLaVA
    cmyk = Image.fromarray(rgb).convert("CMYK")
    p = _save(tmp_path, cmyk, "cmyk.jpg", quality=95)
    got = image.open_image(p)
    assert got.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got), np.asarray(Image.open(p).convert("RGB")))

    # 16-bit greyscale PNG: scaled to 8 bit, not clipped to white
    v16 = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    p = _save(tmp_path, Image.fromarray(v16), "g16.png")
    assert Image.open(p).mode.startswith("I")
    got = np.asarray(image.open_image(p))
    np.testing.assert_array_equal(got[..., 0], [[0, 1, 128, 255]])
    assert (got[..., 0] == got[..., 2]).all()

    # 1-bit and LA
    p = _save(tmp_path, Image.fromarray(alpha > 127), "bw.png")
    np.testing.assert_array_equal(np.asarray(image.open_image(p))[..., 0], np.where(alpha > 127, 255, 0))
    p = _save(tmp_path, Image.fromarray(np.dstack([alpha, alpha]), "LA"), "la.png")
    np.testing.assert_array_equal(np.asarray(image.open_image(p))[..., 1], alpha)

    # every mode ends as float32 [3, S, S]
    for name in ("rgba.png", "l.png", "p.png", "cmyk.jpg", "g16.png", "bw.png", "la.png"):
        x = image.load_pixels(tmp_path / name, image_size=24)
        assert x.shape == (3, 24, 24) and x.dtype == np.float32 and np.isfinite(x).all()


def test_exif_orientation_only_on_request(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90 CW
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif.tobytes())
    assert image.open_image(p).size == (40, 20)              # LLaVA: orientation ignored
    assert image.open_image(p, exif_transpose=True).size == (20, 40)


def test_decompression_bomb_cap_names_file(tmp_path):
    p = _save(tmp_path, Image.new("RGB", (100, 100)), "big.png")
    with pytest.raises(BadRecord) as e:
        image.load_pixels(p, max_pixels=100 * 100 - 1)
    assert e.value.reason == skips.UNREADABLE_IMAGE and "big.png" in str(e.value)
    assert image.load_pixels(p, max_pixels=100 * 100, image_size=8).shape == (3, 8, 8)


def test_pil_decompression_bomb_error_becomes_bad_record(tmp_path, monkeypatch):
    p = _save(tmp_path, Image.new("RGB", (100, 100)), "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 10,000 px > 2x limit -> PIL raises
    with pytest.raises(BadRecord) as e:
        image.open_image(p, max_pixels=10**9)
    assert e.value.reason == skips.UNREADABLE_IMAGE and "bomb.png" in str(e.value)
    with pytest.raises(BadRecord):   # default cap = PIL's limit
        image.open_image(p)


def test_broken_files(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, "JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    garbage = tmp_path / "noise.png"
    garbage.write_bytes(b"\x89PNG not really")
    for path in (truncated, garbage):
        with pytest.raises(BadRecord) as e:
            image.load_pixels(path)
        assert e.value.reason == skips.UNREADABLE_IMAGE and path.name in str(e.value)
    with pytest.raises(BadRecord) as e:
        image.load_pixels(tmp_path / "absent.jpg")
    assert e.value.reason == skips.MISSING_IMAGE and "absent.jpg" in str(e.value)


def test_square_crop_matches_processor_on_synthetic(clip_processor):
    rng = np.random.default_rng(3)
    for size in [(500, 337), (337, 500), (336, 336), (20, 50)]:
        img = Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8))
        ref = clip_processor(img, return_tensors="np")["pixel_values"][0]
        assert np.abs(image.pixels_from_image(img, aspect="square") - ref).max() <= 1e-4


def test_unknown_aspect():
    with pytest.raises(ValueError, match="image_aspect"):
        image.pixels_from_image(Image.new("RGB", (4, 4)), aspect="crop")
