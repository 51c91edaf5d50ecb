"""timm's own scripts (validate.py, train.py, benchmark.py), used unchanged, through `python -m
jointrd_timm.timm_script`: the plugin's models are found through it and not without it, a published twin loads
offline with the data config its config.json states, and the script's exit status is the command's."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import jointrd_timm  # noqa: F401
from jointrd_timm.integrations.hub import model_card
from jointrd_timm.models.catalogue import entry, weights_folder
from jointrd_timm.timm_script import main

TWIN = 'plain_resnet56_cifar.jointrd_full_cifar10'

# a stand-in for timm's validate.py: its public calls, in its order, on a tiny fake dataset
STAND_IN = '''
import argparse
import json
import sys

import numpy as np
import torch
from PIL import Image

import timm
from timm.data import create_transform, resolve_data_config, resolve_model_data_config

parser = argparse.ArgumentParser()
parser.add_argument('--model', required=True)
parser.add_argument('--pretrained', action='store_true')
parser.add_argument('--num-classes', type=int, default=None)
parser.add_argument('--data-dir', required=True)
parser.add_argument('--results-file', required=True)
parser.add_argument('--exit-code', type=int, default=0)


def validate(args):
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes).eval()
    data_config = resolve_data_config(vars(args), model=model)
    transform = create_transform(**data_config)
    data = np.load(f'{args.data_dir}/images.npz')
    images = torch.stack([transform(Image.fromarray(image)) for image in data['images']])
    with torch.no_grad():
        predictions = model(images).argmax(1)
    top1 = 100.0 * (predictions == torch.from_numpy(data['labels'])).float().mean().item()
    return dict(argv=sys.argv, data_config=data_config, model_data_config=resolve_model_data_config(model),
                predictions=predictions.tolist(), top1=top1)


if __name__ == '__main__':
    args = parser.parse_args()
    results = validate(args)
    with open(args.results_file, 'w') as f:
        json.dump(results, f)
    print(f'top-1 {results["top1"]:.2f}')
    sys.exit(args.exit_code)
'''


def _fake_cifar(folder):
    rng = np.random.RandomState(0)
    images, labels = rng.randint(0, 256, (16, 32, 32, 3), dtype=np.uint8), rng.randint(0, 10, 16)
    np.savez(folder / 'images.npz', images=images, labels=labels)
    return images


def _run(args, tmp_path):
    """A fresh interpreter, offline, with an empty Hub cache: only weights shipped in the package can load."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'empty-hub-cache'),
               PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, env=env)


def test_timm_script_runs_an_unchanged_timm_script_with_the_published_twins_registered(tmp_path):
    script = tmp_path / 'scripts' / 'validate.py'
    script.parent.mkdir()
    script.write_text(STAND_IN)
    images = _fake_cifar(tmp_path)
    script_args = ['--model', TWIN, '--pretrained', '--num-classes', '10', '--data-dir', str(tmp_path),
                   '--results-file', str(tmp_path / 'results.json')]

    # without the entry point, timm does not know the plugin's models
    plain = _run([str(script), *script_args], tmp_path)
    assert plain.returncode != 0 and 'Unknown model (plain_resnet56_cifar)' in plain.stderr, plain.stderr[-2000:]
    assert not (tmp_path / 'results.json').exists()

    # through it: the same command line reaches the script unchanged, as __main__, and its exit status is returned
    through = _run(['-m', 'jointrd_timm.timm_script', str(script), *script_args, '--exit-code', '3'], tmp_path)
    assert through.returncode == 3, through.stderr[-2000:]
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['argv'] == [str(script), *script_args, '--exit-code', '3']
    assert through.stdout.strip() == f'top-1 {results["top1"]:.2f}'

    # the data config is the one the published config.json states (CIFAR: 32 px, its mean / std, no crop)
    published = json.loads((weights_folder(entry(TWIN)) / 'config.json').read_text())['pretrained_cfg']
    for config in (results['data_config'], results['model_data_config']):
        assert config['input_size'] == published['input_size'] == [3, 32, 32]
        assert config['mean'] == published['mean'] and config['std'] == published['std']
        assert config['crop_pct'] == published['crop_pct'] == 1.0
    assert published['mean'] == pytest.approx([0.4914, 0.4822, 0.4465])

    # and the weights are the published ones: the same predictions as the twin loaded here
    model = timm.create_model(TWIN, pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        expected = model(torch.stack([transform(Image.fromarray(image)) for image in images])).argmax(1)
    assert results['predictions'] == expected.tolist()


def test_a_missing_script_is_named_with_what_to_give(tmp_path, capsys):
    assert main([str(tmp_path / 'validate.py'), '--model', TWIN]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'jointrd_timm.timm_script: error: {tmp_path / "validate.py"}: no such script.')
    assert 'pytorch-image-models' in err
    assert main([]) == 2 and 'usage: python -m jointrd_timm.timm_script SCRIPT' in capsys.readouterr().err


def test_script_runs_in_process_as_main_with_its_folder_on_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    monkeypatch.setattr(sys, 'path', list(sys.path))
    (tmp_path / 'timm_script_helper.py').write_text('NAME = "beside the script"\n')
    (tmp_path / 'script.py').write_text(textwrap.dedent('''
        import sys
        import timm_script_helper as helper
        import timm
        if __name__ == '__main__':
            sys.exit(f'{helper.NAME} {sys.argv[1:]} {timm.is_model("plain_resnet20_cifar")}')
    '''))
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / 'script.py'), '--flag', 'x'])
    assert stopped.value.code == "beside the script ['--flag', 'x'] True"


def test_published_card_says_how_to_reproduce_its_top1_with_timms_validate():
    card = model_card(entry(TWIN))
    command = ('python -m jointrd_timm.timm_script path/to/pytorch-image-models/validate.py --model '
               f'hf-hub:jointrd-timm/{TWIN} --pretrained --dataset hfds/uoft-cs/cifar10 --split test --input-key img\n')
    assert command in card
    local = model_card(dict(entry(TWIN), hf_hub_id=None, local_dir='/runs/x/model', hf_dataset='sklearn:digits'))
    assert 'validate.py' not in local  # timm's dataset readers do not know the embedded digits
    grey = model_card(dict(entry(TWIN), eval=dict(split='test', validate_args=False)))
    assert 'validate.py' not in grey


def test_distill_twin_config_makes_validate_read_the_test_images_as_distill_did(tmp_path):
    """The architecture's pretrained_cfg is CIFAR's at 32 px; a distill run that read its test images otherwise
    (here timm's ImageNet eval transform at 32 px: resize 36, crop 32, ImageNet statistics) saves that reading in
    config.json, so validate.py (timm.data.resolve_data_config from the loaded model) and `jointrd eval` give its
    evaluation's tensors, bit for bit, with no extra options."""
    from jointrd_timm.integrations.hub import save_trained_model
    from jointrd_timm.training import distill
    from jointrd_timm.training.data import dataset_data_cfg, eval_transform
    rng = np.random.RandomState(0)
    for split in ('train', 'test'):
        for label in range(10):
            folder = tmp_path / 'images' / split / f'class{label}'
            folder.mkdir(parents=True)
            Image.fromarray(rng.randint(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / '0.png')
    # a teacher trained here (weights with a reading of their own would give it to every set)
    plan = distill.plan_distill('resnet20_cifar', str(tmp_path / 'images'), str(tmp_path / 'out'), epochs=1,
                                image_column='image', transform='imagenet', input_size=32)
    test_set = plan.datasets['test']
    data_cfg = dataset_data_cfg(test_set, 3)
    assert data_cfg == dict(input_size=(3, 32, 32), interpolation='bilinear', crop_pct=0.88, crop_mode='center',
                            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    folder = save_trained_model(timm.create_model('plain_resnet20_cifar', num_classes=10), tmp_path / 'twin',
                                data_cfg=data_cfg)
    twin = timm.create_model(f'local-dir:{folder}', pretrained=True)
    for transform in (timm.data.create_transform(**timm.data.resolve_data_config({}, model=twin)),
                      eval_transform(twin.pretrained_cfg)):
        for index in range(len(test_set)):
            image = test_set.data[index]['image'].convert('RGB')
            assert torch.equal(transform(image), test_set[index][0])
    card = model_card(dict(entry(TWIN), eval=dict(split='test', image_column='image', validate_args=True)))
    assert '--split test --input-key image\n' in card and '--img-size' not in card
