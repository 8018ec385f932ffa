"""Inpainting's picture and mask, prepared as diffusers' inpaint pipelines prepare them, with AUTOMATIC1111's
options on top (numpy and Pillow only).

diffusers (StableDiffusion(XL)InpaintPipeline): the picture through ``VaeImageProcessor.preprocess`` (Lanczos
resize to the output size, ``/255``, ``*2 - 1``); the mask through its ``mask_processor`` (the same resize,
grayscale, ``/255``, binarised at 0.5: white is repainted); the masked picture ``image * (mask < 0.5)``; the mask
at the latent size by nearest-neighbour sampling (``torch.nn.functional.interpolate``'s default).
``padding_mask_crop`` (here ``inpaint_area="masked"``): a box around the mask, padded and widened to the output's
aspect ratio, cropped and resized to fill the output size, the result resized back and pasted over the original
outside the mask (``apply_overlay``).

AUTOMATIC1111's options, applied to the mask and picture before that: ``mask_invert``, ``mask_blur`` (its
Gaussian, per axis), ``masked_content`` (``fill``: the masked area painted with the blurred colours around it;
``latent-noise`` / ``latent-nothing``: the init latents there replaced by noise / zeros, in the denoising loop),
``overlay`` (the original pasted back outside the blurred mask, as AUTOMATIC1111 always does) and outpainting
(the canvas extended by edge pixels, the new border masked).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from sdrt.errors import UserError
from sdrt.runtime.settings import INPAINT_AREAS, MASKED_CONTENT, SETTING, shown


@dataclass
class Finish:
    """How an inpainting request's pictures are finished: pasted back into ``canvas`` (RGB, the original
    picture, outpainted) at ``crop`` (inpaint_area "masked"), and/or the canvas laid over them outside
    ``overlay_mask`` (L, the mask after invert and blur)."""

    canvas: Image.Image
    overlay_mask: Image.Image
    crop: tuple[int, int, int, int] | None = None
    overlay: bool = False

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One generated picture [H, W, 3] uint8, finished."""
        if self.crop is None and not self.overlay:
            return image
        out = Image.fromarray(image)
        if self.crop is not None:  # diffusers' apply_overlay with crop_coords (it always overlays then)
            x1, y1, x2, y2 = self.crop
            base = Image.new("RGBA", self.canvas.size)
            base.paste(_resize_and_crop(out, x2 - x1, y2 - y1), (x1, y1))
            out = base.convert("RGB")
        elif out.size != self.canvas.size:   # an output size other than the canvas's: laid over at its size
            out = out.resize(self.canvas.size, resample=Image.Resampling.LANCZOS)
        kept = Image.new("RGBa", self.canvas.size)
        kept.paste(self.canvas.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(self.overlay_mask))
        out = out.convert("RGBA")
        out.alpha_composite(kept.convert("RGBA"))
        return np.asarray(out.convert("RGB"))


@dataclass
class Inpaint:
    """A masked request's inputs: the picture [1, 3, H, W] in [-1, 1] and the binarised mask [1, 1, H, W] at the
    processing size, and how to finish the pictures."""

    image: np.ndarray
    mask: np.ndarray
    finish: Finish
    masked_content: str = "original"


def open_image(source, what: str, mode: str) -> Image.Image:
    """A path, image-file bytes, a PIL image or an array (HxW, HxWxC, uint8 or float in [0, 1]) as a PIL image
    of ``mode``, EXIF orientation applied; an unreadable one is a one-line UserError naming ``what``."""
    if isinstance(source, np.ndarray):
        array = np.squeeze(source)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)   # channels first
        if array.ndim not in (2, 3) or array.size == 0:
            raise UserError(f"{what} {shown(source)}: expected an image array, HxW or HxWxC")
        if array.dtype.kind == "f":
            array = np.clip(np.rint(array * 255), 0, 255)
        return Image.fromarray(np.ascontiguousarray(array.astype(np.uint8).squeeze())).convert(mode)
    if isinstance(source, Image.Image):
        return ImageOps.exif_transpose(source).convert(mode)
    if isinstance(source, (bytes, bytearray)):
        name, opener = what, (lambda: Image.open(io.BytesIO(source)))
    elif isinstance(source, (str, Path)):
        name, opener = f"{what} {str(source)!r}", (lambda: Image.open(source))
    else:
        raise UserError(f"{what} {shown(source)}: expected a path, a PIL image or an array")
    try:
        with opener() as image:
            return ImageOps.exif_transpose(image).convert(mode)
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{name}: cannot be read as an image ({str(e).splitlines()[0][:120]})") from None


def outpaint(image: Image.Image, mask: Image.Image | None, sides: tuple[int, int, int, int]) -> tuple[Image.Image,
                                                                                                   Image.Image]:
    """The canvas extended by (left, right, top, bottom) pixels, the new border filled with the nearest edge
    pixels, and the mask with that border white (to be painted) beside the given mask (or none)."""
    left, right, top, bottom = sides
    pixels = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    border = np.full(pixels.shape[:2], 255, np.uint8)
    border[top:top + image.height, left:left + image.width] = 0 if mask is None else np.asarray(mask)
    return Image.fromarray(pixels), Image.fromarray(border)


def parse_outpaint(value) -> tuple[int, int, int, int] | None:
    """``LEFT,RIGHT,TOP,BOTTOM`` pixels (a string or four integers >= 0, not all 0), or None."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        sides = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        sides = ()
    if len(sides) != 4 or min(sides) < 0 or not any(sides) or (
            not isinstance(value, str) and not all(isinstance(p, (int, np.integer)) for p in parts)):
        raise UserError(f"outpaint {shown(value)}: must be LEFT,RIGHT,TOP,BOTTOM, four integers >= 0 (pixels to "
                        "add on each side), not all 0")
    return sides


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float) -> Image.Image:
    """AUTOMATIC1111's mask blur: a Gaussian of sigma ``blur_x`` along rows and ``blur_y`` along columns, its
    kernel ``2 * int(2.5 * sigma + 0.5) + 1`` wide, borders mirrored (OpenCV's reflect-101)."""
    pixels = np.asarray(mask).astype(np.float64)
    for axis, sigma in ((1, blur_x), (0, blur_y)):
        if sigma > 0:
            radius = int(2.5 * sigma + 0.5)
            x = np.arange(-radius, radius + 1)
            kernel = np.exp(-(x ** 2) / (2 * sigma ** 2))
            kernel /= kernel.sum()
            pad = [(0, 0), (0, 0)]
            pad[axis] = (radius, radius)
            padded = np.pad(pixels, pad, mode="reflect") if pixels.shape[axis] > radius else \
                np.pad(pixels, pad, mode="symmetric")
            pixels = sum(w * np.take(padded, np.arange(i, i + pixels.shape[axis]), axis=axis)
                         for i, w in enumerate(kernel))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """AUTOMATIC1111's "fill" masked content: the masked area painted with the colours around it, blurred ever
    less (the unmasked picture composited over blurs of itself, from a radius of 256 down to 0)."""
    result = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """diffusers' ``VaeImageProcessor.get_crop_region``: the box (x1, y1, x2, y2) around every non-zero mask pixel,
    padded by ``pad``, then widened (or heightened) to the aspect ratio ``width / height`` within the picture."""
    m = np.asarray(mask)
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    x1, x2 = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, w)
    y1, y2 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        diff = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = _widen(y1 - diff // 2, y2 + diff - diff // 2, h)
    else:
        diff = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = _widen(x1 - diff // 2, x2 + diff - diff // 2, w)
    return x1, y1, x2, y2


def _widen(a: int, b: int, size: int) -> tuple[int, int]:
    """diffusers' clamping of a widened span: shifted back inside [0, size], cut at size."""
    if b >= size:
        a, b = a - (b - size), size
    if a < 0:
        a, b = 0, b - a
    return a, min(b, size)


def _resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """diffusers' ``_resize_and_fill``: fit inside width x height keeping the aspect ratio, centred, the bands
    left over filled by stretching the picture's outermost rows or columns."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return res


def _resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """diffusers' ``_resize_and_crop``: cover width x height keeping the aspect ratio, centred, the excess cut."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res


def _processed(image: Image.Image, width: int, height: int, crop) -> Image.Image:
    """``VaeImageProcessor.preprocess``'s crop and resize: Lanczos to the size, or with a crop, fill it."""
    if crop is None:
        return image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
    return _resize_and_fill(image.crop(crop), width, height)


def prepare(image, mask, *, height: int | None, width: int | None, multiple: int, default_size: tuple[int, int],
            mask_blur: tuple[float, float] = (0, 0), mask_invert: bool = False, masked_content: str = "original",
            inpaint_area: str = "whole", inpaint_padding: int = 32, overlay: bool = False,
            outpaint_sides=None) -> Inpaint:
    """The picture and mask of an inpainting request (``mask`` None with ``outpaint_sides``: only the new border
    is painted). Without height/width the output is the canvas's size rounded down to ``multiple`` (with
    ``inpaint_area="masked"``: ``default_size``, the model's); each must be a multiple of ``multiple``."""
    masked_content, inpaint_area, inpaint_padding, overlay, mask_invert = (
        SETTING[name].value(value) for name, value in (("masked_content", masked_content), ("inpaint_area",
        inpaint_area), ("inpaint_padding", inpaint_padding), ("overlay", overlay), ("mask_invert", mask_invert)))
    picture = open_image(image, "init_image", "RGB")
    drawn = None if mask is None else open_image(mask, "mask", "L")
    if drawn is not None and drawn.size != picture.size:
        drawn = drawn.resize(picture.size, resample=Image.Resampling.LANCZOS)   # a mask drawn at another scale
    if drawn is not None and mask_invert:
        drawn = ImageOps.invert(drawn)
    sides = parse_outpaint(outpaint_sides)
    if sides is not None:
        picture, drawn = outpaint(picture, drawn, sides)
    if drawn is None:
        raise UserError("mask: inpainting needs a mask (white: repaint), or outpaint to paint a new border")
    if mask_blur[0] > 0 or mask_blur[1] > 0:
        drawn = blur_mask(drawn, *mask_blur)
    if not np.asarray(drawn).any():
        raise UserError("mask: it is all black, so nothing would be repainted; white marks what is repainted "
                        "(mask_invert swaps them)")
    crop = None
    if inpaint_area == "masked":
        height = default_size[0] if height is None else height
        width = default_size[1] if width is None else width
        crop = crop_region(drawn, width, height, inpaint_padding)
    else:
        height = picture.height - picture.height % multiple if height is None else height
        width = picture.width - picture.width % multiple if width is None else width
    if height < multiple or width < multiple:
        raise UserError(f"init_image is {picture.width}x{picture.height}: height and width must be at least "
                        f"{multiple}")
    source = fill_masked(picture, drawn) if masked_content == "fill" else picture
    pixels = np.asarray(_processed(source, width, height, crop)).astype(np.float32) / 255.0
    binary = np.asarray(_processed(drawn, width, height, crop).convert("L")).astype(np.float32) / 255.0
    binary = np.where(binary < 0.5, np.float32(0), np.float32(1))
    return Inpaint(image=np.ascontiguousarray((2.0 * pixels - 1.0).transpose(2, 0, 1)[None]),
                   mask=binary[None, None], finish=Finish(picture, drawn, crop, overlay),
                   masked_content=masked_content)


def latent_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The mask [n, 1, H, W] at the latent size (h, w), nearest-neighbour as torch's ``interpolate`` default:
    source index ``floor(i * H / h)``."""
    rows = np.minimum(np.floor(np.arange(size[0]) * np.float32(mask.shape[2] / size[0])).astype(int), mask.shape[2] - 1)
    cols = np.minimum(np.floor(np.arange(size[1]) * np.float32(mask.shape[3] / size[1])).astype(int), mask.shape[3] - 1)
    return np.ascontiguousarray(mask[:, :, rows][:, :, :, cols], dtype=np.float32)
