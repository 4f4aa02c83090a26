"""Pictures for the chat: image bytes from notebook objects, the pixel budget, hashes, base64.

An image in a conversation is a PNG, resized once to the pixel budget when it is
attached, and named by the SHA-256 of its bytes: messages refer to it by that name
and the conversation keeps the bytes once. Nothing here imports torch; PIL is
imported only when a picture is actually handled.
"""

import base64
import hashlib
import io
import math
from typing import Dict, List, Optional

DEFAULT_MAX_PIXELS = 1024 * 28 * 28  # 1,024 image tokens of Qwen2.5-VL: a 1024x768 figure fits whole
IMAGE_MIMES = ("image/png", "image/jpeg")


class ImageError(ValueError):
    """Bytes that are not an image PIL can read."""


def digest(png: bytes) -> str:
    return hashlib.sha256(png).hexdigest()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def from_base64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def data_url(png: bytes) -> str:
    """What OpenAI-compatible servers take as an ``image_url``."""
    return "data:image/png;base64," + to_base64(png)


def open_image(data: bytes):
    """A PIL image in RGB (what Qwen's image processors expect)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # PIL raises several kinds for bytes it cannot read
        raise ImageError(f"not an image PIL can read ({type(error).__name__})") from None
    return image.convert("RGB")


def fit(width: int, height: int, max_pixels: int):
    """The largest size of the same aspect ratio within ``max_pixels`` (never enlarged)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def normalize(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """PNG bytes of the image, in RGB, shrunk to the pixel budget."""
    from PIL import Image

    image = open_image(data)
    size = fit(image.width, image.height, max_pixels)
    if size != image.size:
        image = image.resize(size, Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def size_of(png: bytes):
    return open_image(png).size


def _decoded(value) -> Optional[bytes]:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):  # front ends and newer IPython send base64 text
        try:
            return from_base64("".join(value.split()))
        except ValueError:
            return None
    return None


def from_bundle(data: dict) -> Optional[bytes]:
    """The PNG or JPEG of a display bundle ({mime: data}), if it has one."""
    for mime in IMAGE_MIMES:
        if mime in data:
            found = _decoded(data[mime])
            if found:
                return found
    return None


def image_of(value, shell=None) -> Optional[bytes]:
    """Image bytes of a value a cell returned: anything IPython shows as PNG or JPEG, a matplotlib
    figure, a PIL image. None for anything else."""
    if shell is not None:
        try:
            bundle, _ = shell.display_formatter.format(value)
        except Exception:
            bundle = {}
        found = from_bundle(bundle)
        if found:
            return found
    module = type(value).__module__ or ""
    try:
        if module.startswith("matplotlib") and hasattr(value, "savefig"):  # a Figure, without the inline backend
            out = io.BytesIO()
            value.savefig(out, format="png")
            return out.getvalue()
        if module.startswith("PIL") and hasattr(value, "save"):
            out = io.BytesIO()
            value.save(out, format="PNG")
            return out.getvalue()
    except Exception:
        return None
    return None


def read_file(path: str) -> bytes:
    """The bytes of an image file; ``ImageError`` if it is not one."""
    with open(path, "rb") as file:
        data = file.read()
    open_image(data)
    return data


class Attached:
    """The pictures one message attaches, in order, each once; names them ``[image N]`` in the text."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = max_pixels
        self.images: Dict[str, bytes] = {}

    def add(self, data: bytes) -> str:
        png = normalize(data, self.max_pixels)
        self.images.setdefault(digest(png), png)
        return f"[image {list(self.images).index(digest(png)) + 1}]"

    @property
    def names(self) -> List[str]:
        return list(self.images)
