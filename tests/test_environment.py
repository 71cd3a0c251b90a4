# Copyright (c) mmsparsevit contributors. All rights reserved.
"""`make install` installs exactly the stack CI tests (requirements/constraints.txt)."""
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[1] / 'requirements' / 'constraints.txt'


def _pins():
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith('#'):
            name, pinned = re.fullmatch(r'([A-Za-z0-9_.\-]+)==(\S+)', line).groups()
            pins[name] = pinned
    return pins


def test_every_pinned_package_is_installed_at_its_version():
    pins = _pins()
    assert {'torch', 'torchvision', 'mmcv', 'mmdet', 'mmsegmentation', 'mmengine', 'numpy',
            'pycocotools', 'pytest'} <= set(pins)
    drifted = {}
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            drifted[name] = (pinned, installed)
    assert not drifted, f'(pinned, installed) differ: {drifted}'
