"""Image inputs: a local file or a data URI, checked, as the OpenAI image_url part that
Tokenizer.chat_inputs (mistral-common) resizes and normalizes for the model."""

import base64
import io
from pathlib import Path

from .errors import MistralError

MAX_IMAGE_BYTES = 20 << 20  # an encoded image file, at most
MAX_PIXELS = 64 << 20  # decoded, width x height, at most (mistral-common then fits it to the model's size)


def image_part(path: str) -> dict:
    """The image_url part of the image file at `path` (a data URI of its bytes): MistralError
    naming the file when it is missing, too large, or not an image PIL can decode."""
    file = Path(path)
    if not file.is_file():
        raise MistralError(f"image {path}: no such file")
    if file.stat().st_size > MAX_IMAGE_BYTES:
        raise MistralError(f"image {path}: {file.stat().st_size} bytes, past the limit of {MAX_IMAGE_BYTES}")
    data = file.read_bytes()
    kind = check_image(data, f"image {path}")
    url = f"data:image/{kind};base64,{base64.b64encode(data).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}


def check_image(data: bytes, what: str) -> str:
    """The format (png, jpeg, ...) of encoded image `data`, fully decoded once: MistralError naming
    `what` when it is not an image, is corrupt, or has more than MAX_PIXELS pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise MistralError(f"{what}: {image.width}x{image.height} pixels, past the limit of "
                                   f"{MAX_PIXELS}")
            kind = (image.format or "png").lower()
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise MistralError(f"{what}: not an image that can be decoded ({type(e).__name__}: {e})") from None
    return kind


def data_uri_image(url: object, what: str) -> None:
    """Check an image_url a client sent: a data URI of an image (base64) within the limits, or
    MistralError naming `what`. The server fetches no URL and opens no file (mistral-common's
    image_from_chunk would do both)."""
    if not isinstance(url, str):
        raise MistralError(f"{what}: expected an image URL string")
    if url.startswith(("http://", "https://")):
        raise MistralError(f"{what}: image URLs are not fetched by this server; send the image as a "
                           "data URI (data:image/png;base64,...)")
    if not url.startswith("data:"):
        raise MistralError(f"{what}: only data URIs of images are accepted (data:image/png;base64,...), "
                           f"got {url.split(':', 1)[0]!r}")
    head, _, payload = url.partition(",")
    if not head.startswith("data:image/") or not head.endswith(";base64"):
        raise MistralError(f"{what}: expected a base64 data URI of an image (data:image/...;base64,...)")
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
        raise MistralError(f"{what}: past the limit of {MAX_IMAGE_BYTES} bytes an image")
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:
        raise MistralError(f"{what}: the data URI is not valid base64") from None
    check_image(data, what)
