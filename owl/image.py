"""Image preprocessing with PIL and numpy (no torchvision), as the official processor does it:
RGB, bicubic resize straight to size x size (no crop: the aspect ratio is not kept), scale to
[0, 1], normalise with CLIP's mean and std. (The paper trains on random resizes to 224 x 224.)
PIL's decompression-bomb guard stays on.
"""
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


class ImageError(ValueError):
    pass


def load_image(path):
    """Open an image file fully (so a truncated file fails here, naming the file), as RGB."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: refused, too many pixels ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None


def preprocess_image(image, size):
    """PIL image -> FloatTensor (3, size, size), normalised for the CLIP ViT."""
    image = image.convert("RGB").resize((size, size), resample=Image.BICUBIC)
    x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    x = (x - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(x.transpose(2, 0, 1).copy())  # (3, H, W)
