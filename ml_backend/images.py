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
import time
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urljoin, urlparse

import numpy as np
import requests
from PIL import Image

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class ImageError(ValueError):
    """A task's image could not be fetched or decoded; the message says why."""


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes → 2-D (grey) or 3-D (RGB) array, keeping 8/16-bit/float depth."""
    if data[:4] in TIFF_MAGIC:
        return _decode_tiff(data, max_pixels)
    Image.MAX_IMAGE_PIXELS = None  # our own limit is checked from the header, before decoding
    try:
        img = Image.open(io.BytesIO(data))
        _check_pixels(img.width * img.height, max_pixels)
        img.load()
    except ImageError:
        raise
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
            _check_pixels(int(np.prod(page.shape[:2])), max_pixels)
            array = page.asarray()
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"not a readable TIFF ({type(exc).__name__}: {exc})") from None
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        array = array[0]  # planar stack: first plane
    if array.ndim == 3:
        array = array[..., :3]
    return array


def _check_pixels(n: int, max_pixels: int) -> None:
    if n > max_pixels:
        raise ImageError(f"image has {n} pixels, more than the limit of {max_pixels} (MAX_IMAGE_PIXELS)")


def _is_jwt(token: str) -> bool:
    return token.count(".") == 2


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
        self.base_url = label_studio_url.rstrip("/")
        self.api_key = api_key
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.cache_bytes = cache_bytes
        self.timeout = timeout
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._access_token: tuple[str, float] | None = None

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
            return self._download(urljoin(self.base_url + "/", url.lstrip("/")))
        raise ImageError(f"{url}: neither a URL nor an existing file")

    def _is_label_studio(self, url: str) -> bool:
        a, b = urlparse(url), urlparse(self.base_url)
        return (a.scheme, a.netloc) == (b.scheme, b.netloc)

    def _download(self, url: str) -> bytes:
        for attempt in range(2):
            headers = self._auth_headers(refresh=attempt > 0) if self._is_label_studio(url) else {}
            try:
                with self._session.get(url, headers=headers, timeout=self.timeout, stream=True) as resp:
                    if resp.status_code == 401 and attempt == 0 and _is_jwt(self.api_key):
                        continue  # access token expired: refresh once
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

    def _auth_headers(self, refresh: bool = False) -> dict[str, str]:
        if not self.api_key:
            return {}
        if not _is_jwt(self.api_key):
            return {"Authorization": f"Token {self.api_key}"}
        return {"Authorization": f"Bearer {self._personal_access_token(refresh)}"}

    def _personal_access_token(self, refresh: bool) -> str:
        """Exchange the personal access (refresh) token for a short-lived access token."""
        with self._lock:
            if self._access_token and not refresh and self._access_token[1] > time.time():
                return self._access_token[0]
        try:
            resp = self._session.post(
                f"{self.base_url}/api/token/refresh",
                json={"refresh": self.api_key},
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise ImageError(f"cannot reach Label Studio at {self.base_url} ({type(exc).__name__})") from None
        if resp.status_code != 200:
            raise ImageError(
                f"Label Studio refused the personal access token (HTTP {resp.status_code});"
                " check LABEL_STUDIO_API_KEY"
            )
        token = resp.json().get("access", "")
        with self._lock:
            self._access_token = (token, time.time() + 240)
        return token

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
