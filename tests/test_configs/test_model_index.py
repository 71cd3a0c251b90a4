# Copyright (c) mmsparsevit contributors. All rights reserved.
"""model-index.yml and the metafiles (OpenMMLab's model-index format) agree with the configs."""
from pathlib import Path

import pytest
import yaml
from config_test_utils import shipped_configs
from mmengine.config import Config
from test_configs import parse, pretrained_checkpoints

REPO = Path(__file__).resolve().parents[2]


def _models():
    index = yaml.safe_load((REPO / 'model-index.yml').read_text())
    models, collections = [], set()
    for metafile in index['Import']:
        content = yaml.safe_load((REPO / metafile).read_text())
        collections |= {c['Name'] for c in content.get('Collections', [])}
        models += content['Models']
    return models, collections


def test_every_config_has_exactly_one_entry_and_every_entry_a_config():
    models, collections = _models()
    configs = sorted(str(path.relative_to(REPO)) for path in shipped_configs()) + sorted(
        str(path.relative_to(REPO)) for path in (REPO / 'configs' / 'demo').glob('*.py'))
    indexed = [model['Config'] for model in models]
    assert sorted(indexed) == sorted(set(configs))
    for model in models:
        assert model['Name'] == Path(model['Config']).stem
        assert model['In Collection'] in collections
        assert model['Paper']['URL'].startswith('https://arxiv.org/abs/')


@pytest.mark.parametrize('model', _models()[0], ids=lambda model: model['Name'])
def test_entry_names_the_configs_pretrained_weights_and_marks_quoted_results(model):
    if model['Config'].startswith('configs/demo/'):
        cfg = Config.fromfile(str(REPO / model['Config']))
        assert not pretrained_checkpoints(cfg.model)
    else:
        [init_cfg] = pretrained_checkpoints(parse(REPO / model['Config']).model)
        assert model['Metadata']['Pretrained'] == init_cfg.checkpoint
    for result in model.get('Results', []):
        assert 'not reproduced' in result['Source']
        assert model['Weights'].startswith('https://github.com/ziplab/LIT/releases/')
