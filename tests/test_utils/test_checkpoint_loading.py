# Copyright (c) mmsparsevit contributors. All rights reserved.
"""The safe loader behind every checkpoint scheme: remote files, hashes, foreign objects.

URL tests use the ``checkpoint_server`` fixture (tests/conftest.py): an HTTP server on
127.0.0.1 started inside the test, with torch.hub's cache in a temporary folder.
"""
import argparse
import hashlib
import json
import os
import socket
import sys
import types
from collections import OrderedDict

import pytest
import torch
from mmengine.runner import checkpoint as mmengine_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader

import mmsparsevit  # noqa: F401  (installs the safe loader)
from mmsparsevit.utils import (CheckpointDownloadError, CorruptCheckpointError, ForeignObject,
                               UnsafeCheckpointError, load_checkpoint_file)
from mmsparsevit.utils import checkpoint as safe_checkpoint
from mmsparsevit.utils.download import cached_download, checkpoint_cache_path, split_sha256


class RunsCommand:
    """Unpickling this creates ``path`` through ``os.system``: a code-executing payload."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f'touch {self.path}', ))


def _publish(server, name, obj):
    path = server.root / name
    torch.save(obj, path)
    return path


@pytest.fixture
def weights():
    return OrderedDict([('conv.weight', torch.randn(4, 3, 3, 3)), ('conv.bias', torch.randn(4))])


# --- every scheme is ours -------------------------------------------------------------------

def test_every_mmengine_scheme_loads_through_the_safe_loader():
    mmengine_prefixes = {'', 'http://', 'https://', 'pavi://', r'(\S+\:)?s3://',
                         r'(\S+\:)?petrel://', 'modelzoo://', 'torchvision://',
                         'open-mmlab://', 'openmmlab://', 'mmcls://'}
    schemes = CheckpointLoader._schemes
    assert mmengine_prefixes <= set(schemes)
    assert {prefix: loader.__module__ for prefix, loader in schemes.items()} == {
        prefix: 'mmsparsevit.utils.checkpoint' for prefix in schemes}


# --- URLs -----------------------------------------------------------------------------------

def test_url_downloads_once_into_torch_hub_cache_and_loads(checkpoint_server, weights, tmp_path):
    _publish(checkpoint_server, 'good.pth', {'state_dict': weights, 'meta': {'epoch': 1}})
    url = checkpoint_server.url('good.pth')
    loaded = CheckpointLoader.load_checkpoint(url, map_location='cpu')
    assert torch.equal(loaded['state_dict']['conv.weight'], weights['conv.weight'])
    cached = tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'good.pth'
    assert checkpoint_cache_path(url) == str(cached) and cached.is_file()
    # A second load (offline, say) uses the cache: the server sees no second request.
    (checkpoint_server.root / 'good.pth').unlink()
    again = CheckpointLoader.load_checkpoint(url, map_location='cpu')
    assert torch.equal(again['state_dict']['conv.bias'], weights['conv.bias'])
    assert checkpoint_server.requests == ['/good.pth']
    assert not list(cached.parent.glob('*.partial'))


def test_hostile_url_is_refused_and_never_runs(checkpoint_server, tmp_path):
    sentinel = tmp_path / 'payload_ran'
    _publish(checkpoint_server, 'hostile.pth', {'state_dict': {}, 'meta': RunsCommand(sentinel)})
    url = checkpoint_server.url('hostile.pth')
    with pytest.raises(UnsafeCheckpointError,
                       match=f'refusing to load checkpoint {url}: it asks for a call of '
                       r'posix\.system'):
        CheckpointLoader.load_checkpoint(url)
    assert not sentinel.exists()
    # torch.hub's own loader, which mmengine used for URLs, would have run it.
    assert checkpoint_server.requests == ['/hostile.pth']


def test_http_error_names_the_url(checkpoint_server):
    url = checkpoint_server.url('missing.pth')
    with pytest.raises(CheckpointDownloadError,
                       match=f'could not download {url}: HTTP 404 .*put it at .*missing.pth'):
        CheckpointLoader.load_checkpoint(url)


def test_truncated_download_is_refused_and_not_cached(checkpoint_server, weights):
    path = _publish(checkpoint_server, 'cut.pth', {'state_dict': weights})
    url = checkpoint_server.url('truncated/cut.pth')
    size = path.stat().st_size
    with pytest.raises(CheckpointDownloadError,
                       match=f'could not download {url}: the transfer ended after '
                       f'{size // 2} of {size} bytes'):
        CheckpointLoader.load_checkpoint(url)
    assert not os.path.exists(checkpoint_cache_path(url))
    assert not list(os.scandir(os.path.dirname(checkpoint_cache_path(url))))


def test_sha256_in_fragment_or_name_is_checked(checkpoint_server, weights):
    path = _publish(checkpoint_server, 'pinned.pth', {'state_dict': weights})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    good = CheckpointLoader.load_checkpoint(checkpoint_server.url(f'pinned.pth#sha256={digest}'))
    assert torch.equal(good['state_dict']['conv.weight'], weights['conv.weight'])
    assert checkpoint_server.requests == ['/pinned.pth']  # the fragment is not sent

    wrong = 'f' * 64
    with pytest.raises(CheckpointDownloadError,
                       match=f'SHA-256 mismatch for the cached copy .*expected {wrong}, '
                       f'got {digest}'):
        CheckpointLoader.load_checkpoint(checkpoint_server.url(f'pinned.pth#sha256={wrong}'))

    # torch.hub's convention: name-<hash prefix>.pth
    (checkpoint_server.root / 'model-0123abcd.pth').write_bytes(path.read_bytes())
    url = checkpoint_server.url('model-0123abcd.pth')
    with pytest.raises(CheckpointDownloadError,
                       match=f'{url}: SHA-256 mismatch for the download: expected 0123abcd, '
                       f'got {digest}'):
        CheckpointLoader.load_checkpoint(url)
    assert not os.path.exists(checkpoint_cache_path(url))

    named = f'model-{digest[:10]}.pth'
    (checkpoint_server.root / named).write_bytes(path.read_bytes())
    assert CheckpointLoader.load_checkpoint(checkpoint_server.url(named))['state_dict']


def test_sha256_fragment_must_be_a_whole_digest():
    url = 'https://x.org/a-1234abcd.pth'
    assert split_sha256(url) == (url, '1234abcd')
    assert split_sha256('https://x.org/swin_tiny_patch4_window7_224.pth')[1] is None
    with pytest.raises(ValueError, match='64 hex digits'):
        split_sha256('https://x.org/a.pth#sha256=abc')


def test_unanswered_download_gives_up_naming_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(('127.0.0.1', 0))
        listener.listen(1)
        url = f'http://127.0.0.1:{listener.getsockname()[1]}/slow.pth'
        with pytest.raises(CheckpointDownloadError,
                           match=f'could not download {url}: .*timed out'):
            cached_download(url, timeout=0.5)


def test_distributed_rank_zero_downloads_before_the_others(checkpoint_server, weights,
                                                           monkeypatch):
    _publish(checkpoint_server, 'shared.pth', {'state_dict': weights})
    url = checkpoint_server.url('shared.pth')
    events = []
    monkeypatch.setattr(safe_checkpoint, 'barrier', lambda: events.append('barrier'))
    real_download = safe_checkpoint.cached_download

    def download(*args, **kwargs):
        events.append('download')
        return real_download(*args, **kwargs)

    monkeypatch.setattr(safe_checkpoint, 'cached_download', download)
    for rank in (0, 1):
        monkeypatch.setattr(safe_checkpoint, 'get_dist_info', lambda rank=rank: (rank, 2))
        CheckpointLoader.load_checkpoint(url)
    assert events == ['download', 'barrier', 'barrier', 'download']
    assert checkpoint_server.requests == ['/shared.pth']  # rank 1 found rank 0's file


# --- the named schemes ----------------------------------------------------------------------

@pytest.fixture
def named_hostile(checkpoint_server, tmp_path, monkeypatch):
    """mmengine's torchvision / open-mmlab / mmcls tables pointed at the local server, each
    naming a hostile file ``evil``."""
    sentinel = tmp_path / 'payload_ran'
    _publish(checkpoint_server, 'evil.pth', {'state_dict': {'w': RunsCommand(sentinel)}})
    table = {'evil': checkpoint_server.url('evil.pth')}
    monkeypatch.setattr(mmengine_checkpoint, 'get_torchvision_models', lambda: dict(table))
    monkeypatch.setattr(mmengine_checkpoint, 'get_mmcls_models', lambda: dict(table))
    home = tmp_path / 'mmengine_home'
    home.mkdir()
    (home / 'open_mmlab.json').write_text(json.dumps(table))  # mmengine's user override
    monkeypatch.setenv('MMENGINE_HOME', str(home))
    return sentinel


@pytest.mark.parametrize(
    'name', ['torchvision://evil', 'modelzoo://evil', 'open-mmlab://evil', 'openmmlab://evil',
             'mmcls://evil'])
def test_named_schemes_download_then_refuse(named_hostile, checkpoint_server, name):
    with pytest.raises(UnsafeCheckpointError, match=r'evil\.pth: it asks for a call of '
                       r'posix\.system'):
        CheckpointLoader.load_checkpoint(name)
    assert not named_hostile.exists()
    assert checkpoint_server.requests == ['/evil.pth']


def test_open_mmlab_name_of_a_local_file_under_mmengine_home(tmp_path, monkeypatch, weights):
    monkeypatch.setenv('MMENGINE_HOME', str(tmp_path))
    torch.save({'state_dict': weights}, tmp_path / 'local.pth')
    (tmp_path / 'open_mmlab.json').write_text(json.dumps({'mine': 'local.pth'}))
    loaded = CheckpointLoader.load_checkpoint('open-mmlab://mine')
    assert torch.equal(loaded['state_dict']['conv.weight'], weights['conv.weight'])
    with pytest.raises(KeyError, match='open-mmlab://nothing is not a known checkpoint name'):
        CheckpointLoader.load_checkpoint('open-mmlab://nothing')


def test_pavi_and_ceph_bytes_go_through_the_allow_list(tmp_path, monkeypatch):
    sentinel = tmp_path / 'payload_ran'
    hostile = tmp_path / 'hostile.pth'
    torch.save({'w': RunsCommand(sentinel)}, hostile)

    class Model:
        name = 'model.pth'

        def download(self, path):
            with open(path, 'wb') as file:
                file.write(hostile.read_bytes())

    modelcloud = types.SimpleNamespace(get=lambda path: Model())
    monkeypatch.setitem(sys.modules, 'pavi', types.SimpleNamespace(modelcloud=modelcloud))
    with pytest.raises(UnsafeCheckpointError, match='pavi://project/model'):
        CheckpointLoader.load_checkpoint('pavi://project/model')

    backend = types.SimpleNamespace(get=lambda name: hostile.read_bytes())
    monkeypatch.setattr(mmengine_checkpoint, 'get_file_backend', lambda *a, **k: backend)
    for name in ('s3://bucket/hostile.pth', 'cluster:s3://bucket/hostile.pth',
                 'petrel://bucket/hostile.pth'):
        with pytest.raises(UnsafeCheckpointError, match=name):
            CheckpointLoader.load_checkpoint(name)
    assert not sentinel.exists()


# --- foreign objects ------------------------------------------------------------------------

@pytest.fixture
def missing_module(monkeypatch):
    """A module ``yacs.config`` with a ``CfgNode`` like yacs's (a dict subclass with attribute
    access) that exists while a checkpoint is saved; ``remove()`` takes it away again."""
    package = types.ModuleType('yacs')
    module = types.ModuleType('yacs.config')

    class CfgNode(dict):

        def __init__(self, entries=None):
            super().__init__(entries or {})
            self.__dict__['__immutable__'] = False

        def __getattr__(self, name):
            return self[name]

    CfgNode.__module__ = 'yacs.config'
    CfgNode.__qualname__ = 'CfgNode'
    module.CfgNode = CfgNode
    package.config = module
    monkeypatch.setitem(sys.modules, 'yacs', package)
    monkeypatch.setitem(sys.modules, 'yacs.config', module)

    def remove():
        monkeypatch.delitem(sys.modules, 'yacs')
        monkeypatch.delitem(sys.modules, 'yacs.config')

    module.remove = remove
    return module


def test_foreign_class_becomes_inert_data_and_is_never_imported(tmp_path, missing_module,
                                                                weights, monkeypatch):
    config = missing_module.CfgNode({'MODEL': missing_module.CfgNode({'TYPE': 'lit'}),
                                     'SEED': 0})
    path = tmp_path / 'foreign.pth'
    torch.save({'model': weights, 'config': config, 'args': argparse.Namespace(lr=1e-3)}, path)
    missing_module.remove()
    logged = []
    monkeypatch.setattr(safe_checkpoint, 'print_log', lambda msg, **kwargs: logged.append(msg))
    loaded = load_checkpoint_file(str(path))
    assert 'yacs' not in sys.modules
    assert torch.equal(loaded['model']['conv.weight'], weights['conv.weight'])
    node = loaded['config']
    assert isinstance(node, ForeignObject) and node.qualified_name == 'yacs.config.CfgNode'
    assert node.items['SEED'] == 0 and node.items['MODEL'].items == {'TYPE': 'lit'}
    assert node.state == {'__immutable__': False}
    assert loaded['args'].qualified_name == 'argparse.Namespace'
    assert loaded['args'].state == {'lr': 1e-3}
    assert len(logged) == 1 and 'not reconstructed' in logged[0]
    assert 'config (yacs.config.CfgNode), args (argparse.Namespace)' in logged[0]


def test_payload_nested_in_a_foreign_object_is_refused(tmp_path, missing_module):
    sentinel = tmp_path / 'payload_ran'
    path = tmp_path / 'nested.pth'
    torch.save({'config': missing_module.CfgNode({'hook': RunsCommand(sentinel)})}, path)
    missing_module.remove()
    with pytest.raises(UnsafeCheckpointError, match=r'a call of posix\.system'):
        load_checkpoint_file(str(path))
    assert not sentinel.exists()


class _CallsForeignClass:
    """Pickles as a call of a class that will not exist at load time."""

    def __reduce__(self):
        return (sys.modules['yacs.config'].CfgNode, ({'x': 1}, ))


def test_calling_a_foreign_class_is_refused(tmp_path, missing_module):
    path = tmp_path / 'call.pth'
    torch.save({'config': _CallsForeignClass()}, path)
    missing_module.remove()
    with pytest.raises(UnsafeCheckpointError, match=r'a call of yacs\.config\.CfgNode'):
        load_checkpoint_file(str(path))


@pytest.mark.parametrize('protocol', [1, 2, 4, 5])
@pytest.mark.parametrize('zipped', [True, False])
def test_refusal_holds_for_every_pickle_protocol_and_the_legacy_format(tmp_path, protocol,
                                                                       zipped):
    sentinel = tmp_path / 'payload_ran'
    path = tmp_path / 'hostile.pth'
    torch.save({'w': torch.ones(2), 'x': RunsCommand(sentinel)}, path, pickle_protocol=protocol,
               _use_new_zipfile_serialization=zipped)
    with pytest.raises(UnsafeCheckpointError, match=r'posix\.system'):
        load_checkpoint_file(str(path))
    assert not sentinel.exists()


def test_plain_pickle_with_payload_is_refused(tmp_path):
    import pickle
    sentinel = tmp_path / 'payload_ran'
    path = tmp_path / 'plain.pkl'
    path.write_bytes(pickle.dumps(RunsCommand(sentinel)))
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_file(str(path))
    assert not sentinel.exists()


def test_config_text_in_meta_is_not_left_for_mmengine_to_execute(tmp_path):
    path = tmp_path / 'mmcv1.pth'
    text = "open('ran', 'w')\nmodel = dict(type='RetinaNet')\n"
    torch.save({'meta': {'config': text, 'epoch': 12}, 'state_dict': {}}, path)
    meta = load_checkpoint_file(str(path))['meta']
    # mmengine's Runner.resume evaluates meta['config'] as a Python config file.
    assert 'config' not in meta and meta['config_text'] == text and meta['epoch'] == 12


def test_truncated_local_file_is_reported_corrupt(tmp_path, weights):
    path = tmp_path / 'cut.pth'
    torch.save({'state_dict': weights}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptCheckpointError, match=r'cut\.pth is truncated or not a torch'):
        load_checkpoint_file(str(path))
