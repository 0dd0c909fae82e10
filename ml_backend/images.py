"""Fetch and decode task images the way Label Studio hands them over.

Task data holds `/data/upload/...` (uploaded files), `/data/local-files/?d=...`
(local storage), other server-relative paths (storage proxies), absolute
http(s) URLs, or plain file paths. Label Studio URLs get the API key (legacy
token or personal access token); other hosts never see it. Decoded images are
cached by URL in a byte-bounded LRU, so a task predicted and later trained on
is downloaded once.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from functools import cache
from pathlib import Path
from urllib.parse import urljoin, urlparse

import numpy as np
import requests
from PIL import Image

from sdk.labelstudio import LabelStudioAPI, LabelStudioError

from .config import Settings

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class ImageError(ValueError):
    """A task's image could not be fetched or decoded; the message says why."""


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes → 2-D (grey) or 3-D (RGB) array, keeping 8/16-bit/float depth."""
    if data[:4] in TIFF_MAGIC:
        return _decode_tiff(data, max_pixels)
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        _check_pixels(img.width * img.height, max_pixels)
        img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard stays on for the process
        raise ImageError(f"image refused as a decompression bomb: {exc}") from None
    except Exception as exc:
        raise ImageError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    if img.mode in ("RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "1"):
        img = img.convert("RGB" if img.mode in ("RGBA", "P", "PA", "CMYK", "YCbCr") else "L")
    array = np.asarray(img)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return array


def _decode_tiff(data: bytes, max_pixels: int) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            size = (int(page.imagelength), int(page.imagewidth))  # page.shape may put samples first
            _check_pixels(size[0] * size[1], max_pixels)
            array = page.asarray()
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"not a readable TIFF ({type(exc).__name__}: {exc})") from None
    if array.ndim == 3 and array.shape[:2] != size:
        array = array[0]  # planar stack: first plane
    if array.ndim == 3:
        array = array[..., :3] if array.shape[-1] >= 3 else array[..., 0]  # RGB(A) or grey + alpha
    return array


def _check_pixels(n: int, max_pixels: int) -> None:
    if n > max_pixels:
        raise ImageError(f"image has {n} pixels, more than the limit of {max_pixels} (MAX_IMAGE_PIXELS)")


class ImageFetcher:
    """Downloads task images with Label Studio credentials; thread-safe."""

    def __init__(
        self,
        label_studio_url: str,
        api_key: str = "",
        *,
        max_bytes: int = 256 * 2**20,
        max_pixels: int = 16384 * 16384,
        cache_bytes: int = 512 * 2**20,
        timeout: float = 30.0,
    ) -> None:
        self.label_studio = LabelStudioAPI(label_studio_url, api_key, timeout=timeout)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.cache_bytes = cache_bytes
        self.timeout = timeout
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._session = requests.Session()

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageFetcher:
        return cls(
            settings.label_studio_url,
            settings.label_studio_api_key,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            cache_bytes=settings.image_cache_mb * 2**20,
            timeout=settings.image_timeout,
        )

    # -- public ------------------------------------------------------------------
    def fetch(self, url: str) -> np.ndarray:
        """The decoded image at `url`; raises ImageError with a user-facing reason."""
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"task has no image URL (got {url!r})")
        key = self._cache_key(url)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        image = decode_image(self._read(url), self.max_pixels)
        self._remember(key, image)
        return image

    # -- reading -----------------------------------------------------------------
    def _cache_key(self, url: str) -> str:
        path = self._local_path(url)
        if path is not None:
            try:
                return f"{path}@{path.stat().st_mtime_ns}"
            except OSError:
                return url
        return url

    def _local_path(self, url: str) -> Path | None:
        parsed = urlparse(url)
        if parsed.scheme == "file":
            return Path(parsed.path)
        if not parsed.scheme and not url.startswith("/data/") and Path(url).is_file():
            return Path(url)
        return None

    def _read(self, url: str) -> bytes:
        path = self._local_path(url)
        if path is not None:
            size = path.stat().st_size
            if size > self.max_bytes:
                raise ImageError(f"{url}: {size} bytes is more than the limit (MAX_IMAGE_MB)")
            return path.read_bytes()
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            return self._download(url)
        if parsed.scheme:
            raise ImageError(f"{url}: unsupported URL scheme {parsed.scheme!r}")
        if url.startswith("/"):
            return self._download(urljoin(self.label_studio.url + "/", url.lstrip("/")))
        raise ImageError(f"{url}: neither a URL nor an existing file")

    def _download(self, url: str) -> bytes:
        own = self.label_studio.is_own_url(url)
        for attempt in range(2):
            try:
                headers = self.label_studio.auth_headers(refresh=attempt > 0) if own else {}
            except LabelStudioError as exc:
                raise ImageError(str(exc)) from None
            try:
                with self._session.get(url, headers=headers, timeout=self.timeout, stream=True) as resp:
                    if resp.status_code == 401 and attempt == 0 and own:
                        continue  # a personal access token's short-lived access token expired
                    if resp.status_code in (401, 403):
                        raise ImageError(
                            f"{url}: Label Studio refused the credentials (HTTP {resp.status_code});"
                            " check LABEL_STUDIO_API_KEY"
                        )
                    if resp.status_code >= 400:
                        raise ImageError(f"{url}: HTTP {resp.status_code}")
                    return self._read_limited(url, resp)
            except requests.RequestException as exc:
                raise ImageError(f"{url}: cannot download ({type(exc).__name__})") from None
        raise ImageError(f"{url}: Label Studio refused the credentials; check LABEL_STUDIO_API_KEY")

    def _read_limited(self, url: str, resp: requests.Response) -> bytes:
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageError(f"{url}: {declared} bytes is more than the limit (MAX_IMAGE_MB)")
        chunks, total = [], 0
        for chunk in resp.iter_content(1 << 20):
            total += len(chunk)
            if total > self.max_bytes:
                raise ImageError(f"{url}: more than {self.max_bytes} bytes (MAX_IMAGE_MB)")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- cache -------------------------------------------------------------------
    def _remember(self, key: str, image: np.ndarray) -> None:
        if image.nbytes > self.cache_bytes:
            return
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = image
            self._cached_bytes += image.nbytes
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes


@cache
def shared_fetcher(settings: Settings) -> ImageFetcher:
    """One fetcher (and image cache) per settings in a process: a worker's jobs share it."""
    return ImageFetcher.from_settings(settings)
