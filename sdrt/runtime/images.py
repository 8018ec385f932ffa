"""Image input and output for the runtime, with numpy and Pillow only.

The numbers follow diffusers exactly - ``VaeImageProcessor.postprocess`` + ``numpy_to_pil`` on the way out,
``diffusers.utils.load_image`` + ``VaeImageProcessor.preprocess`` on the way in - so an sdrt image can be
compared with a diffusers image pixel for pixel. PNGs carry the generation settings in a ``parameters``
text chunk laid out as AUTOMATIC1111 writes it, because that is what image viewers, galleries and "PNG info"
tools already read. Every file is written beside its target and renamed into place, so a crash or a
concurrent reader never sees half an image, with the mode ``open`` would give it (sdrt.runtime.files).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin

from sdrt.errors import SdrtWarning, UserError
from sdrt.runtime.files import atomic_path

# A1111's sampler names (and schedule type) for sdrt's --scheduler names and the diffusers classes a model
# may default to, so galleries that parse the infotext recognise the sampler.
A1111_SAMPLERS: dict[str, tuple[str, str | None]] = {
    "ddim": ("DDIM", None), "DDIMScheduler": ("DDIM", None),
    "pndm": ("PLMS", None), "PNDMScheduler": ("PLMS", None),
    "ddpm": ("DDPM", None), "DDPMScheduler": ("DDPM", None),
    "lms": ("LMS", None), "LMSDiscreteScheduler": ("LMS", None),
    "euler": ("Euler", None), "EulerDiscreteScheduler": ("Euler", None),
    "euler_a": ("Euler a", None), "EulerAncestralDiscreteScheduler": ("Euler a", None),
    "heun": ("Heun", None), "HeunDiscreteScheduler": ("Heun", None),
    "dpmpp_2m": ("DPM++ 2M", None), "DPMSolverMultistepScheduler": ("DPM++ 2M", None),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "unipc": ("UniPC", None), "UniPCMultistepScheduler": ("UniPC", None),
    "lcm": ("LCM", None), "LCMScheduler": ("LCM", None),
}


def decode_to_uint8(sample: np.ndarray) -> np.ndarray:
    """VAE output ``[n, C, H, W]`` in [-1, 1] -> ``[n, H, W, C]`` uint8, as diffusers makes its PIL images.

    diffusers: ``(x * 0.5 + 0.5).clamp(0, 1)`` in the sample's own dtype, then ``.float()``, then
    ``(x * 255).round().astype("uint8")``; we keep that order and those dtypes so fp16 engines round alike.
    NaN/inf are not checked here: the pipeline checks each stage's output and names the stage.
    """
    sample = np.asarray(sample)
    if sample.ndim != 4 or not np.issubdtype(sample.dtype, np.floating):
        raise ValueError(f"expected a float [n, C, H, W] sample, got {sample.dtype} {sample.shape}")
    images = np.clip(sample * 0.5 + 0.5, 0, 1).astype(np.float32).transpose(0, 2, 3, 1)
    return (images * 255).round().astype(np.uint8)


def open_image(source: str | Path | bytes | Image.Image, what: str = "init image") -> tuple[Image.Image, str]:
    """The picture as RGB with its EXIF orientation applied (``diffusers.utils.load_image``), and a name for errors
    (``what`` it is, and where from)."""
    if isinstance(source, Image.Image):
        name = f"{what} ({source.width}x{source.height} {source.mode} PIL image)"
        return ImageOps.exif_transpose(source).convert("RGB"), name
    if isinstance(source, (bytes, bytearray)):
        name, opener = what, lambda: Image.open(io.BytesIO(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"{what} {path} does not exist or is not a file")
        name, opener = f"{what} {path}", lambda: Image.open(path)
    try:
        with opener() as opened:
            return ImageOps.exif_transpose(opened).convert("RGB"), name
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise UserError(f"{name} cannot be read as an image: {exc}") from exc


def load_init_image(
    source: str | Path | bytes | Image.Image, vae_scale_factor: int, height: int | None = None,
    width: int | None = None,
) -> np.ndarray:
    """An img2img init image as ``[1, 3, H, W]`` float32 in [-1, 1], as diffusers prepares a loaded image.

    ``source`` is a path, the bytes of an image file, or a PIL image. ``diffusers.utils.load_image`` (EXIF
    orientation applied, converted to RGB), then ``VaeImageProcessor.preprocess``: height/width default to the
    image's, both rounded *down* to a multiple of ``vae_scale_factor`` (the VAE cannot encode other sizes;
    a SdrtWarning says so), Lanczos resize, ``/255``, ``*2 - 1``.
    """
    image, name = open_image(source)

    asked = (image.height if height is None else int(height), image.width if width is None else int(width))
    height, width = (v - v % vae_scale_factor for v in asked)
    if height <= 0 or width <= 0:
        raise UserError(
            f"{name} is {image.width}x{image.height}: height and width must be at least "
            f"the VAE scale factor {vae_scale_factor}"
        )
    if (height, width) != asked:
        warnings.warn(f"{name}: {asked[1]}x{asked[0]} is not a multiple of the VAE scale factor {vae_scale_factor}; "
                      f"resized to {width}x{height}, as diffusers does", SdrtWarning, stacklevel=2)
    # PIL returns a copy when the size is unchanged, exactly as diffusers' unconditional resize does.
    image = image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
    pixels = np.asarray(image).astype(np.float32) / 255.0
    return np.ascontiguousarray((2.0 * pixels - 1.0).transpose(2, 0, 1)[None])


def _quote(value: object) -> str:
    """A1111's ``quote``: JSON-quote a value only when it would break the comma/colon layout."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def format_parameters(
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    scheduler: str,
    guidance: float,
    seed: int,
    height: int,
    width: int,
    model: str,
    *,
    strength: float | None = None,
    extra: dict[str, object] | None = None,
    version: str | None = None,
) -> str:
    """The ``parameters`` text in AUTOMATIC1111's layout (``create_infotext``)::

        prompt
        Negative prompt: ...
        Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: ..., Version: sdrt 0.1.0

    The negative-prompt line is left out when empty, as A1111 does; Size is width x height. ``strength`` is
    img2img's "Denoising strength"; ``extra`` adds further ``key: value`` pairs before the version.
    """
    if version is None:
        from sdrt import __version__

        version = f"sdrt {__version__}"
    sampler, schedule_type = A1111_SAMPLERS.get(scheduler, (scheduler, None))
    fields: dict[str, object | None] = {
        "Steps": int(steps),
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": f"{float(guidance):g}",
        "Seed": int(seed),
        "Size": f"{int(width)}x{int(height)}",
        "Model": model,
        "Denoising strength": None if strength is None else f"{float(strength):g}",
        **(extra or {}),
        "Version": version or None,
    }
    settings = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{settings}".strip()


def _as_pil(image: np.ndarray) -> Image.Image:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected a uint8 [H, W, 1|3|4] image, got {image.dtype} {image.shape}")
    return Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)


def save_png(image: np.ndarray, path: str | Path, parameters: str | None = None) -> Path:
    """Write ``image`` (uint8 ``[H, W, 3]``) as PNG with a ``parameters`` text chunk, atomically.

    Like A1111 (``PngInfo.add_text``) the chunk is tEXt, or iTXt when the text is not Latin-1 (e.g. a CJK
    prompt), which Pillow chooses; readers get it back from ``Image.open(path).text["parameters"]``.
    """
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        _as_pil(image).save(tmp, format="PNG", pnginfo=info)
    return path


def encode_png(image: np.ndarray, parameters: str | None = None) -> bytes:
    """The PNG file ``save_png`` writes, as bytes (for a service's answers)."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    _as_pil(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_parameters(path: str | Path) -> str | None:
    """The ``parameters`` text of a PNG written by sdrt (or A1111), or None when it has none."""
    with Image.open(path) as image:
        return getattr(image, "text", {}).get("parameters")


def save_gif(frames: Sequence[np.ndarray], path: str | Path, duration_ms: int = 100) -> Path:
    """An animated GIF of uint8 ``[H, W, 3]`` frames (the ``--preview`` of the denoising), looping, atomically."""
    if len(frames) == 0:
        raise ValueError("save_gif needs at least one frame")
    pils = [_as_pil(frame).convert("RGB") for frame in frames]
    if len({p.size for p in pils}) != 1:
        raise ValueError(f"GIF frames differ in size: {sorted({p.size for p in pils})}")
    path = Path(path)
    with atomic_path(path) as tmp:
        pils[0].save(tmp, format="GIF", save_all=True, append_images=pils[1:], duration=int(duration_ms), loop=0)
    return path


def contact_sheet(
    images: Sequence[np.ndarray] | np.ndarray,
    labels: Sequence[str] | None = None,
    columns: int | None = None,
    gap: int = 4,
    scale: int = 1,
) -> np.ndarray:
    """A grid of uint8 ``[H, W, 3]`` images (sizes may differ) with optional captions, as uint8 ``[H, W, 3]``.

    Used by ``sdrt demo`` to show schedulers or seeds side by side in one file. Cells are as large as the
    largest image or caption; columns default to a near-square grid. ``scale`` enlarges small pictures
    (nearest neighbour, so pixels stay visible as they are).
    """
    images = [np.asarray(image) for image in images]
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    pils = [_as_pil(image).convert("RGB") for image in images]
    if scale > 1:
        pils = [p.resize((p.width * scale, p.height * scale), Image.NEAREST) for p in pils]
    columns = columns or math.ceil(math.sqrt(len(pils)))
    rows = math.ceil(len(pils) / columns)
    cell_w = max(p.width for p in pils)
    cell_h = max(p.height for p in pils)
    font = ImageFont.load_default()
    label_h = 0
    if labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        boxes = [probe.textbbox((0, 0), str(label) or " ", font=font) for label in labels]
        label_h = max(b[3] for b in boxes) + gap
        cell_w = max(cell_w, max(b[2] for b in boxes))
    sheet = Image.new(
        "RGB",
        (columns * (cell_w + gap) + gap, rows * (cell_h + label_h + gap) + gap),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(sheet)
    for index, image in enumerate(pils):
        row, column = divmod(index, columns)
        x = gap + column * (cell_w + gap)
        y = gap + row * (cell_h + label_h + gap)
        sheet.paste(image, (x + (cell_w - image.width) // 2, y + (cell_h - image.height) // 2))
        if labels:
            draw.text((x, y + cell_h + gap // 2), str(labels[index]), fill=(0, 0, 0), font=font)
    return np.asarray(sheet)


def images_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 images (or batches); inf when identical."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
