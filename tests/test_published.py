"""The published CIFAR-10 weights in registry/: catalogued, loadable offline, and (slow, needs the CIFAR-10 copy
beside the project) reproducing the recorded accuracy within 0.1 point."""
import pytest
import timm
import torch

import jointrd_timm  # noqa: F401
from conftest import ROOT
from jointrd_timm.models.catalogue import entries, weights_folder

ENTRIES = entries()


def test_registry_has_a_full_cifar10_teacher_and_twin_per_depth():
    for depth in (20, 56):
        names = {e['name'] for e in ENTRIES if e['architecture'].endswith(f'resnet{depth}_cifar')}
        assert f'resnet{depth}_cifar.ce_full_cifar10' in names, names
        twins = [n for n in names if n.startswith(f'plain_resnet{depth}_cifar.')]
        assert any(n.endswith('_full_cifar10') for n in twins), names
        twin = next(e for e in ENTRIES if e['name'] in twins)
        assert twin['teacher'] == f'resnet{depth}_cifar.ce_full_cifar10'


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
