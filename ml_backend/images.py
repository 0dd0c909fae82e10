"""Fetch and decode task images the way Label Studio hands them over.

Task data holds `/data/upload/...` (uploaded files), `/data/local-files/?d=...`
(local storage), other server-relative paths (storage proxies), absolute
http(s) URLs, or plain file paths and `file://` URLs (read only below the
configured roots). Label Studio URLs get the API key (legacy
token or personal access token); other hosts never see it. Decoded images are
cached by URL in a byte-bounded LRU, so a task predicted and later trained on
is downloaded once.
"""

from __future__ import annotations

import io
import os
import re
import stat
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import numpy as np
import requests
from PIL import Image

from ml_backend.config import Settings
from sdk.labelstudio import LabelStudioAPI, LabelStudioError
from sdk.lru import LRU

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_OBJECT_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")


class ImageError(ValueError):
    """A task's image could not be fetched or decoded; the message says why."""


def shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shown(url: str) -> str:
    """`url` as an error may show it: no credentials, query or fragment (presigned URLs)."""
    try:
        parsed = urlparse(url)
        host = parsed.hostname or ""
        port = f":{parsed.port}" if parsed.port else ""
    except ValueError:
        return "malformed URL"
    if not parsed.scheme:
        return shorten(parsed.path)
    return shorten(f"{parsed.scheme}://{host}{port}{parsed.path}")


def reason(exc: BaseException) -> str:
    """A library's message without object reprs (`<_io.BytesIO object at 0x…>`)."""
    text = _OBJECT_REPR.sub("the data", str(exc)).strip() or type(exc).__name__
    return shorten(f"{type(exc).__name__}: {text}")


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
        raise ImageError(f"image refused as a decompression bomb: {reason(exc)}") from None
    except Exception as exc:
        raise ImageError(f"not a readable image ({reason(exc)})") from None
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
        raise ImageError(f"not a readable TIFF ({reason(exc)})") from None
    if array.ndim == 3 and array.shape[:2] != size:
        array = array[0]  # planar stack: first plane
    if array.ndim == 3:
        array = array[..., :3] if array.shape[-1] >= 3 else array[..., 0]  # RGB(A) or grey + alpha
    return array


def _check_pixels(n: int, max_pixels: int) -> None:
    if n > max_pixels:
        raise ImageError(f"image has {n} pixels, more than the limit of {max_pixels} (MAX_IMAGE_PIXELS)")


def host_allowed(host: str | None, patterns: tuple[str, ...]) -> bool:
    """Whether `host` matches an IMAGE_HOSTS entry: `name` exactly, `*.name` any subdomain of it."""
    if not host:
        return False
    host = host.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


class ImageFetcher:
    """Downloads task images with Label Studio credentials; thread-safe.

    Local files are read only below `local_roots` (resolved, after following links): a task's
    data is whatever someone imported, and must not make the backend read its own secrets.
    """

    def __init__(
        self,
        label_studio_url: str,
        api_key: str = "",
        *,
        max_bytes: int = 256 * 2**20,
        max_pixels: int = 16384 * 16384,
        cache_bytes: int = 512 * 2**20,
        timeout: float = 30.0,
        local_roots: tuple[Path, ...] = (),
        image_hosts: tuple[str, ...] = (),
    ) -> None:
        self.label_studio = LabelStudioAPI(label_studio_url, api_key, timeout=timeout)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.timeout = timeout
        # As given (a path may name a root through its link) and resolved (where files really are).
        self.local_roots = tuple(Path(os.path.abspath(r)) for r in local_roots)
        self._resolved_roots = tuple(r.resolve() for r in self.local_roots)
        # Empty: any host. Else Label Studio's and these; redirects elsewhere are not followed.
        self.image_hosts = image_hosts
        self._cache: LRU[str, np.ndarray] = LRU(cache_bytes, size=lambda image: image.nbytes)
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
            local_roots=settings.local_files_roots,
            image_hosts=settings.image_hosts,
        )

    # -- public ------------------------------------------------------------------
    def fetch(self, url: str) -> np.ndarray:
        """The decoded image at `url`; raises ImageError with a short user-facing reason."""
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"task has no image URL (got {shorten(repr(url))})")
        try:
            local = self._local_file(url)
            key = f"{local[0]}@{local[1]}" if local else url
            cached = self._cache.get(key)
            if cached is not None:
                return cached
            data = self._read_file(local[0]) if local else self._read_url(url)
        except ImageError:
            raise
        except (ValueError, OSError) as exc:  # malformed URLs, files that vanish while read
            raise ImageError(f"{shown(url)}: {reason(exc)}") from None
        image = decode_image(data, self.max_pixels)
        self._cache.put(key, image)
        return image

    # -- local files -------------------------------------------------------------
    def _local_file(self, url: str) -> tuple[Path, int] | None:
        """(resolved path, mtime) of a permitted local file; None for what is fetched over HTTP.

        Server-relative paths outside the roots are Label Studio's (`/data/...`); whether a
        file exists outside the roots is never looked at, so errors cannot reveal it.
        """
        parsed = urlparse(url)
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise ImageError(f"{shown(url)}: file URLs must name a local file")
            path = Path(unquote(parsed.path))
        elif parsed.scheme or (url.startswith("/") and not self._under_root(Path(url), self._any_roots)):
            return None
        else:
            path = Path(url)
        if not self._under_root(path, self._any_roots):
            raise ImageError(f"{shown(url)}: local files are read only under LOCAL_FILES_ROOTS")
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise ImageError(f"{shown(url)}: no such file") from None
        if not self._under_root(resolved, self._resolved_roots):
            raise ImageError(f"{shown(url)}: links to a file outside LOCAL_FILES_ROOTS")
        st = resolved.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{shown(url)}: not a regular file")
        return resolved, st.st_mtime_ns

    @property
    def _any_roots(self) -> tuple[Path, ...]:
        return self.local_roots + self._resolved_roots

    @staticmethod
    def _under_root(path: Path, roots: tuple[Path, ...]) -> bool:
        absolute = Path(os.path.abspath(path))  # `..` removed without following links
        return any(absolute.is_relative_to(root) for root in roots)

    def _read_file(self, path: Path) -> bytes:
        # O_NONBLOCK: a FIFO swapped in after the check must not hang the request.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ImageError(f"{path}: not a regular file")
            data = f.read(self.max_bytes + 1)  # the limit holds whatever st_size says
        if len(data) > self.max_bytes:
            raise ImageError(f"{path}: more than {self.max_bytes} bytes (MAX_IMAGE_MB)")
        return data

    # -- HTTP ----------------------------------------------------------------------
    def _read_url(self, url: str) -> bytes:
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            return self._download(url)
        if parsed.scheme:
            raise ImageError(f"{shown(url)}: unsupported URL scheme {shorten(repr(parsed.scheme))}")
        try:  # server-relative: Label Studio's
            return self._download(urljoin(self.label_studio.url + "/", url.lstrip("/")))
        except ImageError as exc:
            if url.startswith("/data/"):
                raise
            raise ImageError(f"{exc} (a local file is read only under LOCAL_FILES_ROOTS)") from None

    def _download(self, url: str) -> bytes:
        own = self.label_studio.is_own_url(url)
        where = url if own else shown(url)  # other hosts' query strings may be signatures
        restricted = bool(self.image_hosts) and not own
        if restricted and not host_allowed(urlparse(url).hostname, self.image_hosts):
            raise ImageError(f"{shorten(where)}: host not in IMAGE_HOSTS")

        def send(headers: dict[str, str]) -> requests.Response:
            return self._session.get(
                url, headers=headers, timeout=self.timeout, stream=True, allow_redirects=not restricted
            )

        try:
            with self.label_studio.authorised(send) if own else send({}) as resp:
                if resp.is_redirect:
                    raise ImageError(f"{shorten(where)}: redirects are not followed when IMAGE_HOSTS is set")
                if resp.status_code in (401, 403):
                    raise ImageError(
                        f"{shorten(where)}: Label Studio refused the credentials"
                        f" (HTTP {resp.status_code}); check LABEL_STUDIO_API_KEY"
                    )
                if resp.status_code >= 400:
                    raise ImageError(f"{shorten(where)}: HTTP {resp.status_code}")
                return self._read_limited(where, resp)
        except LabelStudioError as exc:  # the personal access token could not be exchanged
            raise ImageError(str(exc)) from None
        except requests.RequestException as exc:
            raise ImageError(f"{shorten(where)}: cannot download ({type(exc).__name__})") from None

    def _read_limited(self, where: str, resp: requests.Response) -> bytes:
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageError(f"{shorten(where)}: {declared} bytes is more than the limit (MAX_IMAGE_MB)")
        chunks, total = [], 0
        for chunk in resp.iter_content(1 << 20):
            total += len(chunk)
            if total > self.max_bytes:
                raise ImageError(f"{shorten(where)}: more than {self.max_bytes} bytes (MAX_IMAGE_MB)")
            chunks.append(chunk)
        return b"".join(chunks)


@cache
def shared_fetcher(settings: Settings) -> ImageFetcher:
    """One fetcher (and image cache) per settings in a process: a worker's jobs share it."""
    return ImageFetcher.from_settings(settings)
