"""The architectures kept out of plain_* (jointrd_timm/models/underivable.json) are what the script that writes the
file finds: each still refuses, for the recorded reason, and (slow) the whole file is reproduced."""
import json

import pytest

from jointrd_timm.models import underivable


def _one_per_module(listed):
    """The first listed architecture of each timm module (each builds a full model on the meta device)."""
    import timm
    from jointrd_timm.models.plain_twins import TWIN_MODULES
    chosen = {}
    for module in TWIN_MODULES:
        names = sorted(set(timm.list_models(module=module)) & set(listed))
        if names:
            chosen[names[0]] = listed[names[0]]
    return chosen


def test_listed_architectures_still_refuse_for_their_reason():
    listed = json.loads(underivable.PATH.read_text())
    assert listed, 'underivable.json is empty'
    sample = _one_per_module(listed)
    assert len(sample) >= 5
    assert underivable.underivable(sample) == sample


@pytest.mark.slow
def test_every_listed_architecture_still_refuses_for_its_reason():
    listed = json.loads(underivable.PATH.read_text())
    assert underivable.underivable(listed) == listed


def test_listed_architectures_are_not_registered_and_the_rest_are():
    import timm
    listed = json.loads(underivable.PATH.read_text())
    registered = set(timm.list_models('plain_*'))
    assert not {f'plain_{name}' for name in listed} & registered
    assert {'plain_resnet50', 'plain_dla34', 'plain_ghostnet_100'} <= registered


@pytest.mark.slow
def test_the_file_is_what_the_script_writes(tmp_path, monkeypatch):
    committed = underivable.PATH.read_text()
    monkeypatch.setattr(underivable, 'PATH', tmp_path / 'underivable.json')
    underivable.main()
    assert (tmp_path / 'underivable.json').read_text() == committed
