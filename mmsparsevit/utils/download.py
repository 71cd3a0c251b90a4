"""Checkpoint downloads into torch.hub's cache, checked for length and SHA-256.

A URL may carry the file's SHA-256 in two ways, both checked before anything is unpickled:
torch.hub's naming convention (``name-<first 8 or more hex digits of the SHA-256>.pth``) or a
``#sha256=<64 hex digits>`` fragment, as pip uses (the fragment is never sent to the server).
"""
import hashlib
import os
import os.path as osp
import re
import tempfile
import urllib.error
import urllib.request
from typing import Optional, Tuple
from urllib.parse import urlsplit

import torch

__all__ = ['CheckpointDownloadError', 'cached_download', 'checkpoint_cache_path', 'split_sha256']

DOWNLOAD_TIMEOUT = 60.  # seconds without a byte before a download is given up

_HASH_IN_NAME = re.compile(r'-([0-9a-f]{8,64})\.[^./-]+$')
_HASH_FRAGMENT = re.compile(r'#sha256=([0-9a-fA-F]*)$')
_CHUNK = 1 << 20


class CheckpointDownloadError(RuntimeError):
    """A checkpoint could not be downloaded, or what arrived is not the file asked for."""


def split_sha256(url: str) -> Tuple[str, Optional[str]]:
    """The URL without a ``#sha256=`` fragment, and the expected SHA-256 (or its prefix) if
    the fragment or the file name states one, else None."""
    fragment = _HASH_FRAGMENT.search(url)
    if fragment is not None:
        digest = fragment.group(1).lower()
        if len(digest) != 64:
            raise ValueError(f'{url}: a #sha256= fragment takes the 64 hex digits of a SHA-256, '
                             f'got {len(digest)} characters')
        return url[:fragment.start()], digest
    in_name = _HASH_IN_NAME.search(urlsplit(url).path)
    return url, in_name.group(1) if in_name else None


def checkpoint_cache_path(url: str) -> str:
    """Where :func:`cached_download` keeps ``url``: torch.hub's checkpoint folder
    (``$TORCH_HOME/hub/checkpoints``), under the URL's file name."""
    name = osp.basename(urlsplit(split_sha256(url)[0]).path)
    if not name:
        raise ValueError(f'{url}: the URL names no file')
    return osp.join(torch.hub.get_dir(), 'checkpoints', name)


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for chunk in iter(lambda: file.read(_CHUNK), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _check_digest(url: str, expected: Optional[str], actual: str, where: str) -> None:
    if expected is not None and not actual.startswith(expected):
        raise CheckpointDownloadError(
            f'{url}: SHA-256 mismatch for {where}: expected {expected}, got {actual}; the file '
            'is not the one the URL promises (a changed release or a damaged copy)')


def cached_download(url: str, progress: bool = False,
                    timeout: float = DOWNLOAD_TIMEOUT) -> str:
    """Return the local path of ``url``'s file, downloading it first if it is not cached.

    A cached copy is used as it is (so a config with a URL works offline once the file is in
    the cache, or is put there by hand), after its SHA-256 is checked when one is known. A
    download goes to a temporary file beside the destination and is moved into place only
    once it is complete and its hash matches.

    Args:
        url (str): ``http(s)://`` URL, optionally ending in ``#sha256=<hex>``.
        progress (bool): Show a progress bar. Defaults to False.
        timeout (float): Seconds to wait for the server before giving up. Defaults to
            :data:`DOWNLOAD_TIMEOUT`.

    Raises:
        CheckpointDownloadError: naming the URL, when the server cannot be reached or answers
            with an error, the transfer ends early, or the hash does not match.
    """
    source, expected = split_sha256(url)
    destination = checkpoint_cache_path(url)
    if osp.isfile(destination):
        _check_digest(url, expected, _sha256_of(destination), f'the cached copy {destination}')
        return destination
    os.makedirs(osp.dirname(destination), exist_ok=True)
    offline_hint = f'; to use a copy you already have, put it at {destination}'
    try:
        response = urllib.request.urlopen(source, timeout=timeout)
    except urllib.error.HTTPError as error:
        raise CheckpointDownloadError(
            f'could not download {source}: HTTP {error.code} {error.reason}{offline_hint}'
        ) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, 'reason', error)
        raise CheckpointDownloadError(
            f'could not download {source}: {reason}{offline_hint}') from None
    partial = tempfile.NamedTemporaryFile(
        dir=osp.dirname(destination), prefix=osp.basename(destination) + '.', suffix='.partial',
        delete=False)
    try:
        with response, partial:
            size = response.headers.get('Content-Length')
            size = int(size) if size is not None and size.isdigit() else None
            digest, received = hashlib.sha256(), 0
            with torch.hub.tqdm(total=size, disable=not progress, unit='B',
                                unit_scale=True, unit_divisor=1024) as bar:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except OSError as error:
                        raise CheckpointDownloadError(
                            f'could not download {source}: the transfer broke off after '
                            f'{received} bytes ({error}){offline_hint}') from None
                    if not chunk:
                        break
                    partial.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if size is not None and received != size:
            raise CheckpointDownloadError(
                f'could not download {source}: the transfer ended after {received} of {size} '
                f'bytes{offline_hint}')
        _check_digest(url, expected, digest.hexdigest(), 'the download')
        os.replace(partial.name, destination)
    finally:
        if osp.exists(partial.name):
            os.remove(partial.name)
    return destination
