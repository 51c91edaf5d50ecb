"""The architectures kept out of plain_* (jointrd_timm/models/underivable.json) are what the script that writes the
file finds: each still refuses, and (slow) the script finds exactly these. (The reasons are compared by their kind
only: their wording, e.g. a count of blocks, moves with the rules.)"""
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


@pytest.mark.slow
def test_listed_architectures_still_refuse_for_their_reason():
    listed = json.loads(underivable.PATH.read_text())
    assert listed, 'underivable.json is empty'
    sample = _one_per_module(listed)
    assert len(sample) >= 5
    found = underivable.underivable(sample)
    assert found.keys() == sample.keys()
    assert [_kind(r) for r in found.values()] == [_kind(r) for r in sample.values()]


def _kind(reason: str) -> str:
    return 'refused by design' if 'refused by design' in reason else reason.split(':')[0]


@pytest.mark.slow
def test_every_listed_architecture_still_refuses_for_its_reason():
    listed = json.loads(underivable.PATH.read_text())
    assert underivable.underivable(listed).keys() == listed.keys()


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
    assert json.loads((tmp_path / 'underivable.json').read_text()).keys() == json.loads(committed).keys()
