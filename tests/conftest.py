"""Shared helpers: tiny data and configs built on the fly (no download, no shared/ datasets)."""
import os
import textwrap
from pathlib import Path

import pytest
import torch

# Under pytest-xdist (the README's `-n 2`) each worker is one core's worth of work: one torch thread per worker, and
# the same for the subprocesses the tests start (CLI, torchrun), so that workers do not oversubscribe the cores.
if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)
    os.environ['OMP_NUM_THREADS'] = '1'
else:
    torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]


def torchrun(args, timeout: int = 300):
    """``python -m torch.distributed.run --nproc_per_node 2 ARGS`` from the repository root, on a free port (two
    2-process tests on the default port collide under pytest-xdist; torchrun's --master_port 0 hangs the static
    rendezvous), with one torch thread per process."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONWARNINGS='ignore', TQDM_DISABLE='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port), *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def tiny_yaml(tmp_path: Path, method: str = 'jointrd', epochs: int = 2, limit: int = 64, batch_size: int = 16,
              norm_layer: str = 'batchnorm2d', extra_jointrd: str = '', teacher_checkpoint: str = '') -> Path:
    """A torchdistill YAML on sklearn's digits (8x8, 1 channel) with resnet20_cifar / its twin."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    dataset = f"""
    datasets:
      &train digits/train: !import_call
        key: 'jointrd_timm.training.data.load_image_dataset'
        init:
          kwargs: {{source: 'sklearn:digits', split: 'train', recipe: 'tensor', input_size: 8, channels: 1, limit: {limit}}}
      &test digits/test: !import_call
        key: 'jointrd_timm.training.data.load_image_dataset'
        init:
          kwargs: {{source: 'sklearn:digits', split: 'test', recipe: 'tensor', input_size: 8, channels: 1, limit: 32}}
    """
    model_args = f"num_classes: 10, in_chans: 1, norm_layer: '{norm_layer}'"
    ckpt = f", checkpoint: '{teacher_checkpoint}'" if teacher_checkpoint else ''
    if method in ('cakd', 'aps', 'jointrd-adv'):
        key = {'cakd': 'cakd_model', 'aps': 'aps_model', 'jointrd-adv': 'jointrd_model'}[method]
        extra = ("jointrd: {eta_min: 0.5, eta_horizon: 2, adversarial_weight: 1.0, discriminator: {milestones: [1]}}"
                 if method == 'jointrd-adv' else 'discriminator: {lr: 0.01, milestones: [1]}')
        models = f"""
    models:
      model:
        key: '{key}'
        kwargs:
          teacher: {{model_name: 'resnet20_cifar', {model_args}{ckpt}}}
          student: {{model_name: 'plain_resnet20_cifar', {model_args}}}
          {extra}
        dst_ckpt: '{tmp_path}/td.pt'
    """
        model_section = "pre_epoch_process: 'jointrd_pre_epoch_process'\n      model: {forward_proc: 'forward_batch_target'}"
        criterion = "method: {criterion: {key: 'MethodLoss', kwargs: {module_path: '.'}}, weight: 1.0}"
    elif method == 'jointrd':
        models = f"""
    models:
      model:
        key: 'jointrd_model'
        kwargs:
          teacher: {{model_name: 'resnet20_cifar', {model_args}{ckpt}}}
          student: {{model_name: 'plain_resnet20_cifar', {model_args}}}
          jointrd: {{eta_min: 0.5, eta_horizon: 2{extra_jointrd}}}
        dst_ckpt: '{tmp_path}/td.pt'
    """
        model_section = "pre_epoch_process: 'jointrd_pre_epoch_process'\n      model: {forward_proc: 'forward_batch_target'}"
        criterion = "jointrd: {criterion: {key: 'MethodLoss', kwargs: {module_path: '.'}}, weight: 1.0}"
    else:
        models = f"""
    models:
      model:
        key: 'timm_model'
        kwargs: {{model_name: 'plain_resnet20_cifar', {model_args}}}
        dst_ckpt: '{tmp_path}/td.pt'
    """
        model_section = "model: {forward_proc: 'forward_batch_only'}"
        criterion = ("ce: {criterion: {key: 'CrossEntropyLoss', kwargs: {reduction: 'mean'}}, criterion_wrapper: "
                     "{key: 'SimpleLossWrapper', kwargs: {input: {is_from_teacher: False, module_path: '.', io: 'output'}, "
                     "target: {uses_label: True}}}, weight: 1.0}")
    text = f"""
    dependencies:
      - name: 'jointrd_timm'
    {dataset}
    {models}
    train:
      log_freq: 100
      num_epochs: {epochs}
      {model_section}
      train_data_loader:
        dataset_id: *train
        requires_supp: True
        sampler: {{class_or_func: !import_get {{key: 'torch.utils.data.RandomSampler'}}, kwargs: }}
        kwargs: {{batch_size: {batch_size}, num_workers: 0}}
      val_data_loader:
        dataset_id: *test
        sampler: &val {{class_or_func: !import_get {{key: 'torch.utils.data.SequentialSampler'}}, kwargs: }}
        kwargs: {{batch_size: 32, num_workers: 0}}
      optimizer: {{key: 'SGD', kwargs: {{lr: 0.05, momentum: 0.9, weight_decay: 0.0005}}}}
      scheduler: {{key: 'MultiStepLR', kwargs: {{milestones: [1], gamma: 0.1}}}}
      criterion:
        key: 'WeightedSumLoss'
        kwargs:
          sub_terms:
            {criterion}
    test:
      test_data_loader:
        dataset_id: *test
        sampler: *val
        kwargs: {{batch_size: 32, num_workers: 0}}
    runner:
      seed: 0
      output_dir: '{tmp_path}/out'
    """
    path = tmp_path / f'{method}.yaml'
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def digits_yaml(tmp_path):
    return tiny_yaml(tmp_path)
