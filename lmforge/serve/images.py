"""The images of a chat request, as pixel tensors for a vision-language model.

An image part's URL is a ``data:image/...;base64,`` URL, or an http(s) URL that the server
downloads only when started with ``--allow-image-urls`` (it then fetches whatever a client
names, addresses on its own network included). Nothing else is read: a bare path would let
a client open the server's own files. `check_images` refuses what can be refused without
decoding (it runs on the event loop); `request_images` downloads and decodes, so it runs on a
worker thread. Errors name the part (`messages[0].content[1]`).
"""

from __future__ import annotations

import time

import httpx

from lmforge.errors import LmforgeError
from lmforge.images import ImageError, ImageProcessor, Prepared, load_image

DOWNLOAD_SECONDS = 10.0
WEB = ("http://", "https://")


class PartError(LmforgeError, ValueError):
    """A content part that cannot be used; `where` names it."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where


def check_images(parts: list[tuple[str, str]], reads_images: bool, max_images: int,
                 allow_urls: bool) -> None:
    """Refuse images (`(where, url)` in prompt order) that the server will not read: any, for
    a model that reads text only; more than `max_images`; a URL of a kind not allowed."""
    if parts and not reads_images:
        raise PartError(parts[0][0], "this model reads text only: it takes no images (serve a "
                        "vision-language model for that)")
    if len(parts) > max_images:
        many = f"{len(parts)} image" + ("s" if len(parts) > 1 else "")
        raise PartError(parts[max_images][0], f"the messages hold {many}; this server takes "
                        f"at most {max_images} per request (lmforge serve --max-images)")
    for where, url in parts:
        if url.startswith(WEB) and not allow_urls:
            raise PartError(where, "this server does not download images: send the image "
                            "itself as a data:image/...;base64, URL (or start the server with "
                            "--allow-image-urls)")
        if not url.startswith(("data:", *WEB)):
            raise PartError(where, f"{url[:40]!r} is not an image URL: send the image as a "
                            "data:image/png;base64, URL (PNG, JPEG or WebP)")


def request_images(parts: list[tuple[str, str]], processor: ImageProcessor, max_pixels: int,
                   max_bytes: int) -> list[Prepared]:
    """Each image that `check_images` let through, as the model sees it (`processor`), in
    order; images of more than `max_pixels` pixels, or downloads over `max_bytes`, are
    refused."""
    prepared = []
    for where, url in parts:
        try:
            source = download(url, max_bytes) if url.startswith(WEB) else url
            # One image decoded at a time: only its pixels for the model are kept.
            prepared.append(processor.prepare(load_image(source, max_pixels)))
        except ImageError as err:
            raise PartError(where, str(err)) from None
    return prepared


def download(url: str, max_bytes: int, seconds: float = DOWNLOAD_SECONDS) -> bytes:
    """The body of `url`, refused when it is not there, over `max_bytes`, or slower than
    `seconds` (a server that sends a byte at a time must not hold a worker thread)."""
    deadline = time.monotonic() + seconds
    try:
        with httpx.stream("GET", url, timeout=seconds, follow_redirects=True) as response:
            if response.status_code != 200:
                raise ImageError(f"downloading {url} failed: HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ImageError(f"{url} is {int(declared):,} bytes, over the server's limit of "
                                 f"{max_bytes:,} (lmforge serve --max-body-mb)")
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise ImageError(f"{url} is over the server's limit of {max_bytes:,} bytes "
                                     "(lmforge serve --max-body-mb)")
                if time.monotonic() > deadline:
                    raise ImageError(f"downloading {url} took over {seconds:g} s")
            return bytes(data)
    except httpx.HTTPError as err:
        raise ImageError(f"cannot download {url}: {err}") from None
