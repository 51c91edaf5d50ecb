"""Every published model's top-1, reproduced by timm's own validate.py (unchanged) through the plugin's entry point.

For each ``registry/*.json`` entry this runs, in a fresh process,

    python -m jointrd_timm.timm_script VALIDATE --model <name> --pretrained --dataset hfds/<DATA> --split test
        --input-key img --device cpu --results-file <tmp>

and compares the top-1 it prints with the card's ``metrics.top1_test``. ``--timm-scripts`` is a checkout of
pytorch-image-models (its validate.py is run as it is); ``--data`` the CIFAR-10 copy that ``datasets.load_dataset``
reads (the Hub's uoft-cs/cifar10 or a local copy). Writes benchmarks/results/timm_validate.{json,md}.

    python benchmarks/timm_validate.py --timm-scripts path/to/pytorch-image-models --data ../shared/datasets/cifar10
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from report import write_report

ROOT = Path(__file__).resolve().parents[1]


def validate(script: Path, name: str, data: str, entry: dict, threads: int) -> dict:
    """The top-1 of ``name`` by ``script`` (timm's validate.py) through ``jointrd_timm.timm_script``."""
    evaluation = entry.get('eval', {})
    if Path(data).expanduser().exists():  # a local copy: the script runs in a scratch folder, give it the full path
        data = str(Path(data).expanduser().resolve())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'results.json'
        cmd = [sys.executable, '-m', 'jointrd_timm.timm_script', str(script), '--model', name, '--pretrained',
               '--dataset', f'hfds/{data}', '--split', evaluation.get('split', 'test'),
               '--input-key', evaluation.get('image_column', 'img'), '--device', 'cpu', '--workers', '0',
               '--results-file', str(out), '--results-format', 'json']
        env = dict(__import__('os').environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE='1')
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        if done.returncode != 0:
            return dict(error=(done.stderr or done.stdout)[-2000:])
        result = json.loads(out.read_text())
    return dict(top1=float(result['top1']))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--timm-scripts', required=True, help='a pytorch-image-models checkout (holding validate.py)')
    p.add_argument('--data', default=str(ROOT.parent / 'shared/datasets/cifar10'))
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--only', nargs='+', default=None, metavar='NAME',
                   help='validate only these registry entries (e.g. one just republished); the rows of the others are '
                        'kept from the existing record where their card still states the same top-1')
    args = p.parse_args()
    script = Path(args.timm_scripts) / 'validate.py'
    if not script.is_file():
        raise SystemExit(f'--timm-scripts {args.timm_scripts}: no validate.py there; give a pytorch-image-models '
                         'checkout.')
    entries = [json.loads(path.read_text()) for path in sorted((ROOT / 'registry').glob('*.json'))]
    unknown = sorted(set(args.only or ()) - {entry['name'] for entry in entries})
    if unknown:
        raise SystemExit(f'--only {" ".join(unknown)}: not in registry/; its entries: '
                         f'{", ".join(entry["name"] for entry in entries)}.')
    record = ROOT / 'benchmarks' / 'results' / 'timm_validate.json'
    kept = {r['name']: r for r in json.loads(record.read_text())['rows']} if args.only and record.is_file() else {}
    rows = []
    for entry in entries:
        previous = kept.get(entry['name'])
        if args.only and entry['name'] not in args.only:
            if previous is None or previous['card_top1'] != entry['metrics']['top1_test']:
                raise SystemExit(f'--only: {entry["name"]} has no row for its current card in {record.name}; '
                                 'validate it too.')
            rows.append(previous)
            continue
        result = validate(script, entry['name'], args.data, entry, args.threads)
        card = entry['metrics']['top1_test']
        row = dict(name=entry['name'], card_top1=card, **result)
        if 'top1' in result:
            row['difference'] = round(result['top1'] - card, 3)
        rows.append(row)
        print(row, flush=True)
    lines = ["# timm's validate.py reproduces every published card", '',
             "Each model of `registry/` evaluated by timm's own `validate.py`, unchanged, through "
             '`python -m jointrd_timm.timm_script` (which registers the plugin\'s models in timm, then runs the script): '
             f'`--pretrained` loads the weights shipped in the package, `--dataset hfds/<CIFAR-10>` the 10,000 test '
             'images, preprocessing from the model\'s pretrained_cfg. The card\'s top-1 comes from the project\'s own '
             'evaluation (`jointrd eval`).', '',
             '| model | card top-1 % | validate.py top-1 % | difference |', '|---|---|---|---|']
    for r in rows:
        got = f'{r["top1"]:.3f}' if 'top1' in r else f'failed: {r["error"].splitlines()[-1][:120]}'
        lines.append(f'| {r["name"]} | {r["card_top1"]:.2f} | {got} | {r.get("difference", "")} |')
    write_report('timm_validate', dict(meta=dict(validate_py=str(script.name)), rows=rows), lines)


if __name__ == '__main__':
    main()
