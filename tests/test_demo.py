"""`jointrd demo`'s default recipe end to end, one epoch per run on scikit-learn's embedded digits."""
import json

import pytest
import timm
import torch

from jointrd_timm.training.checkpoint import load_weights
from jointrd_timm.training.demo import run_demo


def test_demo_default_recipe_trains_fading_twins_and_deploys_them_without_shortcuts(tmp_path):
    torch.manual_seed(0)
    summary = run_demo(dataset='sklearn:digits', output_dir=str(tmp_path), epochs=1, device='cpu',
                       arch='resnet20_cifar', limit=256, latency_repeats=5)
    assert summary['recipe'] == 'default'
    assert set(summary['results']) == {'teacher', 'twin alone', 'twin + JointRD'}
    for name in ('summary.json', 'summary.md', 'summary.png'):
        assert (tmp_path / name).stat().st_size > 0
    page = (tmp_path / 'summary.md').read_text()
    assert 'Twin recipe `default`' in page
    # what the twin buys beside its accuracy, and how many test images the accuracy rests on
    n_test = summary['test_images']
    assert n_test == 360 and f'{n_test} test images: one image is {100 / n_test:.2f} points' in page
    memory = summary['activation_memory_mb']
    assert memory['twin'] < memory['teacher']  # the shortcuts' tensors are gone
    assert f'{memory["teacher"] / memory["twin"]:.2f}x less' in page
    teacher_row = next(line for line in page.splitlines() if line.startswith('| teacher'))
    acc = summary['results']['teacher']['test_acc']
    assert f'| {round(acc * n_test / 100)} of {n_test} |' in teacher_row
    assert f'| {memory["teacher"] * 1024:.1f} |' in teacher_row
    assert json.loads((tmp_path / 'summary.json').read_text())['recipe'] == 'default'
    # the demo is `jointrd distill` of a bare architecture (teacher trained here, twin with JointRD, the deployed
    # twin in Hub format with its card) plus the twin alone
    assert (tmp_path / 'distill.yaml').is_file() and (tmp_path / 'teacher.yaml').is_file()
    comparison = json.loads((tmp_path / 'comparison.json').read_text())
    assert comparison['teacher_origin'].startswith('trained here from scratch (1 epochs')
    assert comparison['activation_memory_mb'] == memory and comparison['recipe'] == 'default'
    assert comparison['test_acc']['twin'] == pytest.approx(summary['results']['twin + JointRD']['test_acc_deployed'])
    assert (tmp_path / 'model' / 'README.md').is_file() and (tmp_path / 'model' / 'model.safetensors').is_file()
    alone = json.loads((tmp_path / 'twin-alone' / 'final.json').read_text())
    assert alone['test_acc_deployed'] == summary['results']['twin alone']['test_acc_deployed']
    for run in ('twin-alone', 'twin'):
        # both twins got the same ingredients: shortcuts faded to 0 during the run, saved without them
        records = (tmp_path / run / 'metrics.jsonl').read_text().splitlines()
        scales = [json.loads(line)['shortcut_scale'] for line in records]
        assert scales[-1] == 0.0, run
        twin = timm.create_model('plain_resnet20_cifar', in_chans=1, num_classes=10)
        load_weights(twin, tmp_path / run / 'model')
        assert not any('downsample' in k or 'shortcut' in k for k in twin.state_dict())
        assert twin(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # the deployed twin's accuracy is what the table reports (test_acc_folded: fade finished)
    for key in ('twin alone', 'twin + JointRD'):
        result = summary['results'][key]
        assert result['test_acc_folded'] == pytest.approx(result['test_acc'], abs=1e-6)


def test_demo_refuses_an_unknown_recipe_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown recipe 'fast'; recipes: .*'default'.*'dirac'.*'reference'"):
        run_demo(dataset='sklearn:digits', output_dir=str(tmp_path / 'demo'), epochs=1, recipe='fast')
    assert not (tmp_path / 'demo' / 'teacher').exists()


def test_demo_refuses_a_folder_holding_files_it_did_not_write_and_keeps_them(tmp_path):
    from jointrd_timm.errors import InputError
    (tmp_path / 'mine' / 'model').mkdir(parents=True)
    (tmp_path / 'mine' / 'model' / 'weights.txt').write_text('keep me')
    with pytest.raises(InputError, match=r'holds files that no demo wrote \(model\).*another --output-dir'):
        run_demo(dataset='sklearn:digits', output_dir=str(tmp_path / 'mine'), epochs=1, limit=16)
    assert (tmp_path / 'mine' / 'model' / 'weights.txt').read_text() == 'keep me'
    assert sorted(p.name for p in (tmp_path / 'mine').iterdir()) == ['model']


def test_a_demo_that_fails_before_training_leaves_no_folder(tmp_path, monkeypatch):
    import jointrd_timm.training.distill as distill

    def fail(*args, **kwargs):
        raise RuntimeError('stopped before the first epoch')
    monkeypatch.setattr(distill, 'train_distill', fail)
    with pytest.raises(RuntimeError, match='stopped before'):
        run_demo(dataset='sklearn:digits', output_dir=str(tmp_path / 'demo'), epochs=1, limit=16)
    assert not (tmp_path / 'demo').exists()


def test_a_folder_an_earlier_demo_wrote_is_accepted(tmp_path):
    from jointrd_timm.errors import InputError
    from jointrd_timm.training.demo import DEMO_MARK, check_demo_folder
    (tmp_path / 'teacher').mkdir()
    with pytest.raises(InputError):
        check_demo_folder(tmp_path)
    (tmp_path / DEMO_MARK).write_text('')
    check_demo_folder(tmp_path)
    (tmp_path / DEMO_MARK).unlink()  # a demo from before the mark: its summary names the twin alone
    (tmp_path / 'summary.json').write_text(json.dumps(dict(results={'twin alone': {}})))
    check_demo_folder(tmp_path)
