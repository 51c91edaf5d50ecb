"""The published CIFAR-10 weights in registry/: catalogued, loadable offline, and (slow, needs the CIFAR-10 copy
beside the project) reproducing the recorded accuracy within 0.1 point."""
import pytest
import timm
import torch

import jointrd_timm  # noqa: F401
from conftest import ROOT
from jointrd_timm.models.catalogue import entries, weights_folder

ENTRIES = entries()


def test_registry_has_the_cifar10_teacher_and_twin():
    names = {e['name'] for e in ENTRIES}
    assert {'resnet56_cifar.ce_cifar10', 'plain_resnet56_cifar.jointrd_cifar10'} <= names


@pytest.mark.parametrize('entry', ENTRIES, ids=[e['name'] for e in ENTRIES])
def test_entry_is_a_timm_tag_that_loads_offline(entry):
    assert entry['name'] in timm.list_pretrained(entry['architecture'] + '*')
    folder = weights_folder(entry)
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert folder.joinpath('model.safetensors').stat().st_size < 8 * 2**20  # few-MB weights only
    model = timm.create_model(entry['name'], pretrained=True).eval()
    assert model.pretrained_cfg['tag'] == entry['tag']
    card = folder.joinpath('README.md').read_text()
    assert entry['method'] in card and f'{entry["metrics"]["top1_test"]}' in card
    if entry['architecture'].startswith('plain_'):
        assert jointrd_timm.count_shortcut_additions(model) == 0
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.slow
@pytest.mark.parametrize('entry', ENTRIES, ids=[e['name'] for e in ENTRIES])
def test_eval_reproduces_recorded_accuracy(entry, capsys):
    data = ROOT.parent / 'shared' / 'datasets' / 'cifar10'
    if not data.is_dir():
        pytest.skip('the CIFAR-10 copy (../shared/datasets/cifar10) is not beside the project')
    from jointrd_timm.cli import main
    assert main(['eval', entry['name'], '--dataset', str(data)]) == 0
    out = capsys.readouterr().out
    difference = float(out.rsplit('difference ', 1)[1].rstrip(')\n'))
    assert abs(difference) <= 0.1, out
