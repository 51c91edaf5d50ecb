"""The accelerate runner: one epoch, resume after a kill, 2-process DDP == 1 process, config errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_yaml, torchrun
from jointrd_timm.cli import main
from jointrd_timm.training.runner import ConfigError, load_config, train

ENV = dict(os.environ, PYTHONWARNINGS='ignore', TQDM_DISABLE='1', OMP_NUM_THREADS='1')


def weights(folder: Path):
    return load_file(str(folder / 'model' / 'model.safetensors'))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_train_one_epoch_writes_metrics_checkpoint_and_hub_folder(tmp_path):
    config = tiny_yaml(tmp_path, epochs=1)
    assert main(['train', '--config', str(config), '--device', 'cpu']) == 0
    out = tmp_path / 'out'
    lines = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert len(lines) == 1 and {'train_loss', 'train_acc', 'val_acc', 'lr', 'eta'} <= set(lines[0])
    assert 0.0 < lines[0]['eta'] <= 1.0
    final = json.loads((out / 'final.json').read_text())
    assert 0 <= final['test_acc_deployed'] <= 100 and final['test_acc_as_trained'] == final['test_acc']
    assert final['test_acc_deployed'] == final.get('test_acc_folded', final['test_acc'])  # the deprecated keys agree
    cfg = json.loads((out / 'model' / 'config.json').read_text())
    assert cfg['architecture'] == 'plain_resnet20_cifar'  # JointRD deploys the twin, not the pair
    # how the test images were read (digits: 8 px in grey, 0.5 / 0.5), not the architecture's CIFAR defaults
    assert {k: cfg['pretrained_cfg'][k] for k in ('input_size', 'crop_pct', 'mean', 'std')} == dict(
        input_size=[1, 8, 8], crop_pct=1.0, mean=[0.5], std=[0.5])
    assert not any(k.startswith('teacher.') for k in weights(out))
    assert (out / 'last.safetensors').is_file()
    # its model card: what trained it on what, the accuracy measured, how to load it; jointrd save carries it along
    card = (out / 'model' / 'README.md').read_text()
    assert '# plain_resnet20_cifar' in card and '- **Teacher**: `resnet20_cifar`' in card
    assert '- **Method**: `JointRD` (jointrd_timm.methods)' in card and '- **Training**: 1 epoch, batch 16' in card
    assert "- **Data**: `sklearn:digits` (train: split `train`, limit 64) and `sklearn:digits` (test: split `test`, " \
           "limit 32)" in card
    assert f"| top1_test | {round(final['test_acc_deployed'], 2)} |" in card
    assert f"timm.create_model('local-dir:{(out / 'model').resolve()}', pretrained=True)" in card
    assert main(['save', str(out), str(tmp_path / 'saved')]) == 0
    assert f"local-dir:{(tmp_path / 'saved').resolve()}'" in (tmp_path / 'saved' / 'README.md').read_text()


def test_overrides_and_ce_method(tmp_path):
    config = load_config(tiny_yaml(tmp_path, method='ce'), ['train.num_epochs=1', 'runner.seed=3'])
    assert config['train']['num_epochs'] == 1 and config['runner']['seed'] == 3
    final = train(config, device='cpu')
    assert final['epochs'] == 1
    card = (tmp_path / 'out' / 'model' / 'README.md').read_text()  # a model trained alone: no teacher named
    assert "- **Method**: the torchdistill YAML's criterion\n" in card and 'Teacher' not in card


def test_a_model_that_learned_nothing_is_warned_about_in_the_log_final_json_and_its_card(tmp_path, caplog):
    from jointrd_timm.io import near_chance
    # learning rate 0: the model stays at its random initialisation, near chance on the 10 digits
    config = load_config(tiny_yaml(tmp_path, method='ce', epochs=1), ['train.optimizer.kwargs.lr=0.0'])
    with caplog.at_level('WARNING', logger='jointrd_timm.training.runner'):
        final = train(config, device='cpu')
    accuracy = final['test_acc_deployed']
    assert near_chance(accuracy, 10)
    warning = (f'the deployed model is at {accuracy:.2f} % on the test split, near chance (10.00 % for 10 classes): '
               'it has learned (almost) nothing.')
    assert len(final['warnings']) == 1 and final['warnings'][0].startswith(warning)
    assert warning in caplog.text
    assert json.loads((tmp_path / 'out' / 'final.json').read_text())['warnings'] == final['warnings']
    assert f'**Warning:** {warning}' in (tmp_path / 'out' / 'model' / 'README.md').read_text()


def test_a_weight_average_near_chance_is_told_apart_from_a_model_that_learned_nothing():
    from jointrd_timm.training.runner import _chance_warning
    lagging = _chance_warning(12.0, 10, without_ema=80.0)
    assert lagging.startswith('the deployed weight average is at 12.00 %') and 'trained model is at 80.00 %' in lagging
    assert 'runner.ema_decay' in lagging
    assert _chance_warning(12.0, 10, without_ema=11.0).startswith('the deployed model is at 12.00 %')
    assert _chance_warning(50.0, 10) is None and _chance_warning(5.0, None) is None


def test_near_chance_scales_with_the_class_count():
    from jointrd_timm.io import near_chance
    assert near_chance(18.9, 10) and not near_chance(19.1, 10)  # 10 % + 0.1 x 90 %
    assert near_chance(54.0, 2) and not near_chance(56.0, 2)  # 50 % + 0.1 x 50 %
    # 1000 classes: below twice chance (0.2 %) as well; 10 % is a hundred times chance, a model that learned
    assert near_chance(0.15, 1000) and not near_chance(0.25, 1000) and not near_chance(10.0, 1000)
    assert near_chance(5.9, 20) and not near_chance(10.1, 20)  # 20 classes: 5 % + 0.1 x 95 % = 14.5 %, but 2 x 5 %
    assert not near_chance(0.0, None) and not near_chance(0.0, 1)  # no class count, or one class: nothing to say


def _run(args, **kwargs):
    return subprocess.Popen([sys.executable, '-m', 'jointrd_timm.cli', 'train', *args], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)


# ~35 s; the default run keeps resume bit-identity through test_reliability's kill mid checkpoint write
@pytest.mark.slow
def test_kill_during_epoch_two_then_resume_equals_uninterrupted(tmp_path):
    config = tiny_yaml(tmp_path, epochs=3, limit=384, batch_size=16)
    full, killed = tmp_path / 'full', tmp_path / 'killed'
    proc = _run(['--config', str(config), '--device', 'cpu', '--output-dir', str(full)])
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    proc = _run(['--config', str(config), '--device', 'cpu', '--output-dir', str(killed)])
    metrics = killed / 'metrics.jsonl'
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count('\n') >= 1) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # into epoch 2 (an epoch takes 0.5 s on a fast machine, several seconds on a busy one)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = metrics.read_text().count('\n')
    # interrupted mid-run: in epoch 2, or in epoch 3 where the machine is fast; the resume must match either way
    assert done in (1, 2) and not (killed / 'final.json').exists(), f'the kill landed after {done} epochs'
    assert not list(killed.glob('.*tmp*')), 'no half-written checkpoint may be left'
    proc = _run(['--config', str(config), '--device', 'cpu', '--output-dir', str(killed), '--resume'])
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    assert max_diff(weights(full), weights(killed)) < 1e-5
    full_lines = [json.loads(x) for x in (full / 'metrics.jsonl').read_text().splitlines()]
    resumed = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r['epoch'] for r in resumed] == [1, 2, 3]
    assert resumed[-1]['train_loss'] == pytest.approx(full_lines[-1]['train_loss'], rel=1e-5)


# the block-targets run is slow-marked (run with -m slow): the same DDP path with one more loss term (its
# cross-process mean, blockwise.global_mean, is checked by default in test_adversarial's 2-process script)
@pytest.mark.parametrize('extra', ['', pytest.param(', block_loss_weight: 1.0', marks=pytest.mark.slow)],
                         ids=['jointrd', 'block-targets'])
def test_two_process_cpu_ddp_equals_one_process(tmp_path, extra):
    """Each process holds half of every batch; DDP averages their gradients, which equals the one-process gradient
    only when the loss is a mean over samples (the block targets' relative error: its denominator is the whole
    batch's, methods.jointrd.blockwise.global_mean; with a per-process denominator this run differs by about 1e-2).
    At block weight 5 this tiny pair is not a test of it: its per-block errors and denominators match 1 process to
    1e-7 for three steps, then the difference grows about 30x a step (8e-6, 3e-4, 9e-4), float noise amplified by a
    step that weight makes unstable on random weights, not a different gradient."""
    config = tiny_yaml(tmp_path, epochs=2, limit=128, batch_size=16, norm_layer='groupnorm1', extra_jointrd=extra)
    one, two = tmp_path / 'one', tmp_path / 'two'
    train(load_config(config), output_dir=str(one), device='cpu')  # the one-process run, in this process
    result = torchrun(['-m', 'jointrd_timm.cli', 'train', '--config', str(config), '--device', 'cpu', '--output-dir',
                       str(two)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_diff(weights(one), weights(two)) < 1e-5


@pytest.mark.slow  # the default run checks identical replicas in its other 2-process runs (GroupNorm)
def test_two_process_batchnorm_keeps_identical_replicas(tmp_path):
    """With BatchNorm each process normalises with its own half-batch statistics (SyncBN is CUDA-only), so the
    weights are not those of 1 process; what holds is that both replicas end identical (DDP all-reduces the
    gradients and broadcasts the buffers from process 0)."""
    config = tiny_yaml(tmp_path, method='ce', epochs=1, limit=64, batch_size=16, norm_layer='batchnorm2d')
    result = torchrun(['-m', 'jointrd_timm.cli', 'train', '--config', str(config), '--device', 'cpu', '--output-dir',
                       str(tmp_path / 'two')])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / 'two' / 'final.json').read_text())['replica_max_abs_diff'] == 0.0


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    config = tiny_yaml(tmp_path, epochs=1)
    assert main(['train', '--config', str(config), '--device', 'cpu', '--resume']) == 1
    assert 'no checkpoint at' in capsys.readouterr().err


def test_bad_yaml_keys(tmp_path):
    path = tiny_yaml(tmp_path)
    text = path.read_text()
    bad = tmp_path / 'bad.yaml'
    bad.write_text(text.replace('num_epochs:', 'num_epoch:'))
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) \['num_epoch'\] in .*train"):
        load_config(bad)
    bad.write_text(text + '\nrunnr:\n  seed: 1\n')
    with pytest.raises(ConfigError, match=r"\['runnr'\]"):
        load_config(bad)
    bad.write_text(text.replace('eta_min: 0.5', 'eta_mn: 0.5'))
    with pytest.raises(ValueError, match=r"Unknown JointRD setting\(s\) \['eta_mn'\]"):
        train(load_config(bad), device='cpu')
    with pytest.raises(ConfigError, match='not of the form'):
        load_config(path, ['train.num_epochs'])


def test_overridden_keys_are_checked_like_the_yamls_own_and_sections_must_be_mappings(tmp_path):
    path = tiny_yaml(tmp_path)
    for override, message in (('runner.eval_evry=5', r"Unknown key\(s\) \['eval_evry'\] .*runner; allowed"),
                              ('bogus.x=1', r"Unknown key\(s\) \['bogus'\] .*\(top level\)"),
                              ('train.num_epoch=2', r"Unknown key\(s\) \['num_epoch'\] .*train"),
                              ('train.optimizer=[1]', r'train\.optimizer must be a mapping .*got \[1\]'),
                              ('train.stage1=3', r'train\.stage1 must be a mapping .*got 3')):
        with pytest.raises(ConfigError, match=message):
            load_config(path, [override])
    bad = tmp_path / 'bad.yaml'
    sections = dict(datasets='{}', models='{student_model: {key: m}}', train='{num_epochs: 1}', test='{}')
    for section in ('train', 'models', 'test', 'runner', 'datasets'):
        bad.write_text(''.join(f'{k}: {5 if k == section else v}\n' for k, v in dict(sections, runner='{}').items()))
        with pytest.raises(ConfigError, match=rf'{section} must be a mapping .*got 5'):
            load_config(bad)
    assert load_config(path, ['runner.eval_every=2'])['runner']['eval_every'] == 2  # a known key still overrides


def test_missing_dataset_column_is_a_clear_error(tmp_path):
    path = tiny_yaml(tmp_path)
    bad = tmp_path / 'bad.yaml'
    bad.write_text(path.read_text().replace("channels: 1, limit: 64", "channels: 1, limit: 64, image_column: 'image'"))
    with pytest.raises(KeyError, match=r"has no column 'image'; its columns are: img \(Image\), label \(ClassLabel\)"):
        load_config(bad)


def test_teacher_with_other_stages_is_a_clear_error(tmp_path):
    path = tiny_yaml(tmp_path)
    bad = tmp_path / 'bad.yaml'
    bad.write_text(path.read_text().replace("model_name: 'plain_resnet20_cifar'", "model_name: 'plain_resnet18_cifar'"))
    with pytest.raises(ValueError, match='layouts must match'):
        train(load_config(bad), device='cpu')


def test_sync_batchnorm_on_cpu_is_a_clear_error(tmp_path):
    config = load_config(tiny_yaml(tmp_path), ['runner.sync_batchnorm=true'])
    with pytest.raises(ConfigError, match='sync_batchnorm needs CUDA'):
        train(config, device='cpu')


def test_gradient_accumulation_and_bf16_from_the_yaml(tmp_path):
    config = load_config(tiny_yaml(tmp_path, epochs=1, limit=64, batch_size=16),
                         ['train.optimizer.grad_accum_step=2', 'runner.mixed_precision=bf16'])
    final = train(config, device='cpu')
    assert final['epochs'] == 1
    lines = (tmp_path / 'out' / 'metrics.jsonl').read_text().splitlines()
    assert len(lines) == 1


def test_fp16_on_the_cpu_is_warned_about_and_bf16_is_not(caplog):
    from jointrd_timm.training.runner import _make_accelerator
    for precision in ('fp16', 'bf16', 'no'):
        caplog.clear()
        with caplog.at_level('WARNING', logger='jointrd_timm.training.runner'):
            accelerator = _make_accelerator(dict(mixed_precision=precision, find_unused_parameters=False), 'cpu')
        assert accelerator.device.type == 'cpu' and accelerator.mixed_precision == precision
        warned = [r.getMessage() for r in caplog.records if 'on the CPU' in r.getMessage()]
        assert warned == ([f"runner.mixed_precision 'fp16' on the CPU: torch autocasts to float16 there, which most "
                           "CPUs compute no faster than float32 (often slower) and in float16's narrow range. Use "
                           "'bf16' on a CPU with bfloat16 instructions, or 'no'."] if precision == 'fp16' else [])


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    """4 steps of batch 16 accumulated 2 by 2 == 2 steps of batch 32 (BN-free model, no shuffling difference)."""
    small = load_config(tiny_yaml(tmp_path / 'a', method='ce', epochs=1, limit=64, batch_size=16,
                                  norm_layer='groupnorm1'), ['train.optimizer.grad_accum_step=2'])
    large = load_config(tiny_yaml(tmp_path / 'b', method='ce', epochs=1, limit=64, batch_size=32,
                                  norm_layer='groupnorm1'))
    for config in (small, large):
        config['train']['train_data_loader']['sampler']['class_or_func'] = torch.utils.data.SequentialSampler
        config['train']['scheduler'] = {}
    train(small, device='cpu')
    train(large, device='cpu')
    assert max_diff(weights(tmp_path / 'a' / 'out'), weights(tmp_path / 'b' / 'out')) < 1e-5


def test_dirac_twin_is_evaluated_folded_and_saved_plain(tmp_path):
    """A Dirac-parametrised twin trains with alpha/beta; the runner also evaluates it folded into plain convs
    (what is saved and deployed): same accuracy, and the saved weights are those of a plain twin."""
    import timm
    from jointrd_timm.io import load_weights
    config = load_config(tiny_yaml(tmp_path, method='ce', epochs=1, limit=64), ['models.model.kwargs.dirac=true'])
    final = train(config, output_dir=str(tmp_path / 'run'), device='cpu')
    assert final['test_acc_folded'] == final['test_acc']
    assert final['test_acc_deployed'] == final['test_acc_folded'] and final['test_acc_as_trained'] == final['test_acc']
    saved = weights(tmp_path / 'run')
    assert not any('parametrizations' in k or k.endswith(('alpha', 'beta')) for k in saved)
    plain = load_weights(timm.create_model('plain_resnet20_cifar', num_classes=10, in_chans=1), tmp_path / 'run' / 'model')
    assert plain.layer1[0].conv1.weight.shape == saved['layer1.0.conv1.weight'].shape


def test_a_datasets_override_names_what_to_do_instead():
    from jointrd_timm.training.runner import ConfigError, apply_overrides
    with pytest.raises(ConfigError, match=r"datasets.train.init.kwargs.source: datasets are built while the YAML loads"
                                          r".*pass the override to load_config.*YAML datasets.ID.init.kwargs.source"):
        apply_overrides({'datasets': {}}, ['datasets.train.init.kwargs.source=x'])


def test_recalibrate_batchnorm_averages_batches_with_other_modules_in_eval_mode():
    from torch import nn
    from jointrd_timm.training.runner import recalibrate_batchnorm
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.9), nn.BatchNorm1d(3, momentum=0.3)).train()
    batches = [(torch.randn(8, 3) * 2 + 5, None) for _ in range(3)]
    state = torch.random.get_rng_state()
    assert recalibrate_batchnorm(model, batches, batches=2) == 2  # at most the batches asked for
    norm = model[1]
    first_two = torch.stack([b[0] for b in batches[:2]])
    # dropout off (the inputs reach the BN unchanged), plain average of the per-batch statistics
    assert torch.allclose(norm.running_mean, first_two.mean((0, 1)), atol=1e-6)
    assert torch.allclose(norm.running_var, first_two.var(1, unbiased=True).mean(0), atol=1e-5)
    assert norm.momentum == 0.3 and model.training and model[0].training  # restored
    assert torch.equal(torch.random.get_rng_state(), state)  # training's random stream untouched
    assert recalibrate_batchnorm(nn.Sequential(nn.Linear(3, 3)), batches, batches=5) == 0  # nothing to recalibrate


def test_recalibrate_bn_must_be_a_whole_number(tmp_path):
    with pytest.raises(ConfigError, match=r'runner.recalibrate_bn .*whole number >= 0'):
        load_config(tiny_yaml(tmp_path, method='ce'), ['runner.recalibrate_bn=-1'])


def test_channels_last_gives_the_same_loss_and_gradients():
    """to_channels_last (runner.channels_last) on a JointRD pair: weights and inputs in NHWC, the same loss and
    gradients as NCHW up to float rounding (other conv kernels)."""
    import copy
    import timm
    from jointrd_timm.methods import JointRD, JointRDConfig
    from jointrd_timm.training.runner import to_channels_last
    torch.manual_seed(0)
    nchw = JointRD(timm.create_model('plain_resnet20_cifar', num_classes=10), timm.create_model('resnet20_cifar', num_classes=10),
                   JointRDConfig(), num_epochs=1, steps_per_epoch=4).train()
    nhwc = to_channels_last(copy.deepcopy(nchw))
    conv = nhwc.student.layer1[0].conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    seen = []
    conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    losses = [model(x, y)['loss'] for model in (nchw, nhwc)]
    assert seen == [True] and losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
    for loss in losses:
        loss.backward()
    expected = dict(nchw.named_parameters())
    for name, p in nhwc.named_parameters():
        if p.grad is not None:
            scale = expected[name].grad.abs().max().item() + 1e-12
            assert (p.grad - expected[name].grad).abs().max().item() <= 1e-4 * scale, name


def test_channels_last_run_saves_contiguous_weights(tmp_path):
    """A runner.channels_last run computes what the NCHW run computes (the same epoch loss to float rounding, at lr 0:
    after a few updates of the tiny digits run, kernel-dependent rounding grows past any fixed tolerance) and saves
    an ordinary contiguous model that timm loads."""
    import timm
    from jointrd_timm.io import load_weights
    runs = {}
    for name, overrides in (('nchw', []), ('nhwc', ['runner.channels_last=true'])):
        train(load_config(tiny_yaml(tmp_path / name, epochs=1), overrides + ['train.optimizer.kwargs.lr=0.0']),
              output_dir=str(tmp_path / name / 'run'), device='cpu')
        runs[name] = json.loads((tmp_path / name / 'run' / 'metrics.jsonl').read_text().splitlines()[0])
    assert runs['nhwc']['train_loss'] == pytest.approx(runs['nchw']['train_loss'], rel=1e-5)
    assert all(t.is_contiguous() for t in weights(tmp_path / 'nhwc' / 'run').values())
    twin = load_weights(timm.create_model('plain_resnet20_cifar', num_classes=10, in_chans=1),
                        tmp_path / 'nhwc' / 'run' / 'model')
    assert twin.layer1[0].conv1.weight.is_contiguous()


def test_channels_last_must_be_true_or_false(tmp_path):
    with pytest.raises(ConfigError, match=r'runner.channels_last .*true or false'):
        load_config(tiny_yaml(tmp_path, method='ce'), ['runner.channels_last=1'])


def _fail_train_with(monkeypatch, error):
    """`jointrd train` whose library call raises ``error`` (no YAML read, nothing trained)."""
    from jointrd_timm.training import runner

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(runner, 'load_config', lambda path, overrides: {})
    monkeypatch.setattr(runner, 'train', fail)


def test_cli_reports_the_packages_errors_in_one_line_and_lets_a_bug_raise_with_its_traceback(monkeypatch, capsys):
    from jointrd_timm.training.run_folder import RunFolderError
    _fail_train_with(monkeypatch, RunFolderError('the folder says no'))
    assert main(['train', '--config', 'x.yaml']) == 1
    assert capsys.readouterr().err == 'jointrd train: error: the folder says no\n'
    _fail_train_with(monkeypatch, FileNotFoundError('no such file: x.yaml'))  # a path the user gave
    assert main(['train', '--config', 'x.yaml']) == 1
    assert capsys.readouterr().err == 'jointrd train: error: no such file: x.yaml\n'
    for bug in (KeyError('lr'), RuntimeError('shape mismatch inside a module'), ValueError('not ours')):
        _fail_train_with(monkeypatch, bug)
        with pytest.raises(type(bug)) as raised:
            main(['train', '--config', 'x.yaml'])
        assert raised.value is bug and raised.traceback  # raised as it was, with its traceback
        assert capsys.readouterr().err == ''


def test_the_projects_errors_are_jointrd_errors_and_keep_their_builtin_bases():
    from jointrd_timm.deploy.exact import ExactConversionError
    from jointrd_timm.deploy.export import ExportError, UnsupportedExportError
    from jointrd_timm.errors import InputError, JointRDError
    from jointrd_timm.extras import MissingExtraError
    from jointrd_timm.io import CheckpointError
    from jointrd_timm.methods.base import RunLengthError
    from jointrd_timm.methods.stages import StageLayoutError
    from jointrd_timm.timm_script import ScriptNotFoundError
    from jointrd_timm.training.data import DatasetColumnError
    from jointrd_timm.training.distill import DistillError
    from jointrd_timm.training.run_folder import RunFolderError
    from jointrd_timm.twins.derive import NotResidualError, UnsupportedBlockError
    bases = {ConfigError: ValueError, InputError: ValueError, CheckpointError: ValueError, DistillError: ValueError,
             ExactConversionError: ValueError, StageLayoutError: ValueError, NotResidualError: ValueError,
             UnsupportedBlockError: ValueError, RunFolderError: RuntimeError, RunLengthError: RuntimeError,
             ExportError: RuntimeError, UnsupportedExportError: RuntimeError, DatasetColumnError: KeyError,
             MissingExtraError: ImportError, ScriptNotFoundError: FileNotFoundError}
    assert [e.__name__ for e, base in bases.items() if not issubclass(e, (JointRDError)) or not issubclass(e, base)] == []
    assert str(DatasetColumnError('column img is missing')) == 'column img is missing'  # not quoted like a KeyError


def test_distill_output_dir_and_its_deprecated_alias_output(monkeypatch):
    import warnings
    from jointrd_timm.training import distill
    calls = []
    monkeypatch.setattr(distill, 'run_distill', lambda teacher, data, **options: calls.append(options))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the current name warns about nothing
        assert main(['distill', 'resnet20_cifar', '--data', 'sklearn:digits', '--output-dir', 'runs/a']) == 0
    with pytest.warns(FutureWarning, match='jointrd distill --output is deprecated: use --output-dir'):
        assert main(['distill', 'resnet20_cifar', '--data', 'sklearn:digits', '--output', 'runs/b']) == 0
    assert main(['distill', 'resnet20_cifar', '--data', 'sklearn:digits']) == 0
    assert [c['output_dir'] for c in calls] == ['runs/a', 'runs/b', 'runs/distill']
    assert 'output' not in calls[0]


def test_a_resume_mid_accumulation_continues_the_pending_gradients_exactly(tmp_path, monkeypatch):
    """64 images at batch 24: 3 batches an epoch with an optimizer step every 2 backward passes, counted across
    epochs (torchdistill's stage_grad_count), so epoch 1 ends with one gradient pending: the checkpoint keeps the
    count and the gradient, and the resumed run equals the uninterrupted one."""
    from jointrd_timm import faults
    from jointrd_timm.training.run_folder import RunFolderError
    yaml = tiny_yaml(tmp_path, epochs=3, limit=64, method='ce')
    overrides = ['train.train_data_loader.kwargs.batch_size=24', 'train.optimizer.grad_accum_step=2']
    torch.manual_seed(0)
    full = train(load_config(yaml, overrides), output_dir=str(tmp_path / 'full'), device='cpu')
    faults._arrivals.clear()
    monkeypatch.setenv(faults.ENV, 'checkpoint_write:2:enospc')  # epoch 1 saved, epoch 2's write fails
    with pytest.raises(RunFolderError, match='The previous checkpoint'):
        train(load_config(yaml, overrides), output_dir=str(tmp_path / 'cut'), device='cpu')
    monkeypatch.delenv(faults.ENV)
    saved = load_file(str(tmp_path / 'cut' / 'last.safetensors'))
    assert any(k.startswith('module.grads.') for k in saved)  # epoch 1 ended with a gradient pending
    resumed = train(load_config(yaml, overrides), output_dir=str(tmp_path / 'cut'), device='cpu', resume=True)
    a, b = (load_file(str(tmp_path / run / 'last.safetensors')) for run in ('full', 'cut'))
    weights = [k for k in a if k.startswith('model.')]
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in weights) == 0.0
    assert resumed['test_acc'] == full['test_acc']


def _two_stages(path: Path) -> dict:
    """The tiny CE YAML's train section as two stages of 2 epochs, the second at a tenth of the first's lr."""
    config = load_config(path)
    single = dict(config['train'], num_epochs=2)
    optimizer = dict(single['optimizer'], kwargs=dict(single['optimizer']['kwargs']))
    optimizer['kwargs']['lr'] /= 10
    config['train'] = dict(stage1=single, stage2=dict(single, optimizer=optimizer))
    return config


def test_a_multi_stage_run_resumed_in_its_second_stage_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    from jointrd_timm import faults
    from jointrd_timm.training.run_folder import RunFolderError
    yaml_path = tiny_yaml(tmp_path, epochs=2, limit=32, method='ce')
    full = train(_two_stages(yaml_path), output_dir=str(tmp_path / 'full'), device='cpu')
    faults._arrivals.clear()
    monkeypatch.setenv(faults.ENV, 'checkpoint_write:4:enospc')  # 3 epochs saved: the run is in stage 2
    with pytest.raises(RunFolderError, match='The previous checkpoint'):
        train(_two_stages(yaml_path), output_dir=str(tmp_path / 'cut'), device='cpu')
    monkeypatch.delenv(faults.ENV)
    resumed = train(_two_stages(yaml_path), output_dir=str(tmp_path / 'cut'), device='cpu', resume=True)
    a, b = (load_file(str(tmp_path / run / 'last.safetensors')) for run in ('full', 'cut'))
    weights = [k for k in a if k.startswith('model.')]
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in weights) == 0.0
    assert resumed['test_acc'] == full['test_acc']
    lrs = [json.loads(line)['lr'] for line in (tmp_path / 'cut' / 'metrics.jsonl').read_text().splitlines()]
    assert len(lrs) == 4 and lrs[2] == pytest.approx(lrs[0] / 10)  # stage 2 at its own lr, after the resume too
    # the stages' loaders say what the model was trained on: its class names and its card's data
    saved = tmp_path / 'full' / 'model'
    assert json.loads((saved / 'config.json').read_text())['label_names'] == [str(i) for i in range(10)]
    assert '- **Data**: `sklearn:digits` (train: split `train`, limit 32)' in (saved / 'README.md').read_text()


@pytest.mark.parametrize('method', ['kd', 'fitnets'])
def test_a_frozen_teachers_outputs_come_from_its_running_statistics(tmp_path, monkeypatch, method):
    """KD and FitNets: the frozen teacher runs in eval mode (torchdistill puts only the student in train mode), so
    its BatchNorm statistics never move and its soft targets do not depend on the batch."""
    import timm
    from jointrd_timm.integrations.hub import save_trained_model
    from jointrd_timm.training import runner
    from jointrd_timm.training.configs import make_config
    from jointrd_timm.training.data import load_image_dataset
    torch.manual_seed(0)
    teacher = timm.create_model('resnet20_cifar', num_classes=10, in_chans=1)
    folder = save_trained_model(teacher, tmp_path / 'teacher')
    kwargs = dict(model_name='resnet20_cifar', num_classes=10, in_chans=1)
    data = dict(source='sklearn:digits', transform='tensor', input_size=8, channels=1)
    config = make_config(load_image_dataset(split='train', limit=64, **data),
                         load_image_dataset(split='test', limit=32, **data),
                         dict(key='timm_model', kwargs=dict(kwargs, model_name='plain_resnet20_cifar')), method,
                         dict(key='timm_model', kwargs=dict(kwargs, checkpoint=str(folder / 'model.safetensors'))),
                         epochs=2, batch_size=16, lr=0.05)
    built = {}
    build = runner._build_model
    monkeypatch.setattr(runner, '_build_model', lambda cfg, name='model': built.setdefault(name, build(cfg, name)))
    train(config, output_dir=str(tmp_path / 'run'), device='cpu')
    frozen = built['teacher_model']
    assert not frozen.training
    before = load_file(str(folder / 'model.safetensors'))
    after = frozen.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # running statistics included
    card = (tmp_path / 'run' / 'model' / 'README.md').read_text()  # a distillation box's teacher is named too
    assert "- **Method**: the torchdistill YAML's criterion with a teacher\n" in card
    assert '- **Teacher**: `resnet20_cifar`' in card


def test_a_resumed_run_continues_the_loss_scale_of_its_grad_scaler(tmp_path, monkeypatch):
    """fp16 on a GPU scales the loss by a GradScaler whose scale it learns; a resume must continue that scale, not
    restart it at 65536 (CPU accelerate has no scaler: one for CPU is given here, growing every step)."""
    import jointrd_timm.training.runner as runner_module
    made = runner_module._make_accelerator

    def with_scaler(runner, device_type):
        accelerator = made(runner, device_type)
        accelerator.scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 4, growth_interval=1)
        return accelerator

    monkeypatch.setattr(runner_module, '_make_accelerator', with_scaler)
    yaml = tiny_yaml(tmp_path, epochs=2, limit=32)
    full = tmp_path / 'full'
    train(load_config(yaml), output_dir=str(full), device='cpu')
    cut = tmp_path / 'cut'
    train(load_config(yaml, ['train.num_epochs=1']), output_dir=str(cut), device='cpu')
    (cut / 'final.json').unlink()  # as if stopped after its first epoch's checkpoint
    train(load_config(yaml), output_dir=str(cut), device='cpu', resume=True)
    scales = [json.loads(load_file_metadata(folder / 'last.safetensors')['extra'])['grad_scaler']['scale']
              for folder in (full, cut)]
    # 32 images at batch 16: 2 steps an epoch, the scale doubling at each: 2^4 * 2^4 after both epochs
    assert scales == [2.0 ** 8, 2.0 ** 8]
    assert max_diff(weights(full), weights(cut)) < 1e-5


def load_file_metadata(path):
    from safetensors import safe_open
    with safe_open(str(path), 'pt') as f:
        return f.metadata()


@pytest.mark.parametrize('method', ['jointrd', 'cakd'])
def test_a_multi_stage_run_keeps_the_methods_frozen_modules_out_of_every_stages_optimizer(tmp_path, monkeypatch,
                                                                                            method):
    """torchdistill unfreezes every parameter when it moves to the next stage, then builds that stage's optimizer
    from the trainable ones: the frozen teacher (JointRD's, CAKD's) and CAKD's discriminator must stay out of it
    (the teacher never changes; the discriminator moves only by its own optimizer)."""
    from jointrd_timm.training import runner
    yaml_path = tiny_yaml(tmp_path, epochs=2, limit=32, method=method)
    built = {}
    build = runner._build_model
    monkeypatch.setattr(runner, '_build_model', lambda cfg, name='model': built.setdefault(name, build(cfg, name)))
    seen = []
    import torchdistill.core.training as td_training
    original = td_training.MultiStagesTrainingBox.advance_to_next_stage

    def advance(box):
        original(box)
        optimizer = getattr(box.optimizer, 'optimizer', box.optimizer)
        seen.append({id(p) for group in optimizer.param_groups for p in group['params']})

    monkeypatch.setattr(td_training.MultiStagesTrainingBox, 'advance_to_next_stage', advance)
    torch.manual_seed(0)
    teacher_before = {k: v.clone() for k, v in build(load_config(yaml_path)['models']['model']).teacher.state_dict()
                      .items()}
    torch.manual_seed(0)
    train(_two_stages(yaml_path), output_dir=str(tmp_path / 'run'), device='cpu')
    model = built['model']
    assert len(seen) == 1  # one stage advance, its optimizer recorded
    frozen = [model.teacher] + ([model.adversarial.discriminator] if method == 'cakd' else [])
    for module in frozen:
        assert not any(p.requires_grad for p in module.parameters())
        assert not {id(p) for p in module.parameters()} & seen[0]
    assert {id(p) for p in model.student.parameters() if p.requires_grad} <= seen[0]
    after = model.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in after if after[k].is_floating_point())


def test_a_last_batch_of_one_image_is_dropped_or_refused_with_the_setting_that_drops_it(tmp_path):
    """33 images at batch 16 leave one image for the last batch; a stride-32 net on 8 px digits ends in 1x1 maps,
    where BatchNorm cannot train on one value per channel. Written configs drop that batch; a YAML that keeps it
    gets a ConfigError naming drop_last, not torch's bare ValueError."""
    from jointrd_timm.training.configs import make_config
    from jointrd_timm.training.data import load_image_dataset
    data = dict(source='sklearn:digits', transform='tensor', input_size=8, channels=1)
    model = dict(key='timm_model', kwargs=dict(model_name='resnet18', num_classes=10, in_chans=1))
    config = make_config(load_image_dataset(split='train', limit=33, **data), load_image_dataset(split='test', limit=16,
                         **data), model, 'ce', epochs=1, batch_size=16, lr=0.05)
    assert config['train']['train_data_loader']['kwargs']['drop_last'] is True
    final = train(config, output_dir=str(tmp_path / 'dropped'), device='cpu')
    assert final['epochs'] == 1
    config['train']['train_data_loader']['kwargs']['drop_last'] = False
    with pytest.raises(ConfigError, match=r'A training batch of 1 image\(s\).*drop_last: true'):
        train(config, output_dir=str(tmp_path / 'kept'), device='cpu')
    even = make_config(load_image_dataset(split='train', limit=34, **data), load_image_dataset(split='test', limit=16,
                       **data), model, 'ce', epochs=1, batch_size=16, lr=0.05)
    assert even['train']['train_data_loader']['kwargs']['drop_last'] is False  # 2 images left: every image trains


@pytest.mark.parametrize('method, overrides, expected', [
    ('ce', ['models.model.kwargs.num_classes=6'],
     r"models\.model predicts 6 classes, but the labels of dataset 'digits/train' index 10: set "
     r"models\.model\.kwargs\.num_classes to 10"),
    ('ce', ['models.model.kwargs.num_classes=0'],
     r"models\.model has no classifier \(num_classes 0\), and the labels of dataset 'digits/train' index 10"),
    ('jointrd', ['models.model.kwargs.teacher.num_classes=6', 'models.model.kwargs.student.num_classes=6'],
     r"models\.model's student predicts 6 classes, but the labels of dataset 'digits/train' index 10"),
])
def test_a_model_with_fewer_classes_than_the_labels_is_refused_before_training(tmp_path, method, overrides, expected):
    """Before: label 6 reached the loss mid-epoch (IndexError: Target 6 is out of bounds), and a headless model
    (num_classes 0) trained and reported 100 % accuracy."""
    config = load_config(tiny_yaml(tmp_path, method=method, epochs=1, limit=16), overrides)
    with pytest.raises(ConfigError, match=expected):
        train(config, output_dir=str(tmp_path / 'out'), device='cpu')
    assert not (tmp_path / 'out').exists() or not any((tmp_path / 'out').iterdir())


def test_a_model_that_does_not_take_the_datas_images_is_an_error_of_the_input(tmp_path):
    """Before: timm's ViT assertion ('Input height (8) doesn't match model (16)') came out as a traceback from the
    middle of the first epoch."""
    overrides = ['models.model.kwargs.model_name=vit_tiny_patch16_224', 'models.model.kwargs.img_size=16',
                 'models.model.kwargs.patch_size=8']
    config = load_config(tiny_yaml(tmp_path, method='ce', epochs=1, limit=16), overrides)
    config['models']['model']['kwargs'].pop('norm_layer')  # the tiny YAML's CNN norm: no ViT kwarg
    with pytest.raises(ConfigError, match=r"The model does not run on the first training batch, of shape "
                                          r"\(16, 1, 8, 8\) \(AssertionError: Input height \(8\) doesn't match model"):
        train(config, output_dir=str(tmp_path / 'out'), device='cpu')
