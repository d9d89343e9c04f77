"""Input image loading, validation and the Direct3D-S2 preprocessing (architecture notes 2.0).

The result of :func:`preprocess_image` is a float32 tensor ``[4, 518, 518]``: RGB in [0, 1]
composited over white, plus the alpha mask (alpha / 255, zero in the padding).

Accepted input
--------------
* Any format Pillow reads (PNG, JPEG, WebP, BMP, TIFF, ...), 8 bits per channel. Modes ``1``, ``L``,
  ``LA``, ``P``/``PA`` (palette, its transparency becomes alpha), ``RGB``, ``RGBA``, ``CMYK``,
  ``YCbCr``, ``LAB``, ``HSV`` are converted to RGB or RGBA.
* Rejected with :class:`ImageError`: missing/unreadable/truncated files, files that are not images,
  16-bit and floating-point images (modes ``I;16*``, ``I``, ``F``), images smaller than
  ``MIN_IMAGE_SIDE`` or larger than ``MAX_IMAGE_SIDE`` pixels on a side or ``MAX_IMAGE_PIXELS``
  pixels in total, and images whose alpha has no foreground pixel.
* Animated images: the first frame is used. EXIF orientation is applied (a phone photo is used the
  way it is displayed; the official code ignores the tag).

Alpha: an image with a non-trivial alpha channel uses it as the object mask (like the official
pipeline). An image without alpha, or whose alpha is fully opaque everywhere (which would turn the
whole picture into the "object"), goes through background removal (BiRefNet, see
:class:`BiRefNetBackgroundRemover`), which must be installed and available in a local folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SIZE = 518          # DINOv2 input size used by Direct3D-S2
EXTRA_PAD = 16            # margin added before the second resize (test-time value of the official code)
MIN_IMAGE_SIDE = 16
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 40_000_000
# Below this fraction of foreground pixels the official crop keeps the whole image.
MIN_FOREGROUND_FRACTION = 0.001
BIREFNET_INPUT_SIZE = 1024
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageSource = Union[str, os.PathLike, Image.Image]
# A background remover takes an RGB PIL image and returns an 8-bit ``L`` mask of the same size.
BackgroundRemover = Callable[[Image.Image], Image.Image]

_HIGH_BIT_DEPTH_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;16S"}
_TO_RGB_MODES = {"1", "L", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_TO_RGBA_MODES = {"LA", "La", "PA", "RGBa", "RGBA"}


class ImageError(ValueError):
    """The input image cannot be used; the message says why and what to do."""


def _describe(source) -> str:
    return str(source) if not isinstance(source, Image.Image) else "the given PIL image"


def _check_size(width: int, height: int, what: str) -> None:
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageError(f"{what} is {width}x{height} pixels; the smallest side must be at least "
                         f"{MIN_IMAGE_SIDE} pixels.")
    if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{what} is {width}x{height} pixels; the limit is {MAX_IMAGE_SIDE} pixels per "
                         f"side and {MAX_IMAGE_PIXELS // 1_000_000} megapixels. Downscale it first "
                         f"(the model sees {IMAGE_SIZE}x{IMAGE_SIZE} anyway).")


def load_image(source: ImageSource) -> Image.Image:
    """Open and validate an image; returns a fully decoded 8-bit ``RGB`` or ``RGBA`` PIL image."""
    what = _describe(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        if not path.exists():
            raise ImageError(f"Image file not found: {path}")
        if not path.is_file():
            raise ImageError(f"Not a file: {path}")
        try:
            image = Image.open(path)
        except UnidentifiedImageError:
            raise ImageError(f"{path} is not an image Pillow can read (unknown or corrupt format).") from None
        except Image.DecompressionBombError:
            raise ImageError(f"{path} is far too large to decode safely; the limit is {MAX_IMAGE_SIDE} "
                             f"pixels per side.") from None
        except OSError as error:
            raise ImageError(f"Cannot read {path}: {error}") from None
    # Check the header size before decoding the pixels.
    _check_size(image.width, image.height, what)
    if getattr(image, "is_animated", False):
        image.seek(0)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{what} is truncated or corrupt and cannot be decoded ({error}).") from None
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        raise ImageError(f"{what} has mode {image.mode!r} (16-bit or floating point), which is not "
                         f"supported; save it as an 8-bit RGBA or RGB image.")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not reject an otherwise fine image
        pass
    mode = image.mode
    if mode in ("P", "L", "RGB") and "transparency" in image.info:
        return image.convert("RGBA")
    if mode == "P":
        return image.convert("RGB")
    if mode in _TO_RGBA_MODES:
        return image if mode == "RGBA" else image.convert("RGBA")
    if mode in _TO_RGB_MODES:
        return image if mode == "RGB" else image.convert("RGB")
    raise ImageError(f"{what} has unsupported image mode {mode!r}; save it as an 8-bit RGBA or RGB image.")


def has_useful_alpha(image: Image.Image) -> bool:
    """True for an RGBA image whose alpha is not fully opaque everywhere."""
    if image.mode != "RGBA":
        return False
    low, _high = image.getchannel("A").getextrema()
    return low < 255


class BiRefNetBackgroundRemover:
    """Background removal with BiRefNet (the model the official pipeline uses), loaded from a local
    folder holding a download of ``ZhengPeng7/BiRefNet`` (``python -m engine weights download
    --background-removal`` fetches it). Needs ``transformers`` (and ``timm``, ``kornia``, which
    BiRefNet's model code imports). The model code in that folder is executed
    (``trust_remote_code``), so only point this at a download you trust.

    Steps as in the official code: RGB resized to 1024x1024 (bilinear, no aspect preservation),
    ImageNet normalisation, ``sigmoid`` of the last output, 8-bit mask resized back to the original
    size with Pillow's default resampling.
    """

    def __init__(self, weights_dir: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"):
        folder = Path(weights_dir)
        if not (folder / "config.json").is_file():
            raise ImageError(
                f"The image has no transparent background, so background removal is needed, but no "
                f"BiRefNet model was found in {folder} (expected config.json and the weights). Download it "
                f"with `python -m engine weights download --background-removal`, or give an RGBA image "
                f"with the background already removed.")
        try:
            from transformers import AutoModelForImageSegmentation
        except ImportError:
            raise ImageError("Background removal needs the `transformers`, `timm` and `kornia` packages: "
                             "pip install transformers timm kornia — or give an RGBA image with the "
                             "background already removed.") from None
        try:
            model = AutoModelForImageSegmentation.from_pretrained(
                str(folder), trust_remote_code=True, local_files_only=True)
        except Exception as error:
            raise ImageError(f"Could not load the BiRefNet model from {folder}: {error}") from None
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = image.convert("RGB")
        resized = rgb.resize((BIREFNET_INPUT_SIZE, BIREFNET_INPUT_SIZE), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        x = ((x - mean) / std).unsqueeze(0)
        param = next(self.model.parameters())
        prediction = self.model(x.to(self.device, param.dtype))[-1].sigmoid()[0, 0].float().cpu()
        # float -> 8 bit by truncation, as torchvision's ToPILImage does
        mask = Image.fromarray((prediction * 255).to(torch.uint8).numpy(), mode="L")
        return mask.resize(rgb.size)


def crop_to_foreground(rgba: np.ndarray) -> np.ndarray:
    """Inclusive crop to the bounding box of alpha > 0; the whole image when fewer than 0.1 % of the
    pixels are foreground (official ``crop_recenter(threshold=0)``)."""
    alpha = rgba[..., 3]
    foreground = alpha > 0
    height, width = alpha.shape
    if foreground.sum() < height * width * MIN_FOREGROUND_FRACTION:
        return rgba
    rows = np.flatnonzero(foreground.any(axis=1))
    cols = np.flatnonzero(foreground.any(axis=0))
    return rgba[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _pad_to_square(image: Image.Image, fill) -> Image.Image:
    side = max(image.size)
    left = (side - image.width) // 2
    top = (side - image.height) // 2
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, (left, top))
    return canvas


def _pad(image: Image.Image, margin: int, fill) -> Image.Image:
    canvas = Image.new(image.mode, (image.width + 2 * margin, image.height + 2 * margin), fill)
    canvas.paste(image, (margin, margin))
    return canvas


def to_rgba_array(image: ImageSource, background_remover: Optional[BackgroundRemover] = None,
                  name: Optional[Union[str, os.PathLike]] = None) -> np.ndarray:
    """Load, validate and make sure the object has a mask: ``uint8 [H, W, 4]``. ``name`` (e.g. the
    file the PIL image came from) is used in error messages."""
    pil = load_image(image)
    what = str(name) if name is not None else _describe(image)
    if has_useful_alpha(pil):
        rgba = np.asarray(pil)
    else:
        if background_remover is None:
            raise ImageError(
                f"{what} has no transparent background. Give an RGBA image with the "
                f"background removed, or enable background removal (download BiRefNet with "
                f"`python -m engine weights download --background-removal`).")
        rgb = pil.convert("RGB")
        mask = background_remover(rgb)
        if mask.mode != "L" or mask.size != rgb.size:
            raise ImageError(f"The background remover returned a {mask.mode} mask of size {mask.size}; "
                             f"expected an L mask of size {rgb.size}.")
        rgba = np.concatenate([np.asarray(rgb), np.asarray(mask)[..., None]], axis=-1)
    if not (rgba[..., 3] > 0).any():
        raise ImageError(f"{what} has no foreground: every pixel is fully transparent "
                         f"(after background removal, if it ran). Use an image showing one object.")
    return rgba


def preprocess_image(image: ImageSource, background_remover: Optional[BackgroundRemover] = None,
                     name: Optional[Union[str, os.PathLike]] = None) -> torch.Tensor:
    """The official test-time preprocessing: returns float32 ``[4, 518, 518]`` (RGB over white, mask)."""
    rgba = crop_to_foreground(to_rgba_array(image, background_remover, name))
    colour = rgba[..., :3] / 255.0
    alpha = rgba[..., 3:] / 255.0
    over_white = colour * alpha + (1.0 - alpha)
    # float -> uint8 by truncation like the official numpy round trip
    rgb_image = Image.fromarray((over_white * 255).astype(np.uint8), mode="RGB")
    mask_image = Image.fromarray((alpha[..., 0] * 255).astype(np.uint8), mode="L")

    rgb_image = _pad_to_square(rgb_image, (255, 255, 255))
    mask_image = _pad_to_square(mask_image, 0)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    rgb_image = rgb_image.resize(size, Image.BILINEAR)
    mask_image = mask_image.resize(size, Image.NEAREST)
    rgb_image = _pad(rgb_image, EXTRA_PAD, (255, 255, 255)).resize(size, Image.BILINEAR)
    mask_image = _pad(mask_image, EXTRA_PAD, 0).resize(size, Image.NEAREST)

    rgb = torch.from_numpy(np.asarray(rgb_image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mask = torch.from_numpy(np.asarray(mask_image, dtype=np.float32) / 255.0).unsqueeze(0)
    return torch.cat([rgb, mask], dim=0).contiguous()
