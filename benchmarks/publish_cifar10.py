"""Publish the CIFAR-10 teacher and JointRD twin trained by cifar10_jointrd.py into registry/ (timm Hub format +
catalogue entries whose metrics are copied from benchmarks/results/cifar10_jointrd.json).

    python benchmarks/publish_cifar10.py [--name cifar10_jointrd]
Then: jointrd eval plain_resnet56_cifar.jointrd_cifar10 --dataset ../shared/datasets/cifar10
"""
import argparse
import json
from pathlib import Path

import jointrd_timm  # noqa: F401
from jointrd_timm.integrations.hub import load_model, model_card, save_trained_model

ROOT = Path(__file__).resolve().parents[1]
ORG = 'jointrd-timm'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--name', default='cifar10_jointrd')
    args = parser.parse_args()
    recorded = json.loads((ROOT / 'benchmarks/results' / f'{args.name}.json').read_text())
    arch = recorded['args']['arch']
    work = ROOT / 'benchmarks/work' / args.name
    common = dict(dataset='CIFAR-10 (Krizhevsky 2009; uoft-cs/cifar10 layout)', hf_dataset='uoft-cs/cifar10',
                  num_classes=10, license='apache-2.0',
                  eval=dict(dataset='uoft-cs/cifar10 or ../shared/datasets/cifar10', split='test', transform='cifar'))
    training = dict(command=recorded['meta']['command'], budget=recorded['meta']['budget'],
                    source=f'benchmarks/results/{args.name}.json')
    entries = [
        dict(common, architecture=arch, tag='ce_cifar10', teacher='(none: the residual teacher itself)',
             method='cross-entropy (teacher pre-training)', run='teacher',
             description=f'Residual teacher {arch} trained on CIFAR-10 at CPU scale by jointrd-timm\'s benchmark.'),
        dict(common, architecture=f'plain_{arch}', tag='jointrd_cifar10', teacher=f'{arch}.ce_cifar10',
             method='JointRD (Li et al., "Residual Distillation", NeurIPS 2020) with a frozen teacher',
             run='twin + JointRD',
             description=f'Shortcut-free twin of {arch} (no residual additions at all) trained with JointRD.'),
    ]
    for e in entries:
        run = e.pop('run')
        e['name'] = f'{e["architecture"]}.{e["tag"]}'
        e['hf_hub_id'] = f'{ORG}/{e["name"]}'
        e['weights'] = f'weights/{e["name"]}'
        e['training'] = training
        e['metrics'] = dict(top1_test=recorded['rows'][run]['test_acc'], source=training['source'],
                            split='test (10,000 images), last epoch')
        folder = work / run / 'model'
        save_trained_model(load_model(str(folder)), ROOT / 'registry' / e['weights'], model_card=model_card(e))
        (ROOT / 'registry' / f'{e["name"]}.json').write_text(json.dumps(e, indent=1) + '\n')
        print('published', e['name'], e['metrics']['top1_test'])


if __name__ == '__main__':
    main()
