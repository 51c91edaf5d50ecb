"""Bad input refused before anything runs, with what was wrong and what to do: a loader's dataset id, override values
(exponent notation, YAML's `no`), optimizer numbers, dataset overrides, pretrained tags, a missing split, distill's
numbers, export's --atol, eval's --transform on digits; and the distill command a run records plans it again."""
import re
import shlex
import shutil

import pytest
import timm
import torch

from conftest import tiny_yaml
from jointrd_timm.cli import build_parser, main
from jointrd_timm.errors import InputError
from jointrd_timm.training.run_config import ConfigError, load_config


@pytest.mark.parametrize('key', ['train.train_data_loader', 'train.val_data_loader', 'test.test_data_loader'])
def test_a_loaders_unknown_dataset_id_is_refused_naming_the_yamls_datasets(tmp_path, key):
    path = tiny_yaml(tmp_path)
    with pytest.raises(ConfigError, match=rf"{key}.dataset_id 'digits/trian' is not a dataset of the YAML; its "
                                          r"datasets: \['digits/train', 'digits/test'\]"):
        load_config(path, [f'{key}.dataset_id=digits/trian'])
    bad = tmp_path / 'bad.yaml'  # in the YAML itself too (no alias: the id written out)
    section, loader = key.split('.')
    text = path.read_text()
    start = text.index(f'{loader}:')
    bad.write_text(text[:start] + text[start:].replace('dataset_id: *test', "dataset_id: 'digits/tset'", 1)
                   .replace('dataset_id: *train', "dataset_id: 'digits/tset'", 1))
    with pytest.raises(ConfigError, match=rf"{key}.dataset_id 'digits/tset' is not a dataset"):
        load_config(bad)
    assert load_config(path)['train']['train_data_loader']['dataset_id'] == 'digits/train'


def test_override_values_in_exponent_notation_are_numbers_and_yamls_no_is_no(tmp_path):
    path = tiny_yaml(tmp_path)
    config = load_config(path, ['train.optimizer.kwargs.weight_decay=1e-4', 'train.optimizer.kwargs.lr=2E-3',
                                'runner.mixed_precision=no'])
    assert config['train']['optimizer']['kwargs']['weight_decay'] == 1e-4
    assert config['train']['optimizer']['kwargs']['lr'] == 2e-3
    assert config['runner']['mixed_precision'] == 'no'
    # quoted, it stays text, and the refusal says how YAML reads it
    with pytest.raises(ConfigError, match=r"train.optimizer.kwargs.lr must be a number >= 0 \(got '1e-3' \(YAML "
                                          r"reads 1e-3 as text: write it with a dot, e.g. 0.001\)\)"):
        load_config(path, ['train.optimizer.kwargs.lr="1e-3"'])
    for option, value in (('weight_decay', 'abc'), ('momentum', '-0.9')):
        with pytest.raises(ConfigError, match=rf'train.optimizer.kwargs.{option} must be a number >= 0'):
            load_config(path, [f'train.optimizer.kwargs.{option}={value}'])


def test_a_refusal_an_override_brings_names_that_override_and_not_the_others(tmp_path):
    path = tiny_yaml(tmp_path, method='ce')
    good = ['runner.seed=1', 'train.optimizer.kwargs.lr=0.1']
    with pytest.raises(ConfigError) as bad_key:
        load_config(path, good[:1] + ['train.num_epoch=3'] + good[1:])
    assert f"Unknown key(s) ['num_epoch'] in {path} with the override train.num_epoch=3: train;" in str(bad_key.value)
    assert 'runner.seed' not in str(bad_key.value)
    with pytest.raises(ConfigError) as bad_value:
        load_config(path, good + ['train.num_epochs=-1'])
    assert str(bad_value.value).startswith(f'{path} with the override train.num_epochs=-1: train.num_epochs must be')
    # a YAML that fails by itself is named alone, whatever the overrides
    broken = tmp_path / 'broken.yaml'
    broken.write_text(path.read_text().replace('num_epochs: 2', 'num_epochs: 0'))
    with pytest.raises(ConfigError, match=rf'^{re.escape(str(broken))}: train.num_epochs must be'):
        load_config(broken, good)


def test_a_dataset_override_of_a_key_the_dataset_does_not_have_is_refused(tmp_path):
    path = tiny_yaml(tmp_path)
    # `source` belongs under init.kwargs: torchdistill would have passed it on unread
    with pytest.raises(ConfigError, match=r"override datasets.\*.source: dataset 'digits/train' has no key "
                                          r"'source'; its keys: \['key', 'init'\] .*datasets.\*.init.kwargs.source="):
        load_config(path, ['datasets.*.source=/data'])
    # a misspelt kwargs key reaches the function the tag calls: refused naming the YAML, not a bare TypeError
    with pytest.raises(ConfigError, match=r"jointrd.yaml: a tag of the YAML failed while it "
                                          r"loaded \(.*sorce.*\); check the keys of its `kwargs`"):
        load_config(path, ['datasets.digits/train.init.kwargs.sorce=/data'])
    assert len(load_config(path, ['datasets.digits/train.init.kwargs.limit=20'])['datasets']['digits/train']) == 20


@pytest.mark.parametrize('name', ['resnet18.nosuchtag', 'plain_resnet18.nosuchtag'])
def test_an_unknown_pretrained_tag_is_refused_listing_the_tags(name, capsys):
    from jointrd_timm.integrations.hub import load_model
    base = name.split('.')[0]
    tags = [t.split('.', 1)[1] for t in timm.list_pretrained(f'{base}.*')]
    assert 'a1_in1k' in tags
    with pytest.raises(InputError, match=rf"^{base} has no pretrained tag 'nosuchtag'; its tags: .*a1_in1k"):
        load_model(name)
    assert main(['eval', name, '--dataset', 'sklearn:digits']) == 1
    assert f"error: {base} has no pretrained tag 'nosuchtag'" in capsys.readouterr().err
    assert main(['export', name, '--output-dir', 'never']) == 1


def test_eval_on_a_folder_without_the_split_names_the_splits_it_has(tmp_path, capsys):
    from PIL import Image
    for label in ('cat', 'dog'):
        (tmp_path / 'images' / label).mkdir(parents=True)
        for i in range(2):
            Image.new('RGB', (8, 8), (i * 90, 20, 30)).save(tmp_path / 'images' / label / f'{i}.png')
    argv = ['eval', 'resnet20_cifar', '--random-weights', '--dataset', str(tmp_path / 'images'), '--input-size', '8']
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "has no split 'test'" in err and "'train'" in err and '--split' in err
    assert 'put the class folders in train/ and test/ subfolders' in err and "--test-fraction" in err
    assert main(argv + ['--split', 'train']) == 0
    assert 'on 4 images' in capsys.readouterr().out
    assert main(argv + ['--split', 'train', '--test-fraction', '0.5']) == 0
    assert 'on 2 images' in capsys.readouterr().out
    assert main(argv + ['--test-fraction', '0.5']) == 0  # carved from the train split by default
    assert 'on 2 images' in capsys.readouterr().out
    assert main(argv + ['--split', 'train', '--test-fraction', '1.5']) == 1
    assert 'test_fraction must be a number in [0, 1)' in capsys.readouterr().err


def test_eval_refuses_a_transform_that_digits_are_not_read_with(capsys):
    assert main(['eval', 'resnet20_cifar', '--random-weights', '--dataset', 'sklearn:digits',
                 '--transform', 'cifar']) == 1
    assert 'sklearn:digits is read as tensors' in capsys.readouterr().err


@pytest.mark.parametrize('atol', ['nan', 'inf', '-1', 'x'])
def test_export_atol_must_be_a_finite_number_at_least_zero(tmp_path, monkeypatch, capsys, atol):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(['export', 'resnet18', '--random-weights', '--atol', atol])
    assert exited.value.code == 2 and 'argument --atol' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('options, message', [
    (dict(val_fraction=1.5), r'--val-fraction must be at least 0 and below 1 .*got 1.5'),
    (dict(val_fraction=-0.1), r'--val-fraction must be at least 0 and below 1 .*got -0.1'),
    (dict(workers=-1), r'--workers must be 0 or more .*got -1'),
    (dict(seed=-1), r'--seed must be a whole number in \[0, 2\*\*32\), got -1'),
    (dict(lr=float('inf')), r'--lr must be a finite number, got inf'),
])
def test_distill_refuses_its_numbers_naming_the_option(tmp_path, options, message):
    from jointrd_timm.training.distill import DistillError, plan_distill
    with pytest.raises(DistillError, match=message):
        plan_distill('resnet20_cifar', 'sklearn:digits', str(tmp_path / 'out'), epochs=1, **options)
    assert not (tmp_path / 'out').exists()


def test_the_recorded_distill_command_plans_the_same_run_again(tmp_path):
    """What the YAML header and the model card record: parsed by the command line, it gives every option the run
    was planned with (the earlier command dropped --num-classes, --limit, --lr, ... and used the deprecated
    --output)."""
    from jointrd_timm.training.distill import plan_distill
    given = dict(epochs=1, limit=96, lr=0.03, batch_size=16, seed=3, val_fraction=0.25, workers=0,
                 teacher_epochs=2, input_size=8, transform='tensor', label_column='label', channels_last=True)
    out = tmp_path / 'my out'  # a space: the command quotes it
    plan = plan_distill('resnet20_cifar', 'sklearn:digits', str(out), recipe='default,kd_weight=0.5', **given)
    words = shlex.split(plan.command)
    assert words[:2] == ['jointrd', 'distill'] and '--output' not in words
    args = build_parser().parse_args(words[1:])
    assert (args.teacher, args.data, args.output_dir) == ('resnet20_cifar', 'sklearn:digits', str(out))
    assert {k: getattr(args, k) for k in given} == given
    again = plan_distill(args.teacher, args.data, args.output_dir, recipe=args.recipe,
                         **{k: getattr(args, k) for k in given})
    assert again.command == plan.command and again.recipe == plan.recipe and again.budget == plan.budget
    assert (again.epochs, again.teacher_epochs, again.data) == (plan.epochs, plan.teacher_epochs, plan.data)
    default = plan_distill('resnet20_cifar', 'sklearn:digits', str(tmp_path / 'out'), epochs=1)
    assert default.command == (f'jointrd distill resnet20_cifar --data sklearn:digits --epochs 1 --recipe '
                               f'{default.recipe.id} --output-dir {tmp_path / "out"}')


def test_a_config_given_to_train_in_python_is_checked_as_a_yaml_is(tmp_path):
    """train(config) without load_config: a misspelt runner key or a missing models section is refused before
    anything is built (it was read as no weight average, or failed with a KeyError)."""
    from jointrd_timm.training.runner import train
    config = load_config(tiny_yaml(tmp_path, epochs=1))
    config['runner']['ema_decy'] = 0.999
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) \['ema_decy'\] in config: runner"):
        train(config, output_dir=str(tmp_path / 'a'), device='cpu')
    del config['runner']['ema_decy']
    models = config.pop('models')
    with pytest.raises(ConfigError, match=r'config has no `models` section'):
        train(config, output_dir=str(tmp_path / 'b'), device='cpu')
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
    config['models'] = models
    assert train(config, output_dir=str(tmp_path / 'c'), device='cpu')['test_acc'] >= 0


def test_distill_augments_the_train_set_and_not_the_test_set_whatever_their_splits_are_called():
    from jointrd_timm.training.distill_inputs import dataset_kwargs
    sets = dataset_kwargs('/data', 3, 32, 'cifar', None, None, 'training', 'train', 0.0, None)
    assert sets['train']['train'] is True and sets['test']['train'] is False
    usual = dataset_kwargs('/data', 3, 32, 'cifar', None, None, 'train', 'test', 0.0, None)
    assert 'train' not in usual['train'] and 'train' not in usual['test']  # the names say it: the YAML unchanged
    from jointrd_timm.training.data import load_image_dataset
    digits = dict(source='sklearn:digits', transform='cifar', input_size=16, channels=1)
    augmented = load_image_dataset(split='test', train=True, **digits)
    plain = load_image_dataset(split='test', **digits)
    torch.manual_seed(0)
    drawn = torch.stack([augmented[0][0] for _ in range(8)])
    assert drawn.std(0).max() > 0  # random crops / flips on a set read as a train set
    fixed = torch.stack([plain[0][0] for _ in range(8)])
    assert fixed.std(0).max() == 0  # the same image every time on a test set


def test_distill_refuses_test_labels_that_mean_other_classes_than_the_train_labels():
    import datasets
    from PIL import Image
    from jointrd_timm.training.data import HFImageDataset
    from jointrd_timm.training.distill import DistillError
    from jointrd_timm.training.distill_inputs import check_splits_agree

    def split(names, labels):
        features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
        data = datasets.Dataset.from_dict(dict(image=[Image.new('RGB', (4, 4))] * len(labels), label=labels),
                                          features=features)
        return HFImageDataset(data, lambda image: image, 'image', 'label', 'RGB')
    train = split(['cat', 'dog', 'fox'], [0, 1, 2])
    check_splits_agree(dict(train=train, test=split(['cat', 'dog', 'fox'], [2, 0])))  # the same classes: fine
    with pytest.raises(DistillError, match=r"The test split names its classes \['cat', 'fox'\]\.\.\., the train "
                                           r"split \['cat', 'dog', 'fox'\]"):
        check_splits_agree(dict(train=train, test=split(['cat', 'fox'], [0, 1])))  # dog missing: fox is 1 here
    plain = datasets.Dataset.from_dict(dict(image=[Image.new('RGB', (4, 4))] * 2, label=[0, 3]))
    with pytest.raises(DistillError, match=r"The val split has labels up to 3, beyond the train split's 3 classes"):
        check_splits_agree(dict(train=train, val=HFImageDataset(plain, None, 'image', 'label', 'RGB')))


def test_distill_carves_its_test_set_from_a_folder_of_class_subfolders_alone(tmp_path):
    from test_data_checkpoint import _class_folders
    from jointrd_timm.training.distill import DistillError, plan_distill
    root = _class_folders(tmp_path / 'photos', classes=3, per_class=10)
    with pytest.raises(DistillError, match=r"has no split 'test'.*--test-fraction"):
        plan_distill('resnet20_cifar', str(root), str(tmp_path / 'a'), epochs=1, input_size=8)
    plan = plan_distill('resnet20_cifar', str(root), str(tmp_path / 'b'), epochs=1, input_size=8, test_fraction=0.2,
                        val_fraction=0.25)
    sizes = {k: len(v) for k, v in plan.datasets.items()}
    assert sizes == dict(train=18, val=6, test=6)
    test = plan.data['test']  # read from the train split, without augmentation
    assert (test['split'], test['part'], test['train'], test['test_fraction']) == ('train', 'test', False, 0.2)
    assert '--test-fraction 0.2' in plan.command  # the recorded command plans the same run again
    for options, message in ((dict(test_fraction=1.0), '--test-fraction must be at least 0 and below 1'),
                             (dict(test_fraction=0.2, test_split='val'), '--test-split .val. would not be read'),
                             (dict(test_fraction=0.5, val_fraction=0.9), 'leave less than 5 %')):
        with pytest.raises(DistillError, match=message):
            plan_distill('resnet20_cifar', str(root), str(tmp_path / 'c'), epochs=1, input_size=8, **options)
    assert not (tmp_path / 'c').exists()


def test_a_twin_distilled_on_a_carved_test_set_is_evaluated_on_the_same_images_by_its_cards_command(tmp_path, capsys):
    import json
    import re
    from test_data_checkpoint import _class_folders
    from jointrd_timm.training.distill import run_distill
    root = _class_folders(tmp_path / 'photos', classes=3, per_class=10)
    out = tmp_path / 'run'
    run_distill('resnet20_cifar', str(root), str(out), epochs=1, input_size=8, test_fraction=0.2, latency_repeats=2,
                device='cpu')
    comparison = json.loads((out / 'comparison.json').read_text())
    printed = capsys.readouterr().out
    assert 'Test set: 0.2 of split `train` carved out (--test-fraction) (6 images)' in printed
    card = (out / 'model' / 'README.md').read_text()
    command = re.search(r'jointrd eval (\S+) --dataset (\S+) ([^`\n]*)', card)
    assert command and '--split train --test-fraction 0.2' in command.group(3)
    args = ['eval', str(out / 'model'), '--dataset', str(root)] + shlex.split(command.group(3))
    assert main(args) == 0
    line = capsys.readouterr().out
    assert 'on 6 images' in line and 'the 0.2 of train carved out as the test set' in line
    top1 = float(re.search(r'top-1 ([\d.]+) %', line).group(1))
    assert top1 == pytest.approx(comparison['test_acc']['twin'], abs=0.01)
    assert 'test set: 0.2 of split `train` carved out' in card and 'validate.py --model' not in card


def test_eval_refuses_data_whose_labels_index_more_classes_than_the_model_predicts(tmp_path, capsys):
    from jointrd_timm.integrations.hub import save_trained_model
    model = timm.create_model('resnet20_cifar', num_classes=5, in_chans=1)
    save_trained_model(model, tmp_path / 'five')
    assert main(['eval', str(tmp_path / 'five'), '--dataset', 'sklearn:digits']) == 1
    err = capsys.readouterr().err
    assert "predicts 5 classes, but the labels of 'sklearn:digits' (split 'test', column 'label') index 10" in err
    save_trained_model(timm.create_model('resnet20_cifar', num_classes=10, in_chans=1), tmp_path / 'ten')
    assert main(['eval', str(tmp_path / 'ten'), '--dataset', 'sklearn:digits']) == 0


def test_distill_reads_images_as_the_teachers_weights_expect(tmp_path):
    """A teacher whose weights were trained on images normalised by 0.5 / 0.5 and evaluated with a bicubic 0.9 crop
    (its config.json's pretrained_cfg): above 64 px every set is normalised so, and the test and held-out sets are
    read with its evaluation crop; --transform chooses the augmentation and crop, never the weights' mean / std; a
    teacher trained here keeps the defaults."""
    from test_data_cfg import image_folder
    from jointrd_timm.integrations.hub import save_trained_model
    from jointrd_timm.training.data import eval_transform
    from jointrd_timm.training.distill import plan_distill
    reading = dict(input_size=(3, 72, 72), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9,
                   interpolation='bicubic')
    teacher = save_trained_model(timm.create_model('resnet20_cifar', num_classes=3), tmp_path / 'teacher',
                                 data_cfg=reading)
    folder = image_folder(tmp_path, classes=3)
    plan = plan_distill(str(teacher), str(folder), str(tmp_path / 'a'), epochs=1, val_fraction=0.3)
    assert plan.data['train']['transform'] == 'imagenet' and plan.data['train']['mean'] == [0.5, 0.5, 0.5]
    for role in ('test', 'val'):
        cfg = plan.data[role]['data_cfg']
        assert (cfg['crop_pct'], cfg['interpolation'], cfg['input_size']) == (0.9, 'bicubic', [3, 72, 72])
    test = plan.datasets['test']
    image = test.data[0]['image'].convert('RGB')
    assert torch.equal(test[0][0], eval_transform(dict(reading, input_size=(3, 72, 72)))(image))
    x, _ = plan.datasets['train'][0]
    assert x.shape == (3, 72, 72) and x.min() >= -1.0 - 1e-6  # (v - 0.5) / 0.5: ImageNet's statistics go below -2
    named = plan_distill(str(teacher), str(folder), str(tmp_path / 'b'), epochs=1, transform='imagenet')
    assert named.data == plan_distill(str(teacher), str(folder), str(tmp_path / 'b2'), epochs=1).data  # the default
    chosen = plan_distill(str(teacher), str(folder), str(tmp_path / 'b3'), epochs=1, transform='cifar')
    assert chosen.data['train']['mean'] == chosen.data['test']['mean'] == [0.5, 0.5, 0.5]  # its crop, their mean
    assert 'data_cfg' not in chosen.data['test'] and chosen.datasets['test'][0][0].min() >= -1.0 - 1e-6
    scratch = plan_distill('resnet20_cifar', str(folder), str(tmp_path / 'c'), epochs=1, input_size=72)
    assert 'mean' not in scratch.data['train'] and 'data_cfg' not in scratch.data['test']


def test_distill_notes_integer_labels_that_leave_classes_without_images(tmp_path):
    import datasets
    from PIL import Image
    from jointrd_timm.training.distill import plan_distill
    image = Image.new('RGB', (8, 8))

    def parquet(folder, labels):
        data = datasets.Dataset.from_dict({'img': [image] * len(labels), 'label': labels}, features=datasets.Features(
            {'img': datasets.Image(), 'label': datasets.Value('int64')}))
        (folder / 'data').mkdir(parents=True)
        for split in ('train', 'test'):
            data.to_parquet(str(folder / 'data' / f'{split}-00000-of-00001.parquet'))
        return str(folder)

    skipped = plan_distill('resnet20_cifar', parquet(tmp_path / 'from1', [1, 2, 3, 1, 2, 3]), str(tmp_path / 'a'),
                           epochs=1, input_size=8)
    assert skipped.common['num_classes'] == 4
    assert 'models get 4 outputs, but 1 of those classes have no image in the train split (0)' in skipped.label_note
    dense = plan_distill('resnet20_cifar', parquet(tmp_path / 'from0', [0, 1, 2, 0, 1, 2]), str(tmp_path / 'b'),
                         epochs=1, input_size=8)
    assert dense.label_note is None
    limited = plan_distill('resnet20_cifar', str(tmp_path / 'from0'), str(tmp_path / 'd'), epochs=1, input_size=8,
                           limit=2)  # two images cannot hold every class: still no note, the split has them all
    assert limited.label_note is None
    assert plan_distill('resnet20_cifar', 'sklearn:digits', str(tmp_path / 'c'), epochs=1).label_note is None


def test_the_recorded_distill_command_names_local_folders_absolutely(tmp_path, monkeypatch):
    import timm

    from jointrd_timm.integrations.hub import save_trained_model
    from jointrd_timm.training.distill import plan_distill
    save_trained_model(timm.create_model('resnet20_cifar', num_classes=10, in_chans=1), tmp_path / 'teacher')
    monkeypatch.chdir(tmp_path)
    plan = plan_distill('teacher', 'sklearn:digits', 'runs/out', epochs=1, limit=32)
    words = shlex.split(plan.command)
    assert words[2] == str(tmp_path / 'teacher') and words[words.index('--data') + 1] == 'sklearn:digits'
    assert words[-2:] == ['--output-dir', str(tmp_path / 'runs' / 'out')]
    prefixed = plan_distill('local-dir:teacher', 'sklearn:digits', 'runs/out', epochs=1, limit=32)
    assert shlex.split(prefixed.command)[2] == f'local-dir:{tmp_path / "teacher"}'


def test_a_distill_folder_killed_before_its_first_saved_epoch_is_named_as_such(tmp_path):
    from jointrd_timm.training.distill_inputs import DistillError, check_output
    out = tmp_path / 'out'
    (out / 'teacher').mkdir(parents=True)
    (out / 'teacher.yaml').write_text('train: {}')
    with pytest.raises(DistillError, match=r'holds a distill run stopped before it saved an epoch .*--overwrite'):
        check_output(out, resume=False, overwrite=False)
    (out / 'teacher' / 'last.safetensors').write_bytes(b'')  # an epoch saved: that run continues with --resume
    with pytest.raises(DistillError, match=r'holds another run .*--resume to continue it'):
        check_output(out, resume=False, overwrite=False)


def _class_folders(root, images_per_class):
    from PIL import Image
    for name, count in images_per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new('RGB', (8, 8), (i * 40, 20, 30)).save(root / name / f'{i}.png')


def test_data_sources_datasets_would_misread_are_refused_naming_the_problem(tmp_path, monkeypatch):
    """Before: '' read the current folder as the data; a class folder without images was dropped (one class fewer,
    later indices moved); one class folder lost its label column ('no column "label"'); a file was 'a folder that
    does not exist'; sklearn:<other> was looked up as a relative folder."""
    from jointrd_timm.training.data import load_image_dataset
    monkeypatch.chdir(tmp_path)
    _class_folders(tmp_path / 'here', dict(a=2, b=2))
    for blank in ('', '  '):
        with pytest.raises(InputError, match=r"The dataset source .* is empty: give a folder, a Hub dataset id"):
            load_image_dataset(blank)
    _class_folders(tmp_path / 'gap', dict(a=2, b=0, c=2))
    (tmp_path / 'gap' / 'b' / 'notes.txt').write_text('not an image')
    with pytest.raises(InputError, match=r"class folder\(s\) \['b'\] hold no image"):
        load_image_dataset(str(tmp_path / 'gap'))
    _class_folders(tmp_path / 'split', {'train/a': 2, 'train/b': 2, 'test/a': 1, 'test/b': 1, 'train/c': 0})
    with pytest.raises(InputError, match=r"class folder\(s\) \['c'\] hold no image"):
        load_image_dataset(str(tmp_path / 'split'), 'test')
    _class_folders(tmp_path / 'one', dict(a=3))
    with pytest.raises(InputError, match=r"holds one class folder \('a'\): a classifier needs two classes"):
        load_image_dataset(str(tmp_path / 'one'))
    (tmp_path / 'file.txt').write_text('x')
    with pytest.raises(InputError, match=r'file\.txt is a file, not a folder'):
        load_image_dataset(str(tmp_path / 'file.txt'))
    with pytest.raises(InputError, match=r'sklearn:iris: the one scikit-learn dataset read here is sklearn:digits'):
        load_image_dataset('sklearn:iris')
    # what reads as before: class folders, and a train/ test/ layout whose every class folder has images
    assert load_image_dataset(str(tmp_path / 'here')).num_classes == 2
    shutil.rmtree(tmp_path / 'split' / 'train' / 'c')
    assert len(load_image_dataset(str(tmp_path / 'split'), 'test')) == 2


@pytest.mark.parametrize('override', ['train.train_data_loader.kwargs=5', 'train.optimizer.kwargs=[1]',
                                      'test.test_data_loader=abc', 'train.scheduler.kwargs=0.1'])
def test_a_section_that_is_not_a_mapping_is_refused_naming_its_key(tmp_path, override):
    """Before: `'batch_size' in 5` was a TypeError traceback from the validation itself."""
    key = override.split('=')[0]
    with pytest.raises(ConfigError, match=rf'{key} must be a mapping \(indented key: value lines\), got '):
        load_config(tiny_yaml(tmp_path), [override])


def test_an_unreadable_image_is_an_error_naming_its_file_also_from_a_loader_worker(tmp_path):
    """Before: PIL.UnidentifiedImageError came out of the DataLoader worker as a traceback, naming no option."""
    import datasets
    from jointrd_timm.cli import error_line
    from jointrd_timm.training.data import load_image_dataset
    _class_folders(tmp_path / 'data', dict(a=2, b=2))
    (tmp_path / 'data' / 'b' / 'broken.png').write_bytes(b'notapng')
    data = load_image_dataset(str(tmp_path / 'data'), input_size=8)
    paths = [row['path'] for row in data.data.cast_column('image', datasets.Image(decode=False))['image']]
    broken = next(i for i, path in enumerate(paths) if path.endswith('broken.png'))
    assert all(data[i][0].shape == (3, 8, 8) for i in range(len(data)) if i != broken)  # the others still read
    message = rf"Image {tmp_path}/data/b/broken\.png \(example {broken}\) cannot be read \(UnidentifiedImageError: "
    with pytest.raises(InputError, match=message + r".*replace or remove the file"):
        data[broken]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, [broken]), num_workers=1)
    with pytest.raises(InputError) as e:
        next(iter(loader))
    assert 'DataLoader worker' in str(e.value)
    line = error_line(e.value)
    assert len(line.splitlines()) == 1 and line.startswith(f'Image {tmp_path}/data/b/broken.png (example {broken})')


@pytest.mark.parametrize('override', ['=1', 'train..num_epochs=2', 'train.=2'])
def test_an_override_with_an_empty_key_part_is_not_of_the_form_key_path_value(tmp_path, override):
    """Before: '=1' was "Unknown key(s) ['']", which names no mistake the user can see."""
    with pytest.raises(ConfigError, match=rf"Override '{re.escape(override)}' is not of the form key\.path=value "
                                          r"\(its key path .* has an empty part\)"):
        load_config(tiny_yaml(tmp_path), [override])


def test_a_folder_given_as_the_config_is_named_as_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=rf'{tmp_path} is a folder, not a config file: give the YAML file itself'):
        load_config(tmp_path)
