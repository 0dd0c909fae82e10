"""Fetching and decoding task images: formats, limits, local paths, HTTP and credentials."""

from __future__ import annotations

import io
import os
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from ml_backend.images import ImageError, ImageFetcher, decode_image, host_allowed

LIMIT = 10**7


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, "PNG")
    return buf.getvalue()


def tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, **kwargs)
    return buf.getvalue()


def grey8(height: int = 20, width: int = 30) -> np.ndarray:
    return (np.arange(height * width).reshape(height, width) * 7 % 256).astype(np.uint8)


def grey16(height: int = 20, width: int = 30) -> np.ndarray:
    return (np.arange(height * width).reshape(height, width) * 977 % 65536).astype(np.uint16)


# -- decoding ---------------------------------------------------------------------------------


def test_png_8bit() -> None:
    a = grey8()
    out = decode_image(png_bytes(a), LIMIT)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, a)


def test_png_16bit_keeps_values() -> None:
    a = grey16()
    assert a.max() > 60000  # really uses the 16-bit range
    out = decode_image(png_bytes(a), LIMIT)
    assert out.shape == a.shape
    np.testing.assert_array_equal(out.astype(np.int64), a.astype(np.int64))


@pytest.mark.parametrize("array", [grey8(), grey16(), grey16().astype(np.float32) / 3])
def test_tiff_keeps_dtype_and_values(array: np.ndarray) -> None:
    out = decode_image(tiff_bytes(array), LIMIT)
    assert out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)


def test_rgb_png_and_tiff() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (12, 17, 3)).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(png_bytes(rgb), LIMIT), rgb)
    np.testing.assert_array_equal(decode_image(tiff_bytes(rgb, photometric="rgb"), LIMIT), rgb)
    rgba = np.concatenate([rgb, np.full((12, 17, 1), 128, np.uint8)], axis=2)
    np.testing.assert_array_equal(decode_image(png_bytes(rgba), LIMIT), rgb)
    np.testing.assert_array_equal(decode_image(tiff_bytes(rgba, photometric="rgb"), LIMIT), rgb)


def test_palette_png_becomes_rgb() -> None:
    img = Image.fromarray(np.array([[0, 1, 2], [2, 1, 0]], np.uint8), "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out = decode_image(buf.getvalue(), LIMIT)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 255, 0])
    np.testing.assert_array_equal(out[0, 2], [0, 0, 255])


def test_grey_with_alpha() -> None:
    a = grey8()
    la = np.stack([a, np.full_like(a, 255)], axis=2)
    np.testing.assert_array_equal(decode_image(png_bytes(la, "LA"), LIMIT), a)
    tif = tiff_bytes(la, photometric="minisblack", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(decode_image(tif, LIMIT), a)


def test_tiff_stack_gives_first_page() -> None:
    stack = np.stack([grey16(), grey16()[::-1], grey16()[:, ::-1]])
    np.testing.assert_array_equal(decode_image(tiff_bytes(stack, photometric="minisblack"), LIMIT), stack[0])


@pytest.mark.parametrize(
    "data", [b"", b"hello, not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"II*\x00garbage"]
)
def test_not_an_image(data: bytes) -> None:
    with pytest.raises(ImageError, match="not a readable"):
        decode_image(data, LIMIT)


def huge_png(width: int, height: int) -> bytes:
    """A tiny PNG file whose header declares an enormous 8-bit greyscale image."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_from_header() -> None:
    data = huge_png(100_000, 100_000)
    assert len(data) < 200
    with pytest.raises(ImageError, match="more than the limit|decompression bomb"):
        decode_image(data, 16384 * 16384)


@pytest.mark.parametrize(
    "data",
    [
        png_bytes(grey8(20, 30)),
        png_bytes(grey16(20, 30)),
        tiff_bytes(grey16(20, 30)),
        tiff_bytes(np.zeros((20, 30, 3), np.uint8), photometric="rgb"),
        tiff_bytes(np.zeros((3, 20, 30), np.uint8), photometric="rgb", planarconfig="separate"),
    ],
)
def test_pixel_limit(data: bytes) -> None:
    assert decode_image(data, 600).shape[:2] == (20, 30)
    with pytest.raises(ImageError, match="600 pixels, more than the limit of 599"):
        decode_image(data, 599)


# -- local files ------------------------------------------------------------------------------


def test_local_path_and_cache(tmp_path: Path) -> None:
    path = tmp_path / "slice.png"
    path.write_bytes(png_bytes(grey8()))
    fetcher = ImageFetcher("http://127.0.0.1:1", local_roots=(tmp_path,))
    first = fetcher.fetch(str(path))
    np.testing.assert_array_equal(first, grey8())
    assert fetcher.fetch(str(path)) is first  # cache hit: same decoded object
    assert fetcher.fetch(path.as_uri()) is first  # file:// URL of the same file
    # Replacing the file (new mtime) is noticed.
    path.write_bytes(png_bytes(grey8()[::-1]))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    np.testing.assert_array_equal(fetcher.fetch(str(path)), grey8()[::-1])


def test_cache_is_bounded(tmp_path: Path) -> None:
    fetcher = ImageFetcher("http://127.0.0.1:1", cache_bytes=1000, local_roots=(tmp_path,))
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png_bytes(np.full((20, 20), i, np.uint8)))  # 400 bytes each
    images = [fetcher.fetch(str(p)) for p in paths]
    assert fetcher.fetch(str(paths[2])) is images[2]
    assert fetcher.fetch(str(paths[0])) is not images[0]  # evicted, decoded again
    np.testing.assert_array_equal(fetcher.fetch(str(paths[0])), images[0])


def test_local_file_over_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.uint8)))
    with pytest.raises(ImageError, match="MAX_IMAGE_MB"):
        ImageFetcher("http://127.0.0.1:1", max_bytes=1000, local_roots=(tmp_path,)).fetch(str(path))


def local_fetcher(root: Path, **kwargs) -> ImageFetcher:
    return ImageFetcher("http://127.0.0.1:1", timeout=5, local_roots=(root,), **kwargs)


@pytest.mark.parametrize("form", ["path", "uri"])
def test_local_files_outside_the_roots_are_refused(tmp_path: Path, form: str) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "valid.png").write_bytes(png_bytes(grey8()))
    targets = [
        outside / "valid.png",
        root / ".." / "outside" / "valid.png",  # `..` out of the root
        Path("/etc/passwd"),
        Path("/dev/zero"),
        Path("/proc/self/environ"),
        outside / "missing.png",  # same answer as an existing file: no existence oracle
    ]
    for target in targets:
        url = target.as_uri() if form == "uri" and target.is_absolute() else str(target)
        with pytest.raises(ImageError, match="only under LOCAL_FILES_ROOTS") as info:
            local_fetcher(root).fetch(url)
        assert "0x" not in str(info.value)
    with pytest.raises(ImageError, match="only under LOCAL_FILES_ROOTS"):  # no roots: nothing local
        ImageFetcher("http://127.0.0.1:1").fetch((outside / "valid.png").as_uri())


def test_links_out_of_the_roots_and_non_regular_files_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(png_bytes(grey8()))
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "zero").symlink_to("/dev/zero")
    (root / "dir.png").mkdir()
    os.mkfifo(root / "fifo.png")
    fetcher = local_fetcher(root)
    for name, message in [
        ("link.png", "outside LOCAL_FILES_ROOTS"),
        ("zero", "outside LOCAL_FILES_ROOTS"),
        ("dir.png", "not a regular file"),
        ("fifo.png", "not a regular file"),
        ("missing.png", "no such file"),
    ]:
        with pytest.raises(ImageError, match=message):
            fetcher.fetch(str(root / name))
    # A link that stays inside the roots is fine.
    (root / "real.png").write_bytes(png_bytes(grey8()))
    (root / "alias.png").symlink_to(root / "real.png")
    np.testing.assert_array_equal(fetcher.fetch(str(root / "alias.png")), grey8())


def test_a_root_named_through_a_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.png").write_bytes(png_bytes(grey8()))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    fetcher = local_fetcher(tmp_path / "link")
    for path in (tmp_path / "link" / "a.png", tmp_path / "real" / "a.png"):
        np.testing.assert_array_equal(fetcher.fetch(str(path)), grey8())


def test_byte_limit_holds_while_reading_a_root_device(tmp_path: Path) -> None:
    """/dev and /proc report st_size 0; the limit must hold on what is read, not on stat."""
    fetcher = ImageFetcher("http://127.0.0.1:1", max_bytes=1000, local_roots=(Path("/proc"),))
    with pytest.raises(ImageError, match="MAX_IMAGE_MB"):
        fetcher.fetch("/proc/self/maps")  # st_size 0, content larger than 1000 bytes
    assert Path("/proc/self/maps").stat().st_size == 0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.org/a.png", "unsupported URL scheme 'ftp'"),
        ("s3://bucket/a.png", "unsupported URL scheme 's3'"),
        ("relative/missing.png", "only under LOCAL_FILES_ROOTS"),
        ("http://[::1/x.png", "malformed URL"),
        ("file://otherhost/etc/passwd", "must name a local file"),
        ("", "no image URL"),
        (None, "no image URL"),
        (42, "no image URL"),
    ],
)
def test_bad_urls(url: object, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        ImageFetcher("http://127.0.0.1:1").fetch(url)  # type: ignore[arg-type]


# -- HTTP -------------------------------------------------------------------------------------


class Server:
    """A tiny HTTP server on 127.0.0.1 recording each request's path and Authorization header."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.chunked: set[str] = set()  # served without Content-Length
        self.redirects: dict[str, str] = {}  # path -> Location of a 302
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.requests.append((self.path, self.headers.get("Authorization")))
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.end_headers()
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if self.path not in server.chunked:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_download(server: Server) -> None:
    server.files["/img/a.png"] = png_bytes(grey16())
    fetcher = ImageFetcher(server.url(""), timeout=5)
    out = fetcher.fetch(server.url("/img/a.png"))
    np.testing.assert_array_equal(out.astype(np.int64), grey16().astype(np.int64))
    assert fetcher.fetch(server.url("/img/a.png")) is out
    assert len(server.requests) == 1  # second fetch came from the cache


def test_http_404(server: Server) -> None:
    fetcher = ImageFetcher(server.url(""), timeout=5)
    with pytest.raises(ImageError) as info:
        fetcher.fetch(server.url("/missing.png"))
    assert "HTTP 404" in str(info.value) and "/missing.png" in str(info.value)


def test_http_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}/a.png"
    with pytest.raises(ImageError) as info:
        ImageFetcher("http://127.0.0.1:1", timeout=5).fetch(url)
    assert "cannot download" in str(info.value) and url in str(info.value)


def test_http_not_an_image(server: Server) -> None:
    server.files["/page.html"] = b"<html>login</html>"
    with pytest.raises(ImageError, match="not a readable image"):
        ImageFetcher(server.url(""), timeout=5).fetch(server.url("/page.html"))


def test_errors_show_no_query_strings_or_addresses(server: Server) -> None:
    server.files["/page.html?X-Amz-Signature=s3cr3t"] = b"<html>login</html>"
    fetcher = ImageFetcher("http://127.0.0.1:1", timeout=5)
    for path, expected in [
        ("/page.html?X-Amz-Signature=s3cr3t", "not a readable image (UnidentifiedImageError: "),
        ("/missing.png?X-Amz-Signature=s3cr3t#frag", f"http://127.0.0.1:{server.port}/missing.png: HTTP 404"),
    ]:
        with pytest.raises(ImageError) as info:
            fetcher.fetch(server.url(path).replace("http://", "http://user:pw@"))
        message = str(info.value)
        assert message.startswith(expected), message
        assert "s3cr3t" not in message and "pw" not in message and "0x" not in message


def test_label_studio_urls_get_the_token_and_others_do_not(server: Server) -> None:
    data = png_bytes(grey8())
    for path in ("/data/upload/1/a.png", "/data/local-files/?d=em/b.png", "/elsewhere/c.png"):
        server.files[path] = data
    fetcher = ImageFetcher(server.url(""), api_key="secret123", timeout=5)
    fetcher.fetch("/data/upload/1/a.png")  # server-relative: resolved against Label Studio
    fetcher.fetch(server.url("/data/local-files/?d=em/b.png"))  # absolute URL of Label Studio
    fetcher.fetch(server.url("/elsewhere/c.png", host="localhost"))  # another host (same socket)
    assert server.requests == [
        ("/data/upload/1/a.png", "Token secret123"),
        ("/data/local-files/?d=em/b.png", "Token secret123"),
        ("/elsewhere/c.png", None),
    ]


def test_host_allowed() -> None:
    patterns = ("images.example.org", "*.s3.amazonaws.com")
    assert host_allowed("images.example.org", patterns)
    assert host_allowed("IMAGES.example.org.", patterns)
    assert host_allowed("bucket.s3.amazonaws.com", patterns)
    assert not host_allowed("s3.amazonaws.com", patterns)  # `*.` names subdomains only
    assert not host_allowed("evil-s3.amazonaws.com.attacker.net", patterns)
    assert not host_allowed("example.org", patterns)
    assert not host_allowed(None, patterns)


def test_image_hosts_restrict_other_hosts(server: Server) -> None:
    data = png_bytes(grey8())
    server.files["/data/upload/a.png"] = server.files["/b.png"] = data
    server.redirects["/moved.png"] = server.url("/b.png")
    # Label Studio is 127.0.0.1; "localhost" reaches the same socket as another host.
    fetcher = ImageFetcher(server.url(""), timeout=5, image_hosts=("localhost",))
    assert fetcher.fetch("/data/upload/a.png").shape == (20, 30)  # Label Studio's host: always
    assert fetcher.fetch(server.url("/b.png", host="localhost")).shape == (20, 30)
    with pytest.raises(ImageError, match="redirects are not followed when IMAGE_HOSTS is set"):
        fetcher.fetch(server.url("/moved.png", host="localhost"))
    only_s3 = ImageFetcher(server.url(""), timeout=5, image_hosts=("*.s3.amazonaws.com",))
    before = len(server.requests)
    with pytest.raises(ImageError, match="host not in IMAGE_HOSTS"):
        only_s3.fetch(server.url("/b.png?sig=s3cr3t", host="localhost"))
    assert len(server.requests) == before  # refused before any request
    # Unset (the default): any host, and redirects are followed.
    assert ImageFetcher(server.url(""), timeout=5).fetch(
        server.url("/moved.png", host="localhost")
    ).shape == (20, 30)


def test_no_api_key_no_header(server: Server) -> None:
    server.files["/data/upload/a.png"] = png_bytes(grey8())
    ImageFetcher(server.url(""), timeout=5).fetch("/data/upload/a.png")
    assert server.requests == [("/data/upload/a.png", None)]


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials(server: Server, status: int) -> None:
    class Refusing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_error(status)

        def log_message(self, *args: object) -> None:
            pass

    server.httpd.RequestHandlerClass = Refusing
    with pytest.raises(ImageError, match=f"refused the credentials \\(HTTP {status}\\)"):
        ImageFetcher(server.url(""), api_key="wrong", timeout=5).fetch("/data/upload/a.png")


@pytest.mark.parametrize("chunked", [False, True])
def test_http_max_bytes(server: Server, chunked: bool) -> None:
    data = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.uint8))
    assert len(data) > 2000
    server.files["/big.png"] = data
    if chunked:
        server.chunked.add("/big.png")  # no Content-Length: the limit applies while streaming
    with pytest.raises(ImageError, match="MAX_IMAGE_MB"):
        ImageFetcher(server.url(""), max_bytes=2000, timeout=5).fetch(server.url("/big.png"))
    out = ImageFetcher(server.url(""), max_bytes=len(data), timeout=5).fetch(server.url("/big.png"))
    assert out.shape == (64, 64)


def test_http_pixel_limit(server: Server) -> None:
    server.files["/bomb.png"] = huge_png(50_000, 50_000)
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS|decompression bomb"):
        ImageFetcher(server.url(""), timeout=5).fetch(server.url("/bomb.png"))
