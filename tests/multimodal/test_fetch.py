"""Remote media (`--allowed-media-domains`): only allow-listed http(s) hosts are fetched, every redirect hop is
checked against the list before it is followed, bodies stop at the byte cap whether or not they declare their
length, and a fetch that takes too long (connect, redirects and body together) is abandoned."""

from __future__ import annotations

import time

import pytest

from tests.multimodal.media_server import MediaServer
from valora.config import MultiModalConfig
from valora.multimodal.chat import MediaSources, image_data_url, parse_messages
from valora.multimodal.fetch import RemoteMedia
from valora.multimodal.inputs import InputError, load_image
from valora.testing.images import random_image

PNG = image_data_url(random_image(20, 30))


@pytest.fixture(scope="module")
def site():
    import base64

    png = base64.b64decode(PNG.partition(",")[2])
    with MediaServer({"/cat.png": png, "/big": b"y" * 5000},
                     {"/moved": "/cat.png", "/moved-twice": "/moved", "/away": "http://localhost:1/cat.png",
                      "/loop": "/loop", "/to-file": "file:///etc/passwd"}) as server:
        yield server


@pytest.fixture
def remote():
    media = RemoteMedia(["127.0.0.1"], timeout_s=1.0, connect_timeout_s=1.0)
    yield media
    media.close()


def test_an_allowed_host_is_fetched(site, remote):
    data = remote.fetch(site.url("/cat.png"), max_bytes=100_000)
    assert load_image(data, MultiModalConfig()).size == (30, 20)


def test_redirects_on_allowed_hosts_are_followed(site, remote):
    assert remote.fetch(site.url("/moved-twice"), max_bytes=100_000) == site.files["/cat.png"]


@pytest.mark.parametrize("path, message", [("/away", "not in --allowed-media-domains"), ("/loop", "redirects"),
                                           ("/to-file", "scheme 'file'"), ("/nothing", "HTTP 404")])
def test_what_cannot_be_fetched_is_an_input_error(site, remote, path, message):
    with pytest.raises(InputError, match=message):
        remote.fetch(site.url(path), max_bytes=100_000)


def test_hosts_off_the_list_are_never_contacted(site, remote):
    before = len(site.requests)
    for url in (site.url("/cat.png", host="localhost"), f"http://127.0.0.1.evil.example:{site.port}/cat.png",
                f"http://127.0.0.1@localhost:{site.port}/cat.png", "ftp://127.0.0.1/cat.png"):
        with pytest.raises(InputError):
            remote.fetch(url, max_bytes=100_000)
    assert len(site.requests) == before


@pytest.mark.parametrize("path", ["/big", "/undeclared/5000"])
def test_bodies_stop_at_the_byte_cap(site, remote, path):
    assert len(remote.fetch(site.url(path), max_bytes=5000)) == 5000
    with pytest.raises(InputError, match="over the limit of 4999"):
        remote.fetch(site.url(path), max_bytes=4999)


def test_a_trickling_body_is_abandoned_at_the_time_limit(site, remote):
    t = time.monotonic()
    with pytest.raises(InputError, match="took over 1 s"):
        remote.fetch(site.url("/trickle"), max_bytes=100_000)
    assert time.monotonic() - t < 3


def test_chat_image_urls_go_through_the_allow_list(site):
    sources = MediaSources.from_config(MultiModalConfig(allowed_media_domains=("127.0.0.1",)))
    message = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": site.url("/cat.png")}}]}]
    _, images, _ = parse_messages(message, sources)
    assert images == [site.files["/cat.png"]]
    with pytest.raises(InputError, match="over the limit of 100"):
        parse_messages(message, sources, MultiModalConfig(max_image_bytes=100))
    with pytest.raises(InputError, match="not fetched"):
        parse_messages(message, MediaSources())
    sources.close()
