"""`jointrd distill` refusals a user hits before training (issue 37): a zero epoch count is an error, never the
default; teacher weights missing from an offline Hub cache are named with the ways to provide them; and a run that
fails before its first saved epoch leaves the output folder as it was, so the same command runs again once the cause
is fixed."""
import shutil

import pytest
import timm
from huggingface_hub import constants

import jointrd_timm  # noqa: F401
from jointrd_timm.cli import main
from jointrd_timm.integrations.hub import save_trained_model
from jointrd_timm.training import runner
from jointrd_timm.training.distill import DistillError, plan_distill, run_distill

TOY = dict(epochs=1, limit=64, latency_repeats=1)
COMMIT = 'c' * 40


@pytest.mark.parametrize('options, message', [
    (dict(epochs=0), '--epochs must be positive, got 0'),
    (dict(epochs=-2), '--epochs must be positive, got -2'),
    (dict(epochs=1, teacher_epochs=0), '--teacher-epochs must be positive, got 0'),
    (dict(epochs=1, batch_size=0), '--batch-size must be positive, got 0'),
    (dict(epochs=1, lr=0.0), '--lr must be positive, got 0.0'),
])
def test_zero_or_negative_counts_are_refused_never_read_as_the_default(tmp_path, options, message):
    with pytest.raises(DistillError, match=f'^{message}; leave it out for its default'):
        plan_distill('resnet20_cifar', 'sklearn:digits', str(tmp_path / 'out'), **options)
    assert not (tmp_path / 'out').exists()


def test_cli_epochs_zero_is_an_error_naming_the_value(tmp_path, capsys):
    assert main(['distill', 'resnet20_cifar', '--data', 'sklearn:digits', '--epochs', '0',
                 '--output', str(tmp_path / 'out')]) == 1
    assert capsys.readouterr().err == ('jointrd distill: error: --epochs must be positive, got 0; leave it out for '
                                       'its default.\n')
    assert not (tmp_path / 'out').exists()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with an empty Hub cache of our own (huggingface_hub reads both at call time)."""
    cache = tmp_path / 'hub-cache'
    cache.mkdir()
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    return cache


def test_offline_teacher_tag_missing_from_the_cache_is_named_with_the_ways_to_provide_it(tmp_path, offline_hub):
    # a timm tag resolves without its weights; they are fetched (and found missing) before anything is written
    with pytest.raises(DistillError) as refused:
        run_distill('regnetx_002.pycls_in1k', 'sklearn:digits', str(tmp_path / 'out'), num_classes=10, **TOY)
    message = str(refused.value)
    assert message.startswith('The weights of teacher regnetx_002.pycls_in1k are not available: looked for '
                              'model.safetensors of the Hub repository timm/regnetx_002.pycls_in1k, and they are not '
                              f'in the Hugging Face cache {offline_hub}, and HF_HUB_OFFLINE is set. Nothing was '
                              'written.')
    assert '`hf download timm/regnetx_002.pycls_in1k model.safetensors`' in message
    assert 'HF_HOME' in message and '`hf download timm/regnetx_002.pycls_in1k --local-dir DIR`' in message
    assert '`jointrd distill DIR --data ...`' in message and 'a run of ours' in message
    assert not (tmp_path / 'out').exists()


def test_teacher_missing_offline_then_provided_the_same_command_runs_in_the_same_folder(tmp_path, offline_hub,
                                                                                        capsys):
    # an hf-hub: teacher whose config.json is cached but not its weights
    folder = save_trained_model(timm.create_model('resnet20_cifar', num_classes=10, in_chans=1), tmp_path / 'teacher')
    repo = offline_hub / 'models--jointrd-test--teacher'
    snapshot = repo / 'snapshots' / COMMIT
    snapshot.mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(COMMIT)
    shutil.copy(folder / 'config.json', snapshot)
    out = tmp_path / 'out'
    assert main(['distill', 'hf-hub:jointrd-test/teacher', '--data', 'sklearn:digits', '--epochs', '1', '--limit', '64',
                 '--latency-repeats', '1', '--output', str(out), '--device', 'cpu']) == 1
    err = capsys.readouterr().err
    assert err.startswith('jointrd distill: error: The weights of teacher hf-hub:jointrd-test/teacher are not '
                          'available: looked for config.json model.safetensors of the Hub repository '
                          'jointrd-test/teacher, and they are not in the Hugging Face cache')
    assert 'LocalEntryNotFoundError' not in err and err.count('\n') == 1
    assert not out.exists()

    shutil.copy(folder / 'model.safetensors', snapshot)  # the cause fixed: the same command now runs
    assert main(['distill', 'hf-hub:jointrd-test/teacher', '--data', 'sklearn:digits', '--epochs', '1', '--limit', '64',
                 '--latency-repeats', '1', '--output', str(out), '--device', 'cpu']) == 0
    assert (out / 'model' / 'model.safetensors').is_file() and (out / 'distill.yaml').is_file()


def test_an_hf_hub_teacher_at_a_revision_resolves_as_timm_reads_it(tmp_path, offline_hub):
    """``hf-hub:org/name@rev`` (and timm's ``hf_hub:`` spelling) reads that revision's config.json and weights, as
    timm and `jointrd eval` do; a revision the cache lacks is named with the command that fetches it."""
    import torch
    from jointrd_timm.training.teachers import load_teacher, resolve_teacher
    model = timm.create_model('resnet20_cifar', num_classes=7, in_chans=1)
    folder = save_trained_model(model, tmp_path / 'teacher')
    repo = offline_hub / 'models--jointrd-test--teacher'
    snapshot = repo / 'snapshots' / COMMIT
    snapshot.mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'v1').write_text(COMMIT)  # only the revision v1: no main
    for name in ('config.json', 'model.safetensors'):
        shutil.copy(folder / name, snapshot)
    for spec in ('hf-hub:jointrd-test/teacher@v1', 'HF_HUB:jointrd-test/teacher@v1'):
        teacher = resolve_teacher(spec)
        assert (teacher.arch, teacher.num_classes, teacher.in_chans) == ('resnet20_cifar', 7, 1)
        loaded = load_teacher(teacher)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(DistillError) as refused:
        resolve_teacher('hf-hub:jointrd-test/teacher@v2')
    assert 'of the Hub repository jointrd-test/teacher at revision v2' in str(refused.value)
    assert '`hf download jointrd-test/teacher config.json model.safetensors --revision v2`' in str(refused.value)


def test_a_run_failing_before_its_first_saved_epoch_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    folder = save_trained_model(timm.create_model('resnet20_cifar', num_classes=10, in_chans=1), tmp_path / 'teacher')
    real_train = runner.train

    def out_of_memory(config, **kwargs):
        raise RuntimeError('CUDA out of memory (before the first step)')

    monkeypatch.setattr(runner, 'train', out_of_memory)
    out = tmp_path / 'out'
    with pytest.raises(RuntimeError, match='out of memory'):
        run_distill(str(folder), 'sklearn:digits', str(out), device='cpu', **TOY)
    assert not out.exists()
    out.mkdir()
    (out / 'notes.txt').write_text('mine')  # --overwrite into a folder with the user's files: they stay
    with pytest.raises(RuntimeError, match='out of memory'):
        run_distill(str(folder), 'sklearn:digits', str(out), device='cpu', overwrite=True, **TOY)
    assert sorted(p.name for p in out.iterdir()) == ['notes.txt']

    monkeypatch.setattr(runner, 'train', real_train)
    run_distill(str(folder), 'sklearn:digits', str(out), device='cpu', overwrite=True, **TOY)
    assert (out / 'model' / 'config.json').is_file()


@pytest.mark.slow  # the resume itself is covered in the default run by tests/test_distill.py
def test_a_run_failing_after_a_saved_epoch_is_kept_for_resume(tmp_path, monkeypatch):
    real_train = runner.train

    def twin_fails(config, **kwargs):
        if config['runner']['output_dir'].endswith('twin'):
            raise RuntimeError('killed before the twin saved an epoch')
        return real_train(config, **kwargs)

    monkeypatch.setattr(runner, 'train', twin_fails)
    out = tmp_path / 'out'
    with pytest.raises(RuntimeError, match='killed'):
        run_distill('resnet20_cifar', 'sklearn:digits', str(out), device='cpu', **TOY)  # the teacher trains first
    assert (out / 'teacher' / 'final.json').is_file() and (out / 'distill.yaml').is_file()
    monkeypatch.setattr(runner, 'train', real_train)
    run_distill('resnet20_cifar', 'sklearn:digits', str(out), device='cpu', resume=True, **TOY)
    assert (out / 'model' / 'config.json').is_file()


def test_a_run_stopped_while_its_teacher_trains_resumes_from_the_teachers_checkpoint(tmp_path, monkeypatch, capsys):
    from jointrd_timm import faults
    out = tmp_path / 'out'
    options = dict(epochs=2, limit=64, batch_size=32, latency_repeats=1)
    monkeypatch.setenv(faults.ENV, 'step:3:enospc')  # the teacher's 3rd step: its first epoch (2 steps) is saved
    monkeypatch.setattr(faults, '_arrivals', {})
    with pytest.raises(OSError, match='No space left on device'):
        run_distill('resnet20_cifar', 'sklearn:digits', str(out), device='cpu', **options)
    assert (out / 'teacher' / 'last.safetensors').is_file() and not (out / 'distill.yaml').exists()
    monkeypatch.delenv(faults.ENV)
    run_distill('resnet20_cifar', 'sklearn:digits', str(out), device='cpu', resume=True, **options)
    assert 'Resumed from' in capsys.readouterr().out
    assert (out / 'model' / 'config.json').is_file()
    assert len((out / 'teacher' / 'metrics.jsonl').read_text().splitlines()) == 2  # each teacher epoch once


@pytest.mark.parametrize('command', [['eval', 'hf-hub:jointrd-test/absent', '--dataset', 'sklearn:digits'],
                                     ['save', 'regnetx_002.pycls_in1k', 'OUT'],
                                     ['export', 'hf-hub:jointrd-test/absent', '--output-dir', 'OUT']])
def test_offline_model_of_eval_save_export_is_named_with_the_ways_to_provide_it(tmp_path, offline_hub, capsys,
                                                                                command):
    """Before: huggingface_hub's generic 'cannot find the requested files in the local cache' (distill alone said
    which repository and files, and how to provide them)."""
    from jointrd_timm.cli import main
    command = [str(tmp_path / 'out') if part == 'OUT' else part for part in command]
    assert main(command) == 1
    err = capsys.readouterr().err
    spec = command[1]
    repo = 'jointrd-test/absent' if spec.startswith('hf-hub:') else 'timm/regnetx_002.pycls_in1k'
    assert f'error: The weights of model {spec} are not available: looked for ' in err
    assert f'of the Hub repository {repo}, and they are not in the Hugging Face cache {offline_hub}' in err
    assert f'`hf download {repo} --local-dir DIR` and give that Hub-format folder' in err
    assert f'in place of {spec} (the same command with DIR)' in err and 'TEACHER' not in err
    assert not (tmp_path / 'out').exists()
