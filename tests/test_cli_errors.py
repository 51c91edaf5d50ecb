"""A user's mistake on the command line is one error line (exit 1) or argparse's usage error (exit 2), never a
traceback, and it leaves nothing behind: unknown or twinless model names, folders that do not exist, sizes and counts
below 1, a recipe that does not parse, an input size the model does not take, a GPU the machine does not have."""
import pytest
import torch

from jointrd_timm.cli import main


def _error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize('argv, message', [
    (['memory', 'resnt18'], r"jointrd memory: error: Unknown model 'resnt18': not a timm model; did you mean .*"
                            r"resnet18"),
    (['memory', 'vit_tiny_patch16_224'], r'vit_tiny_patch16_224 is a transformer \(or hybrid\): it mixes tokens '
                                         r'with .*Attention'),
    (['memory', 'densenet121'], r'densenet121 has no shortcut-free twin: DenseNet has no shortcut addition'),
    (['derive', 'lcnet_035'], r'lcnet_035 has no shortcut-free twin: no shortcut addition found'),
    (['derive', 'plain_resnt18'], r"a twin is named plain_<timm model>, and 'resnt18' is not a timm model"),
    (['bench', 'resnt18', '--no-onnx'], r"jointrd bench: error: Unknown model 'resnt18'"),
    (['derive', 'torchvision:resnt18'], r"Unknown torchvision model 'resnt18' \(in 'torchvision:resnt18'\): did you "
                                        r"mean one of \['resnet18'"),
    (['memory', 'plain_torchvision:densenet121'], r'torchvision:densenet121 has no shortcut-free twin: DenseNet has no '
                                                  r'shortcut addition'),
    (['bench', 'torchvision:vit_b_16', '--no-onnx'], r'torchvision:vit_b_16 is a transformer'),
    (['derive', 'torchvision:resnet18.IMAGENET1K_V9'], r'torchvision:resnet18.IMAGENET1K_V9: torchvision model '
                                                       r'resnet18 has no weights .IMAGENET1K_V9.; its weights: '
                                                       r'IMAGENET1K_V1'),
])
def test_model_names_without_a_twin_are_refused_with_the_reason(capsys, argv, message):
    import re
    assert re.search(message, _error(capsys, argv))


def test_a_tagged_name_derives_its_architecture(capsys):
    assert main(['derive', 'resnet20_cifar.some_tag']) == 0
    assert capsys.readouterr().out.startswith('twin of resnet20_cifar: plain_resnet20_cifar')


@pytest.mark.parametrize('command', ['save', 'push', 'export'])
def test_a_folder_that_does_not_exist_is_named(tmp_path, capsys, command):
    missing = tmp_path / 'no' / 'such'
    argv = {'save': ['save', str(missing), str(tmp_path / 'out')], 'push': ['push', str(missing), 'org/x'],
            'export': ['export', str(missing), '--output-dir', str(tmp_path / 'out')]}[command]
    err = _error(capsys, argv)
    assert f"No folder '{missing}'" in err and not (tmp_path / 'out').exists()
    file = tmp_path / 'model.safetensors'
    file.write_bytes(b'')
    argv[1] = str(file)
    assert 'is a file: give the folder that holds a model' in _error(capsys, argv)


@pytest.mark.parametrize('argv, option', [
    (['memory', 'resnet18', '--input-size', '-4'], '--input-size'),
    (['memory', 'resnet18', '--batch', '0'], '--batch'),
    (['export', 'resnet18', '--input-size', '0'], '--input-size'),
    (['derive', 'resnet18', '--input-size', '0'], '--input-size'),
    (['demo', '--epochs', '0'], '--epochs'),
    (['demo', '--limit', '0'], '--limit'),
    (['bench', 'resnet18', '--repeats', '0'], '--repeats'),
])
def test_sizes_and_counts_below_one_are_usage_errors_not_defaults(tmp_path, monkeypatch, capsys, argv, option):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert f'argument {option}: must be at least 1' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # the demo did not run


def test_a_recipe_that_does_not_parse_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / 'out'
    for recipe, message in (('bogus', "--recipe 'bogus': Unknown recipe 'bogus'"),
                            ('default,nosuch=1', r"Unknown recipe field(s) ['nosuch']"),
                            ('default,kd_weight=abc', 'kd_weight must be a finite number >= 0')):
        err = _error(capsys, ['distill', 'resnet20_cifar', '--data', 'sklearn:digits', '--recipe', recipe,
                              '--output-dir', str(out)])
        assert message in err
    assert not out.exists()


def test_export_of_a_model_at_an_input_size_it_does_not_take_names_the_size_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / 'exports'
    err = _error(capsys, ['export', 'vit_tiny_patch16_224', '--random-weights', '--input-size', '64',
                          '--output-dir', str(out)])
    assert 'VisionTransformer does not run on an example input of shape (2, 3, 64, 64)' in err
    assert '--input-size' in err and not out.exists()


@pytest.mark.parametrize('argv', [['derive', 'dla34', '--input-size', '40'],
                                  ['derive', 'convnext_atto', '--input-size', '2'],
                                  ['memory', 'convnext_atto', '--input-size', '2'],
                                  ['bench', 'convnext_atto', '--input-size', '2', '--no-onnx', '--no-measure',
                                   '--repeats', '1', '--batches', '1']])
def test_a_model_that_does_not_run_at_the_input_size_asked_for_names_the_size(capsys, argv):
    err = _error(capsys, argv)
    size = argv[argv.index('--input-size') + 1]
    assert f'{argv[1]} does not run on a {size}x{size} input' in err and 'Give an --input-size it takes' in err


def test_bench_measures_at_the_size_asked_for_else_the_models_own(monkeypatch):
    from jointrd_timm.deploy import bench
    sizes = []
    monkeypatch.setattr(bench, 'bench_models', lambda built, size, *a, **k: sizes.append(size) or {})
    monkeypatch.setattr(bench, 'fold_for_deployment', lambda model: (model, None))
    for teacher, given in (('resnet20_cifar', None), ('botnet26t_256', None), ('resnet18', 96)):
        bench.bench_pair(teacher, input_size=given)
    assert sizes == [32, 256, 96]  # botnet26t_256 is built for 256 px: 224 would fail its attention


@pytest.mark.parametrize('command', [['export', 'resnet20_cifar', '--random-weights'],
                                     ['exact', 'resnet20_cifar', '--random-weights'],
                                     ['distill', 'resnet20_cifar', '--data', 'sklearn:digits', '--epochs', '1']])
def test_an_output_folder_that_is_a_file_is_refused_and_the_file_kept(tmp_path, capsys, command):
    blocker = tmp_path / 'a-file'
    blocker.write_text('kept')
    for out in (blocker, blocker / 'below'):
        err = _error(capsys, command + ['--output-dir', str(out)])
        assert f'{blocker} is a file, not a folder; choose another --output-dir' in err
    assert blocker.read_text() == 'kept'


def test_train_refuses_bad_settings_in_one_line_and_leaves_no_folder(tmp_path, capsys):
    """A JointRD setting out of range or unknown, a value that is not YAML, --resume without a checkpoint: one
    line each, and the output folder the run would have created is not left behind empty."""
    from conftest import tiny_yaml
    config = str(tiny_yaml(tmp_path / 'yaml', epochs=1, limit=32))
    out = tmp_path / 'run'
    for extra, message in ((['models.model.kwargs.jointrd.eta_min=2'], 'eta_min must be a finite number >= 0 and '
                                                                       '<= 1'),
                           (['models.model.kwargs.jointrd.nosuch=1'], "Unknown JointRD setting(s) ['nosuch']"),
                           (['train.num_epochs=[1'], "Override 'train.num_epochs=[1': its value is not YAML"),
                           (['--resume'], '--resume: no checkpoint at')):
        err = _error(capsys, ['train', '--config', config, '--output-dir', str(out)] + extra)
        assert message in err, err
        assert not out.exists()


def test_a_recipe_number_that_is_not_finite_is_refused():
    from jointrd_timm.recipes import get_recipe
    for field in ('lr_scale', 'batch_scale'):
        with pytest.raises(ValueError, match=f'{field} must be a finite positive number .* got inf'):
            get_recipe(f'default,{field}=1e999')


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without a CUDA GPU')
def test_asking_for_a_gpu_on_a_machine_without_one_is_refused_not_run_on_the_cpu(tmp_path, capsys):
    out = tmp_path / 'out'
    err = _error(capsys, ['distill', 'resnet20_cifar', '--data', 'sklearn:digits', '--device', 'cuda',
                          '--output-dir', str(out)])
    assert "device 'cuda' was asked for, but torch sees no CUDA GPU here" in err and not out.exists()


def test_demo_asking_for_a_missing_gpu_keeps_the_previous_demo(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip('needs a machine without a CUDA GPU')
    out = tmp_path / 'demo'
    out.mkdir()
    (out / 'comparison.json').write_text('{}')
    err = _error(capsys, ['demo', '--device', 'cuda', '--output-dir', str(out)])
    assert 'was asked for, but torch sees no CUDA GPU here' in err
    assert [p.name for p in out.iterdir()] == ['comparison.json']


def test_device_names_torch_reads_are_accepted_and_others_refused():
    from jointrd_timm.training.run_config import ConfigError
    from jointrd_timm.training.runner import check_device
    assert check_device(None) is None
    assert check_device('cpu') == check_device(torch.device('cpu')) == 'cpu'
    with pytest.raises(ConfigError, match="device must be 'cpu', 'cuda' or None"):
        check_device('tpu')
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device 'cuda:0' was asked for"):
            check_device('cuda:0')


def test_load_model_reads_timms_source_prefixes_and_names_missing_folders(tmp_path, monkeypatch):
    import timm
    from jointrd_timm.errors import InputError
    from jointrd_timm.integrations.hub import load_model
    seen = []
    monkeypatch.setattr(timm, 'create_model', lambda spec, **kwargs: seen.append((spec, kwargs['pretrained'])))
    for spec in ('hf_hub:org/name', 'HF-HUB:org/name', 'hf-hub:org/name.tag'):
        load_model(spec)  # timm's own prefixes (any case, the hf_hub alias) reach timm as they are
    assert seen == [('hf_hub:org/name', True), ('HF-HUB:org/name', True), ('hf-hub:org/name.tag', True)]
    monkeypatch.chdir(tmp_path)
    for spec in ('runs/exp:1', 'local-dir:nowhere', './nowhere'):
        with pytest.raises(InputError, match='No folder'):
            load_model(spec)
    with pytest.raises(InputError, match=r"Unknown model 'nowhere': not a timm model.*Nor is it a folder here"):
        load_model('nowhere')
    with pytest.raises(InputError, match=r"did you mean one of \['plain_resnet18'"):
        load_model('plain_resnt18')


def test_eval_reads_the_label_column_and_input_size_it_is_given(tmp_path, monkeypatch, capsys):
    from jointrd_timm.training import data
    seen = {}

    def fake_evaluate(model, dataset, split, **kwargs):
        seen.update(kwargs)
        return dict(top1=50.0, samples=2)
    monkeypatch.setattr(data, 'evaluate_model', fake_evaluate)
    assert main(['eval', 'resnet20_cifar', '--random-weights', '--dataset', str(tmp_path), '--label-column', 'fine',
                 '--image-column', 'image', '--input-size', '40']) == 0
    # read as the model's config says (resnet20_cifar's: CIFAR statistics, no crop), at the side given
    assert (seen['label_column'], seen['image_column'], seen['channels']) == ('fine', 'image', 3)
    assert seen['data_cfg']['input_size'] == (3, 40, 40) and seen['data_cfg']['crop_pct'] == 1.0
    assert 'transform' not in seen and 'input_size' not in seen
    assert 'top-1 50.00 % on 2 images' in capsys.readouterr().out


@pytest.mark.parametrize('override, message', [
    ('train.optimizer.key=Nope', 'the train section does not build (ValueError: No optimizer `Nope` registered)'),
    ('train.scheduler.key=Nope', 'the train section does not build (ValueError: No scheduler `Nope` registered)'),
    ('train.pre_epoch_process=nope', 'No pre-epoch process function `nope` registered'),
    ('train.scheduler.kwargs.gamma=abc', "train.scheduler.kwargs.gamma must be a number (got 'abc')"),
    ('train.scheduler.kwargs.milestones=[a]', "train.scheduler.kwargs.milestones must be a list of whole numbers"),
    ('datasets.*.init.kwargs.input_size=abc', 'a tag of the YAML failed while it loaded'),
])
def test_train_names_a_bad_registry_key_or_value_in_one_line_and_leaves_no_folder(tmp_path, capsys, override,
                                                                                    message):
    from conftest import tiny_yaml
    config = str(tiny_yaml(tmp_path / 'yaml', epochs=1, limit=32))
    out = tmp_path / 'run'
    err = _error(capsys, ['train', '--config', config, '--output-dir', str(out), '--device', 'cpu', override])
    assert message in err and 'Traceback' not in err, err
    assert not out.exists()


def test_a_diverging_run_stops_in_one_line_naming_the_learning_rate(tmp_path, capsys):
    from conftest import tiny_yaml
    from jointrd_timm.errors import DivergedError
    assert issubclass(DivergedError, FloatingPointError)  # what earlier callers caught
    config = str(tiny_yaml(tmp_path / 'yaml', epochs=1, limit=64, method='ce'))
    assert main(['train', '--config', config, '--output-dir', str(tmp_path / 'run'), '--device', 'cpu',
                 'train.optimizer.kwargs.lr=1.0e+30', 'train.optimizer.kwargs.momentum=0.0']) == 1
    err = capsys.readouterr().err  # the progress bar, then the error as its last line
    last = err.replace('\r', '\n').strip().splitlines()[-1]
    assert last.startswith('jointrd train: error: Loss became') and 'lower the learning rate' in last, err
    assert 'Traceback' not in err


def test_per_group_scheduler_rates_may_be_lists():
    from jointrd_timm.training.run_config import ConfigError, validate
    config = dict(train=dict(num_epochs=1, scheduler=dict(key='OneCycleLR', kwargs=dict(max_lr=[0.1, 0.01],
                                                                                         total_steps=10))))
    assert validate(config) is config
    config['train']['scheduler']['kwargs']['total_steps'] = [10]  # one number only
    with pytest.raises(ConfigError, match=r'total_steps must be a number \(got \[10\]\)'):
        validate(config)


def test_bench_output_under_a_file_is_refused_before_the_benchmark(tmp_path, capsys, monkeypatch):
    """Before: the whole benchmark ran, then pathlib's FileExistsError came out as a traceback."""
    from jointrd_timm.deploy import bench
    ran = []
    monkeypatch.setattr(bench, 'run_bench', lambda *a, **k: ran.append(1) or {})
    (tmp_path / 'a-file').write_text('kept')
    err = _error(capsys, ['bench', 'resnet20_cifar', '--output', str(tmp_path / 'a-file' / 'x')])
    assert f'--output {tmp_path}/a-file/x: {tmp_path}/a-file is a file, not a folder' in err
    assert not ran and (tmp_path / 'a-file').read_text() == 'kept'


@pytest.mark.parametrize('command', ['derive', 'memory', 'bench'])
def test_a_saved_model_folder_given_for_an_architecture_says_which_commands_take_it(tmp_path, capsys, command):
    """Before: 'Unknown model ... not a timm model', as if the folder were a mistyped name."""
    (tmp_path / 'model').mkdir()
    err = _error(capsys, [command, str(tmp_path / 'model')])
    assert f'{tmp_path}/model is a folder or file; this command takes a timm architecture name' in err
    assert f'jointrd export {tmp_path}/model' in err
