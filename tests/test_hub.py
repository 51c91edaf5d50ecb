"""Sharing: timm's Hub format, loading through hf-hub: (offline cache), local-dir:, registry tags; model cards;
pickles refused; clear errors for missing/truncated/mismatched weights; push against a stubbed client."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import jointrd_timm  # noqa: F401
from conftest import ROOT
from jointrd_timm.integrations.hub import load_model, model_card, push_model, save_trained_model
from jointrd_timm.training.checkpoint import CheckpointError

ENTRY = dict(name='plain_resnet20_cifar.jointrd_test', architecture='plain_resnet20_cifar', tag='jointrd_test',
             teacher='resnet20_cifar', method='JointRD (Li et al., NeurIPS 2020)', dataset='CIFAR-10 test fixture',
             training=dict(command='pytest', budget='none'), metrics=dict(top1_test=12.34), num_classes=10,
             hf_hub_id='jointrd-timm/plain_resnet20_cifar.jointrd_test', license='apache-2.0',
             weights='weights/plain_resnet20_cifar.jointrd_test')


def _twin(tmp_path, dirac=False):
    torch.manual_seed(0)
    model = timm.create_model('plain_resnet20_cifar', num_classes=10, dirac=dirac).eval()
    folder = save_trained_model(model, tmp_path / 'hub', metrics=dict(top1_test=1.0), model_card=model_card(ENTRY))
    return model, folder


def _run(code: str, **env):
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONWARNINGS='ignore', **env))
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_saved_folder_is_timm_hub_format_without_pickle(tmp_path):
    model, folder = _twin(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'metrics.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'plain_resnet20_cifar' and config['num_classes'] == 10
    saved = load_file(str(folder / 'model.safetensors'))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_saved_config_carries_the_published_tag_and_timm_loads_it(tmp_path):
    """The tag written under pretrained_cfg is the one the weights are published under, not the tag of whatever
    config the model was built with; timm reads the folder back with that tag and the same weights."""
    model = timm.create_model('plain_resnet20_cifar', num_classes=10).eval()
    folder = save_trained_model(model, tmp_path / 'hub', tag='jointrd_test')
    config = json.loads((folder / 'config.json').read_text())
    assert config['pretrained_cfg']['tag'] == 'jointrd_test'
    assert config['architecture'] == 'plain_resnet20_cifar' and config['num_classes'] == 10
    loaded = load_model(str(folder)).eval()
    assert loaded.pretrained_cfg['tag'] == 'jointrd_test'
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    untagged = save_trained_model(model, tmp_path / 'plain')  # without tag: the model's own config, untouched
    assert json.loads((untagged / 'config.json').read_text())['pretrained_cfg'].get('tag') == \
        model.pretrained_cfg.get('tag')


@pytest.mark.parametrize('dirac_init', [None, (0.0, 1.0)])
def test_dirac_twin_is_saved_folded(tmp_path, dirac_init):
    """Saved folded, whatever the parametrisation's start: the config builds the plain twin (no dirac_init left to
    refuse without dirac)."""
    torch.manual_seed(0)
    extra = {} if dirac_init is None else dict(dirac_init=dirac_init)
    model = timm.create_model('plain_resnet20_cifar', num_classes=10, dirac=True, **extra).eval()
    folder = save_trained_model(model, tmp_path / 'hub')
    assert json.loads((folder / 'config.json').read_text())['model_args'].keys().isdisjoint({'dirac_init'})
    loaded = load_model(str(folder)).eval()
    assert not any('parametrizations' in k for k in loaded.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_local_dir_loads_bit_exact(tmp_path):
    model, folder = _twin(tmp_path)
    for spec in (str(folder), f'local-dir:{folder}'):
        loaded = load_model(spec)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_hf_hub_offline_cache_loads_bit_exact(tmp_path):
    model, folder = _twin(tmp_path)
    snapshot = tmp_path / 'cache' / 'models--jointrd-timm--plain_resnet20_cifar.test' / 'snapshots' / ('a' * 40)
    snapshot.mkdir(parents=True)
    for name in ('config.json', 'model.safetensors'):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    (snapshot.parents[1] / 'refs').mkdir()
    (snapshot.parents[1] / 'refs' / 'main').write_text('a' * 40)
    torch.save(model.state_dict(), tmp_path / 'expected.pt')
    out = _run(f"""
import torch, timm, jointrd_timm
m = timm.create_model('hf-hub:jointrd-timm/plain_resnet20_cifar.test', pretrained=True)
expected = torch.load('{tmp_path / 'expected.pt'}')
print(all(torch.equal(v, expected[k]) for k, v in m.state_dict().items()), type(m.layer1[0]).__name__)
""", HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'cache'))
    assert out.split() == ['True', 'PlainBasicBlock']


def test_registry_tag_lists_and_loads(tmp_path):
    model, folder = _twin(tmp_path)
    registry = tmp_path / 'registry'
    (registry / 'weights').mkdir(parents=True)
    folder.rename(registry / 'weights' / 'plain_resnet20_cifar.jointrd_test')
    (registry / 'entry.json').write_text(json.dumps(ENTRY))
    torch.save(model.state_dict(), tmp_path / 'expected.pt')
    out = _run(f"""
import torch, timm, jointrd_timm
print('plain_resnet20_cifar.jointrd_test' in timm.list_pretrained('plain_*'))
m = timm.create_model('plain_resnet20_cifar.jointrd_test', pretrained=True)
expected = torch.load('{tmp_path / 'expected.pt'}')
print(all(torch.equal(v, expected[k]) for k, v in m.state_dict().items()))
""", JOINTRD_REGISTRY=str(registry))
    assert out.split() == ['True', 'True']


def test_an_entry_of_a_timm_architecture_becomes_its_last_tag_and_its_twins(tmp_path):
    """A teacher published beside its twin is an entry of timm's own resnet18: ``resnet18.<tag>`` lists and loads
    its weights, read as they were trained (32 px), beside timm's own tags (``pretrained=True`` without a tag keeps
    timm's default), and ``plain_resnet18.<tag>`` is the twin published beside it; an entry of an architecture
    registered after import loads once it is asked for."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=10).eval()
    registry = tmp_path / 'registry'
    save_trained_model(model, registry / 'weights' / 'resnet18.ce_test', data_cfg=dict(
        input_size=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.2435, 0.2616), crop_pct=1.0))
    entry = dict(ENTRY, architecture='resnet18', tag='ce_test', name='resnet18.ce_test', teacher=None,
                 weights='weights/resnet18.ce_test')
    (registry / 'entry.json').write_text(json.dumps(entry))
    # its twin published under the same tag: the twin's own weights, not a twin started from the teacher's
    torch.manual_seed(1)
    twin_model = timm.create_model('plain_resnet18', num_classes=10).eval()
    save_trained_model(twin_model, registry / 'weights' / 'plain_resnet18.ce_test')
    (registry / 'twin.json').write_text(json.dumps(dict(
        entry, architecture='plain_resnet18', name='plain_resnet18.ce_test', weights='weights/plain_resnet18.ce_test')))
    # an architecture registered after import (a user's own entrypoint): load_model adds its entry when asked for it
    (registry / 'late.json').write_text(json.dumps(dict(entry, architecture='late_net', name='late_net.ce_test')))
    torch.save(model.state_dict(), tmp_path / 'expected.pt')
    torch.save(twin_model.state_dict(), tmp_path / 'twin.pt')
    out = _run(f"""
import torch, timm, jointrd_timm
from timm.models import register_model
from timm.models.resnet import resnet18
from jointrd_timm.integrations.hub import load_model

@register_model
def late_net(pretrained=False, **kwargs):
    return resnet18(pretrained=pretrained, **kwargs)

late = load_model('late_net.ce_test')
expected = torch.load('{tmp_path / 'expected.pt'}')
expected_twin = torch.load('{tmp_path / 'twin.pt'}')
print(all(torch.equal(v, expected[k]) for k, v in late.state_dict().items()))
print('resnet18.ce_test' in timm.list_pretrained('resnet18.*'), timm.models.get_pretrained_cfg('resnet18').tag)
m = timm.create_model('resnet18.ce_test', pretrained=True)
expected = torch.load('{tmp_path / 'expected.pt'}')
print(all(torch.equal(v, expected[k]) for k, v in m.state_dict().items()), m.num_classes)
print(timm.data.resolve_data_config({{}}, model=m)['input_size'])
twin = timm.create_model('plain_resnet18.ce_test', pretrained=True)
print(torch.equal(twin.conv1.weight, expected_twin['conv1.weight']),
      torch.equal(twin.fc.bias, expected_twin['fc.bias']))
""", JOINTRD_REGISTRY=str(registry))
    default_tag = timm.models.get_pretrained_cfg('resnet18').tag  # this process: the shipped registry, no resnet18
    assert out.split('\n')[:5] == ['True', f'True {default_tag}', 'True 10', '(3, 32, 32)', 'True True']


def test_a_registry_tag_is_read_as_its_weights_were_trained_and_a_broken_entry_is_named(tmp_path):
    """An entry of an ImageNet architecture's twin trained on 32 px images: its tag takes the data config saved with
    its weights (size, mean / std, crop), not the teacher's 224 px ImageNet defaults; a malformed entry is named."""
    torch.manual_seed(0)
    model = timm.create_model('plain_resnet18', num_classes=10).eval()
    registry = tmp_path / 'registry'
    data_cfg = dict(input_size=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.2435, 0.2616), crop_pct=1.0)
    save_trained_model(model, registry / 'weights' / 'plain_resnet18.cifar_test', data_cfg=data_cfg)
    entry = dict(ENTRY, architecture='plain_resnet18', tag='cifar_test', name='plain_resnet18.cifar_test',
                 weights='weights/plain_resnet18.cifar_test')
    (registry / 'entry.json').write_text(json.dumps(entry))
    out = _run("""
import timm, jointrd_timm
m = timm.create_model('plain_resnet18.cifar_test', pretrained=True)
cfg = timm.data.resolve_data_config({}, model=m, use_test_size=True)
print(cfg['input_size'], cfg['mean'], cfg['crop_pct'], m.num_classes)
""", JOINTRD_REGISTRY=str(registry))
    assert out.strip() == '(3, 32, 32) (0.4914, 0.4822, 0.4465) 1.0 10'
    (registry / 'broken.json').write_text('{"name": ')
    result = subprocess.run([sys.executable, '-c', 'import jointrd_timm'], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONWARNINGS='ignore', JOINTRD_REGISTRY=str(registry)))
    assert result.returncode != 0 and f'Registry entry {registry / "broken.json"} is not valid JSON' in result.stderr


def test_a_card_names_the_data_its_entry_was_measured_on_and_never_defaults_to_cifar10():
    card = model_card(dict(ENTRY, eval=dict(dataset='imagenet-1k', split='validation')))
    assert 'datasets: [imagenet-1k]' in card and '--dataset imagenet-1k' in card and 'cifar10' not in card
    assert '--split validation' in card  # timm's validate.py, on the same split
    bare = model_card(ENTRY)  # no data named at all: no front-matter datasets, a placeholder in the command
    assert 'datasets:' not in bare and 'cifar10' not in bare and '--dataset PATH_TO_TEST_DATA' in bare
    assert 'validate.py' not in bare
    assert 'datasets: [uoft-cs/cifar10]' in model_card(dict(ENTRY, hf_dataset='uoft-cs/cifar10'))


def test_model_card_names_method_data_results():
    card = model_card(ENTRY)
    assert 'library_name: timm' in card and 'JointRD (Li et al., NeurIPS 2020)' in card
    assert 'CIFAR-10 test fixture' in card and '| top1_test | 12.34 |' in card
    assert "timm.create_model('hf-hub:jointrd-timm/plain_resnet20_cifar.jointrd_test'" in card
    # the eval options belong to the command: one code span a user copies whole
    card = model_card(dict(ENTRY, hf_dataset='/data/pets', eval_args='--image-column image --input-size 64'))
    assert 'Evaluate: `jointrd eval hf-hub:jointrd-timm/plain_resnet20_cifar.jointrd_test --dataset /data/pets ' \
           '--image-column image --input-size 64`.' in card


def test_num_classes_change_drops_classifier(tmp_path):
    model, folder = _twin(tmp_path)
    loaded = load_model(str(folder), num_classes=5)
    assert loaded.fc.out_features == 5
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)


def test_pickles_missing_truncated_and_mismatched_weights(tmp_path):
    _, folder = _twin(tmp_path)
    weights = folder / 'model.safetensors'
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_model(str(folder))
    weights.unlink()
    (folder / 'pytorch_model.bin').write_bytes(b'pickle')
    with pytest.raises(FileNotFoundError, match='pickle files, which jointrd_timm refuses'):
        load_model(str(folder))
    with pytest.raises(FileNotFoundError, match='no config.json'):
        load_model(str(tmp_path))
    other = save_trained_model(timm.create_model('plain_resnet32_cifar', num_classes=10), tmp_path / 'other')
    config = json.loads((other / 'config.json').read_text())
    config['architecture'] = 'plain_resnet20_cifar'
    (other / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ValueError, match='do not fit the architecture'):
        load_model(str(other))


def test_push_uploads_safetensors_and_card_only(tmp_path, monkeypatch):
    import huggingface_hub
    calls = {}

    class RepoUrl:
        repo_id = 'me/plain_resnet20_cifar.jointrd_test'

    def create_repo(self, repo_id, private=False, exist_ok=False, **kw):
        calls['create'] = dict(repo_id=repo_id, private=private)
        return RepoUrl()

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None, **kw):
        calls['upload'] = dict(repo_id=repo_id, revision=revision, files=sorted(p.name for p in Path(folder_path).iterdir()),
                               card=(Path(folder_path) / 'README.md').read_text())
        return 'commit-url'

    def create_branch(self, repo_id, branch, exist_ok=False, **kw):
        calls['branch'] = branch

    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_branch', create_branch)
    model = timm.create_model('plain_resnet20_cifar', num_classes=10)
    assert push_model(model, 'me/plain_resnet20_cifar.jointrd_test', model_card(ENTRY), private=True,
                      revision='v1', token='hf_test') == 'commit-url'
    assert calls['create'] == dict(repo_id='me/plain_resnet20_cifar.jointrd_test', private=True)
    assert calls['branch'] == 'v1' and calls['upload']['revision'] == 'v1'
    assert calls['upload']['files'] == ['README.md', 'config.json', 'model.safetensors']
    assert 'JointRD' in calls['upload']['card']
    # a card written for a local folder (jointrd distill's) is uploaded as the Hub copy's: loaded from the repo, no
    # local path as the front matter's dataset (its commands keep the data it was measured on)
    local = model_card(dict(ENTRY, hf_hub_id=None, local_dir='/home/me/runs/my twin/model', hf_dataset='/data/pets',
                            teacher='local-dir:/data/teachers/r20',
                            training=dict(command='jointrd distill local-dir:/data/teachers/r20 --data /data/pets')))
    assert "local-dir:/home/me/runs/my twin/model'" in local and 'datasets: [/data/pets]' in local
    push_model(model, 'plain_resnet20_cifar.jointrd_test', local)  # NAME alone: create_repo gives the full id
    card = calls['upload']['card']
    assert 'local-dir:/home' not in card and 'twin/model' not in card and 'datasets:' not in card
    assert '--dataset /data/pets' in card
    assert card.count('hf-hub:me/plain_resnet20_cifar.jointrd_test') == 3  # Use, Evaluate, validate.py
    assert card.count('local-dir:/data/teachers/r20') == 2  # the teacher keeps its own source
    push_model(model, 'plain_resnet20_cifar.jointrd_test', local, revision='v2')  # a branch: the card loads it
    assert calls['upload']['card'].count('hf-hub:me/plain_resnet20_cifar.jointrd_test@v2') == 3
    assert card.startswith('---\nlibrary_name: timm\n') and '\n---\n' in card


def test_push_refuses_a_bad_repo_id_before_the_network_and_says_why_the_hub_failed(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled
    from jointrd_timm.errors import InputError, JointRDError
    calls = []

    def offline(self, repo_id, **kw):
        calls.append(repo_id)
        raise OfflineModeIsEnabled('Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.')

    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', offline)
    model = timm.create_model('plain_resnet20_cifar', num_classes=10)
    with pytest.raises(InputError, match="Repo id 'me/a b'"):
        push_model(model, 'me/a b')
    assert calls == []
    with pytest.raises(JointRDError, match=r'Could not push to me/x: OfflineModeIsEnabled: .*offline mode is enabled\. '
                                           r'Check the network \(and that HF_HUB_OFFLINE is not set\)'):
        push_model(model, 'me/x')
    assert calls == ['me/x']


def test_cli_save_with_entry_writes_its_card_and_tag(tmp_path):
    from jointrd_timm.cli import main
    from jointrd_timm.models.catalogue import entries
    published = next(e for e in entries() if e['architecture'] == 'plain_resnet20_cifar')
    model, folder = _twin(tmp_path)
    out = tmp_path / 'out'
    assert main(['save', str(folder), str(out), '--entry', published['name']]) == 0
    assert json.loads((out / 'config.json').read_text())['pretrained_cfg']['tag'] == published['tag']
    assert published['name'] in (out / 'README.md').read_text()
    saved = load_file(str(out / 'model.safetensors'))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_cli_save_refuses_an_entry_of_another_model_and_writes_nothing(tmp_path, capsys):
    """A card describes one model: the entry of depth 56 is not written over a depth-20 twin, nor a 10-class entry
    over a 7-class twin."""
    from jointrd_timm.cli import main
    from jointrd_timm.models.catalogue import entries
    published = next(e for e in entries() if e['architecture'] == 'plain_resnet56_cifar')
    _, folder = _twin(tmp_path)
    out = tmp_path / 'out'
    assert main(['save', str(folder), str(out), '--entry', published['name']]) == 1
    err = capsys.readouterr().err
    assert 'publishes architecture plain_resnet56_cifar' in err and 'plain_resnet20_cifar' in err
    assert not out.exists()
    seven = save_trained_model(timm.create_model('plain_resnet20_cifar', num_classes=7), tmp_path / 'seven')
    same_arch = next(e for e in entries() if e['architecture'] == 'plain_resnet20_cifar')
    assert main(['save', str(seven), str(out), '--entry', same_arch['name']]) == 1
    assert 'number of classes 10' in capsys.readouterr().err and not out.exists()


def test_cli_save_with_an_unknown_entry_names_it_and_the_known_ones_and_writes_nothing(tmp_path, capsys):
    from jointrd_timm.cli import main
    from jointrd_timm.models.catalogue import entries
    _, folder = _twin(tmp_path)
    out = tmp_path / 'out'
    assert main(['save', str(folder), str(out), '--entry', 'plain_resnet20_cifar.nope']) != 0
    err = capsys.readouterr().err
    assert "'plain_resnet20_cifar.nope' is not in the registry" in err
    assert entries()[0]['name'] in err  # the known entries are listed
    assert not out.exists()


def test_save_never_replaces_a_folder_holding_anything_but_a_saved_model(tmp_path, capsys):
    from jointrd_timm.cli import main
    model, folder = _twin(tmp_path)
    precious = tmp_path / 'precious'
    precious.mkdir()
    (precious / 'notes.txt').write_text('important')
    assert main(['save', str(folder), str(precious)]) == 1
    assert 'holds other files (notes.txt): saving replaces the whole folder' in capsys.readouterr().err
    assert [p.name for p in precious.iterdir()] == ['notes.txt']
    run = tmp_path / 'run'  # a runner output folder: the model in model/, the run's records beside it
    shutil.copytree(folder, run / 'model')
    (run / 'metrics.jsonl').write_text('{}\n')
    assert main(['save', str(run), str(run)]) == 1  # onto itself: refused, the run kept
    assert sorted(p.name for p in run.iterdir()) == ['metrics.jsonl', 'model']
    out = tmp_path / 'saved'
    assert main(['save', str(folder), str(out)]) == 0
    assert main(['save', str(folder), str(out / '.')]) == 0  # a saved model is replaced, '.' read as its name
    # the card and metrics saved with the source come along
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'metrics.json', 'model.safetensors']


def test_cli_save_moves_the_cards_commands_to_the_new_folder_and_keeps_a_teachers(tmp_path):
    from jointrd_timm.cli import main
    model, folder = _twin(tmp_path)
    source = f'local-dir:{folder.resolve()}'
    teacher = f'{source}-v0'  # a teacher folder whose path starts with the model's
    card = (f"model = timm.create_model('{{}}', pretrained=True)\n"
            f'Evaluate: `jointrd eval {{}} --dataset data`.\nTeacher: `{teacher}`.\n')
    (folder / 'README.md').write_text(card.format(source, source))
    out = tmp_path / 'saved copy'
    assert main(['save', str(folder), str(out)]) == 0
    new = f'local-dir:{out.resolve()}'
    assert (out / 'README.md').read_text() == card.format(new, new)
