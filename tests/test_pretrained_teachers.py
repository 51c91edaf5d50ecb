"""Pretrained teachers as start points: every pretrained tag of a teacher is a tag of its twin
(``plain_resnet50.a1_in1k``) that loads the teacher's weights through timm's own machinery, offline here from a
hand-built Hub cache or a local file; with ``shortcut_fade=True`` the twin is the pretrained teacher at s = 1."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

import jointrd_timm  # noqa: F401
from conftest import ROOT
from jointrd_timm.twins.fade import is_fading

TEACHER = 'test_resnet.r160_in1k'  # the smallest timm residual net with a pretrained tag (Hub: timm/<name>)


def _run(code: str, **env) -> str:
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONWARNINGS='ignore', HF_HUB_OFFLINE='1', **env))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _hub_cache(tmp_path, name: str, state_dict=None):
    """A huggingface_hub cache holding timm/<name> (model.safetensors), as hf_hub_download leaves it."""
    repo = tmp_path / 'cache' / f'models--timm--{name}'
    snapshot = repo / 'snapshots' / ('b' * 40)
    snapshot.mkdir(parents=True)
    if state_dict is not None:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snapshot / 'model.safetensors'))
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('b' * 40)
    return tmp_path / 'cache'


def test_teacher_tags_are_twin_tags_published_twins_first():
    tags = [t for t in timm.list_pretrained('plain_resnet50.*')]
    teacher_tags = timm.list_pretrained('resnet50.*')
    assert tags == [f'plain_{t}' for t in teacher_tags] and 'plain_resnet50.a1_in1k' in tags
    cfg = timm.get_pretrained_cfg('plain_resnet50.a1_in1k')
    assert (cfg.architecture, cfg.tag, cfg.hf_hub_id) == ('plain_resnet50', 'a1_in1k', 'timm/resnet50.a1_in1k')
    assert timm.get_pretrained_cfg('plain_resnet50').tag == timm.get_pretrained_cfg('resnet50').tag  # same default
    # a published twin comes before the teacher's tags: it is what pretrained=True loads
    from jointrd_timm.models.catalogue import entries
    published = [e['name'] for e in entries() if e['architecture'] == 'plain_resnet20_cifar']
    order = list(timm.models.get_arch_pretrained_cfgs('plain_resnet20_cifar'))
    assert published and order[:len(published) + 1] == published + ['plain_resnet20_cifar.ce_full_cifar10']
    assert timm.get_pretrained_cfg('plain_resnet20_cifar').tag == published[0].split('.', 1)[1]


def test_teacher_tag_loads_from_a_local_file_through_timm():
    # resnet20_cifar.ce_full_cifar10 is a teacher of the registry whose weights are a local file
    teacher = timm.create_model('resnet20_cifar.ce_full_cifar10', pretrained=True).eval()
    twin = timm.create_model('plain_resnet20_cifar.ce_full_cifar10', pretrained=True).eval()
    dropped = twin.plain_report.teacher_keys_dropped
    assert dropped and all(k.startswith(tuple(twin.plain_report.removed_modules)) for k in dropped)
    state = teacher.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in twin.state_dict().items())
    fading = timm.create_model('plain_resnet20_cifar.ce_full_cifar10', pretrained=True, shortcut_fade=True).eval()
    assert is_fading(fading)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fading(x), teacher(x))


def test_teacher_tag_loads_offline_from_the_hub_cache_and_equals_the_teacher(tmp_path):
    torch.manual_seed(0)
    teacher = timm.create_model(TEACHER)
    for m in teacher.modules():  # trained-looking BN statistics, so equality means something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    cache = _hub_cache(tmp_path, TEACHER, teacher.state_dict())
    file = tmp_path / 'teacher.safetensors'
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(file))
    out = _run(f"""
import json, torch, timm, jointrd_timm
teacher = timm.create_model('{TEACHER}', pretrained=True).eval()
x = torch.randn(2, 3, 64, 64)
fading = timm.create_model('plain_{TEACHER}', pretrained=True, shortcut_fade=True).eval()
twin = timm.create_model('plain_{TEACHER}', pretrained=True).eval()
state = teacher.state_dict()
ten = timm.create_model('plain_{TEACHER}', pretrained=True, num_classes=10)
overlay = timm.create_model('plain_test_resnet', pretrained=True, shortcut_fade=True,
                            pretrained_cfg_overlay=dict(file='{file}')).eval()
print(json.dumps(dict(
    fading_equal=torch.equal(fading(x), teacher(x)), overlay_equal=torch.equal(overlay(x), teacher(x)),
    twin_from_teacher=all(torch.equal(v, state[k]) for k, v in twin.state_dict().items()),
    dropped=twin.plain_report.teacher_keys_dropped, removed=twin.plain_report.removed_modules,
    ten_classes=list(ten.get_classifier().weight.shape),
    ten_body=all(torch.equal(v, state[k]) for k, v in ten.state_dict().items() if not k.startswith('fc.')))))
""", HF_HUB_CACHE=str(cache))
    res = json.loads(out.strip().splitlines()[-1])
    assert res['fading_equal'] and res['overlay_equal'] and res['twin_from_teacher'] and res['ten_body']
    assert res['dropped'] and all(k.startswith(tuple(res['removed'])) for k in res['dropped'])
    assert res['ten_classes'] == [10, teacher.get_classifier().in_features]


def test_missing_teacher_weights_name_the_teacher_file(tmp_path):
    cache = _hub_cache(tmp_path, TEACHER)  # the repo is known, its weights file is not there
    out = _run(f"""
import timm, jointrd_timm
try:
    timm.create_model('plain_{TEACHER}', pretrained=True)
except Exception as e:
    print(type(e).__name__)
    print('NOTES', *getattr(e, '__notes__', []))
""", HF_HUB_CACHE=str(cache))
    error, notes = out.strip().splitlines()[-2:]
    teacher_error = _run(f"""
import timm
try:
    timm.create_model('{TEACHER}', pretrained=True)
except Exception as e:
    print(type(e).__name__)
""", HF_HUB_CACHE=str(cache)).strip().splitlines()[-1]
    assert error == teacher_error  # timm's usual error, unchanged
    assert notes == (f'NOTES jointrd_timm: plain_{TEACHER} loads the weights of its teacher {TEACHER}, wanted from '
                     f'Hub timm/{TEACHER}.')


def test_plain_twin_weights_load_into_the_twin_and_a_fading_twin_says_it_needs_the_teachers(tmp_path):
    """A twin's own saved weights load through timm's file overlay; a fading twin, which starts as the teacher,
    cannot start from them, and the error says why and what to do (timm's missing-keys error kept)."""
    torch.manual_seed(0)
    twin = timm.create_model('plain_test_resnet').eval()
    file = tmp_path / 'twin.safetensors'
    save_file({k: v.contiguous() for k, v in twin.state_dict().items()}, str(file))
    again = timm.create_model('plain_test_resnet', pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in again.state_dict().items())
    with pytest.raises(RuntimeError, match='Missing key') as refused:
        timm.create_model('plain_test_resnet', pretrained=True, shortcut_fade=True,
                          pretrained_cfg_overlay=dict(file=str(file)))
    assert any('needs the teacher\'s shortcut projections' in n and 'without shortcut_fade' in n
               for n in getattr(refused.value, '__notes__', []))
    teacher = timm.create_model('test_resnet').state_dict()  # a teacher file missing a conv: no such note
    del teacher['layer1.0.conv1.weight']
    save_file({k: v.contiguous() for k, v in teacher.items()}, str(file))
    with pytest.raises(RuntimeError, match='Missing key') as refused:
        timm.create_model('plain_test_resnet', pretrained=True, shortcut_fade=True,
                          pretrained_cfg_overlay=dict(file=str(file)))
    assert not any('shortcut projections' in n for n in getattr(refused.value, '__notes__', []))
