"""Image preprocessing with PIL and numpy (no torchvision), as the official processor does it:
RGB, bicubic resize straight to size x size (no crop: the aspect ratio is not kept), scale to
[0, 1], normalise with CLIP's mean and std. (The paper trains on random resizes to 224 x 224.)
PIL's decompression-bomb guard stays on. Pillow is asked for the formats a model needs only (FORMATS:
JPEG (MPO too: the JPEG opener returns it), PNG, WebP, GIF, BMP, TIFF), everywhere an image is opened (files, shard
members, base64 fields): a PostScript/EPS file named .jpg is refused here, so Ghostscript, which
Pillow runs for EPS, is never reached.

Images of more than 8 bits (16-bit PNG "I;16", 32-bit integer "I", float "F" TIFFs) are scaled to
8 bits first: PIL's own convert("RGB") clips them at 255, which turns a 16-bit photo white. The
scale is the bit depth (65535 for I;16); "I" and "F" carry no depth, so it is read off the values:
integers up to 255 are 8-bit, up to 65535 16-bit, floats up to 1.0 in [0, 1], up to 255 8-bit, and
anything larger is scaled by its own maximum (a guess where the file does not say).
"""
import io
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


# What Pillow may decode (an image named anything else is refused in one line).
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class ImageError(ValueError):
    pass


def image_inside(root, rel, where):
    """The path of the image `rel` named in a data file, which must stay inside `root` (the file's folder,
    or an explicit image root): an absolute path, or ../ (or a link) leading out, raises ImageError naming
    `where` (the row)."""
    if not isinstance(rel, str) or not rel:
        raise ImageError(f"{where}: the image must be a non-empty path string, not {rel!r}")
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, rel))
    if os.path.isabs(rel) or os.path.commonpath([base, path]) != base:
        raise ImageError(f"{where}: image {rel!r} is outside {root} (images are read from inside its folder only)")
    return path


def to_8bit(image):
    """A 16/32-bit integer or float image as 8-bit "L", scaled (see the module docstring); others as they are."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    a = np.nan_to_num(np.asarray(image, dtype=np.float64)).clip(min=0)
    top = a.max(initial=0)
    if image.mode.startswith("I;16"):
        scale = 65535.0
    else:
        scale = next((s for s in ((1.0,) if image.mode == "F" else ()) + (255.0, 65535.0) if top <= s), top)
    return Image.fromarray(np.round(a * (255.0 / scale)).clip(0, 255).astype(np.uint8), "L")


def load_image(path, name=None):
    """Open an image file fully (so a truncated file fails here, naming the file), as 8-bit RGB.
    path may be an open binary file; `name` is then what an error calls it."""
    path_name = path if name is None else name
    try:
        with Image.open(path, formats=FORMATS) as im:
            im.load()
            return to_8bit(im).convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"{path_name}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{path_name}: is a directory, not an image") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path_name}: refused, too many pixels ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = str(e).replace(f" {path!r}", "").replace(f" {path}", "")  # Pillow names the file too: once is enough
        raise ImageError(f"{path_name}: cannot read image ({reason})") from None


def decode_image(data, name):
    """An image from the bytes of a file (a tar member, a base64 field), as load_image reads it; an
    error names `name`."""
    return load_image(io.BytesIO(data), name)


def check_image_bytes(data, name):
    """Raise ImageError naming `name` unless the bytes start like an image of FORMATS (the header only:
    cheap enough to check every image of a file before a model loads)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS):
            pass
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: cannot read image ({e})") from None


def preprocess_image(image, size):
    """PIL image -> FloatTensor (3, size, size), normalised for the CLIP ViT. (Channels first before the
    arithmetic: numpy's loops then run along rows, not over 3 channels; the same values, 3x faster.)"""
    image = to_8bit(image)
    image = (image if image.mode == "RGB" else image.convert("RGB")).resize((size, size), resample=Image.BICUBIC)
    x = np.asarray(image).transpose(2, 0, 1).astype(np.float32)  # (3, H, W)
    x /= 255.0  # in [0, 1]
    x -= CLIP_MEAN[:, None, None]
    x /= CLIP_STD[:, None, None]
    return torch.from_numpy(x)  # (3, H, W)
