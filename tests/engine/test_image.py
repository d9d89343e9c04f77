"""Image loading, validation and preprocessing (architecture notes 2.0)."""

import numpy as np
import pytest
import torch
from PIL import Image

from engine.image import (IMAGE_SIZE, MAX_IMAGE_SIDE, ImageError, crop_to_foreground, load_image,
                          preprocess_image, to_rgba_array)
from helpers.paths import SHARED

SHARED_IMAGES = SHARED / "images"


def _disc_rgba(width=120, height=80, radius=20, centre=(60, 40), colour=(200, 30, 40)):
    yy, xx = np.mgrid[0:height, 0:width]
    inside = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius ** 2
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., :3] = colour
    rgba[..., 3] = np.where(inside, 255, 0)
    return rgba


@pytest.mark.skipif(not SHARED_IMAGES.is_dir(), reason="shared images not present")
@pytest.mark.parametrize("name", ["0.png", "4.png", "11.png"])
def test_shared_images_preprocess(name):
    image = preprocess_image(SHARED_IMAGES / name)
    assert image.shape == (4, IMAGE_SIZE, IMAGE_SIZE) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    mask = image[3] > 0
    assert mask.any()
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    # the object's longest side ends up about 518*518/550 = 488 px, centred with ~15 px margins
    longest = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    assert 470 <= int(longest) <= 492
    assert int(min(rows[0], cols[0])) >= 12
    assert int(max(rows[-1], cols[-1])) <= IMAGE_SIZE - 13
    # background away from the object (bilinear RGB vs nearest mask blur the rim) is pure white
    near_object = torch.nn.functional.max_pool2d(mask[None].float(), 9, stride=1, padding=4)[0] > 0
    assert torch.all(image[:3][:, ~near_object] == 1.0)


def test_disc_geometry_and_white_composite(tmp_path):
    path = tmp_path / "disc.png"
    Image.fromarray(_disc_rgba(), "RGBA").save(path)
    image = preprocess_image(path)
    mask = image[3] > 0.5
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    # a disc cropped to its bbox fills the square: diameter ~ 488 px, centred
    assert abs(int(rows[-1] - rows[0]) - 488) <= 4 and abs(int(cols[-1] - cols[0]) - 488) <= 4
    assert abs(float(rows.float().mean()) - 258.5) < 3 and abs(float(cols.float().mean()) - 258.5) < 3
    centre = image[:3, 259, 259]
    assert torch.allclose(centre, torch.tensor([200, 30, 40]) / 255.0, atol=1 / 255)
    assert torch.all(image[:3, 2, 2] == 1.0) and image[3, 2, 2] == 0


def test_half_transparent_pixels_composite_over_white():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = (0, 0, 0)
    rgba[..., 3] = 128
    image = preprocess_image(Image.fromarray(rgba, "RGBA"))
    # black at alpha 128/255 over white -> 1 - 128/255, truncated to 8 bits
    expected = np.floor((1 - 128 / 255) * 255) / 255
    assert torch.allclose(image[:3, 259, 259], torch.full((3,), expected, dtype=torch.float32), atol=1e-6)
    assert torch.isclose(image[3, 259, 259], torch.tensor(128 / 255.0))


def test_crop_tiny_foreground_keeps_whole_image():
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[10, 10, 3] = 255  # 1 pixel < 0.1 % of 10000
    assert crop_to_foreground(rgba).shape == (100, 100, 4)
    rgba[10:14, 20:23, 3] = 255  # 13 pixels >= 10
    cropped = crop_to_foreground(rgba)
    assert cropped.shape == (4, 13, 4)  # rows 10..13, cols 10..22 inclusive


def test_palette_with_transparency_uses_it(tmp_path):
    rgba = _disc_rgba()
    palette_image = Image.fromarray(rgba[..., :3], "RGB").convert("P")
    index = np.asarray(palette_image).copy()
    index[rgba[..., 3] == 0] = 255
    palette_image = Image.fromarray(index, "P")
    palette_image.putpalette([200, 30, 40] * 256)
    path = tmp_path / "palette.png"
    palette_image.save(path, transparency=255)
    loaded = load_image(path)
    assert loaded.mode == "RGBA"
    assert np.array_equal(np.asarray(loaded)[..., 3] > 0, rgba[..., 3] > 0)
    assert preprocess_image(path).shape == (4, IMAGE_SIZE, IMAGE_SIZE)


def test_rgb_without_remover_is_rejected_with_hint(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(_disc_rgba()[..., :3], "RGB").save(path)
    with pytest.raises(ImageError, match="background"):
        preprocess_image(path)


def test_opaque_rgba_goes_through_background_removal():
    rgba = _disc_rgba()
    opaque = rgba.copy()
    opaque[..., 3] = 255
    calls = []

    def remover(rgb):
        calls.append(rgb.size)
        return Image.fromarray(rgba[..., 3], "L")

    via_remover = preprocess_image(Image.fromarray(opaque, "RGBA"), background_remover=remover)
    direct = preprocess_image(Image.fromarray(rgba, "RGBA"))
    assert calls == [(120, 80)]
    assert torch.equal(via_remover, direct)


def test_remover_with_wrong_mask_size_is_reported():
    rgb = Image.fromarray(_disc_rgba()[..., :3], "RGB")
    with pytest.raises(ImageError, match="mask"):
        to_rgba_array(rgb, background_remover=lambda image: Image.new("L", (10, 10), 255))


def test_birefnet_folder_missing_is_explained(tmp_path):
    from engine.image import BiRefNetBackgroundRemover
    with pytest.raises(ImageError, match="BiRefNet"):
        BiRefNetBackgroundRemover(tmp_path / "nowhere")


@pytest.mark.parametrize("case", ["missing", "directory", "text", "truncated", "sixteen_bit", "empty_alpha",
                                  "too_small", "too_large"])
def test_bad_inputs(tmp_path, case):
    path = tmp_path / "input.png"
    expected = {"missing": "not found", "directory": "Not a file", "text": "not an image",
                "truncated": "truncated", "sixteen_bit": "16-bit", "empty_alpha": "no foreground",
                "too_small": "at least", "too_large": "limit"}[case]
    if case == "directory":
        path = tmp_path
    elif case == "text":
        path.write_text("hello, I am not a PNG")
    elif case == "truncated":
        noise = (np.random.default_rng(0).random((200, 200, 4)) * 255).astype(np.uint8)
        Image.fromarray(noise, "RGBA").save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "sixteen_bit":
        Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(path)
    elif case == "empty_alpha":
        Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(path)
    elif case == "too_small":
        Image.new("RGBA", (8, 64), (255, 0, 0, 255)).save(path)
    elif case == "too_large":
        # a header-only check: a huge 1-bit image is cheap to write
        Image.new("1", (MAX_IMAGE_SIDE + 1, 16)).save(path)
    with pytest.raises(ImageError, match=expected):
        preprocess_image(path)


def test_birefnet_remover_steps_with_a_stand_in_model():
    """The BiRefNet wrapper's own steps (1024 resize, ImageNet normalisation, sigmoid of the last
    output, 8-bit mask resized back) with a stand-in network: foreground where the input is red."""
    from engine.image import BiRefNetBackgroundRemover

    class RedDetector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(20.0))

        def forward(self, x):
            assert x.shape == (1, 3, 1024, 1024)
            red = x[:, 0:1] - x[:, 1:2]  # normalised red minus green
            return [torch.zeros_like(red), self.scale * (red - 1.0)]

    remover = object.__new__(BiRefNetBackgroundRemover)
    remover.device = torch.device("cpu")
    remover.model = RedDetector()
    rgb = np.full((60, 90, 3), 255, np.uint8)
    rgb[20:40, 30:60] = (230, 10, 10)
    mask = np.asarray(remover(Image.fromarray(rgb, "RGB")))
    assert mask.shape == (60, 90)
    assert mask[30, 45] > 200 and mask[5, 5] < 30
    image = preprocess_image(Image.fromarray(rgb, "RGB"), background_remover=remover)
    assert image.shape == (4, IMAGE_SIZE, IMAGE_SIZE) and image[3].max() > 0.5
