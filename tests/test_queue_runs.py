"""benchmarks/queue_runs.py: a plan run a few commands at a time until a deadline, and what it packs."""
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import queue_runs  # noqa: E402

FAKE = '''
import argparse, json, sys, time
from pathlib import Path
p = argparse.ArgumentParser()
p.add_argument('--out'); p.add_argument('--epochs', type=int, default=1); p.add_argument('--sleep', type=float, default=0)
p.add_argument('--mb', type=float, default=0.1); p.add_argument('--fail', action='store_true')
a = p.parse_args()
out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
print('progress\\rprogress 50%\\rdone epoch'); sys.stdout.flush()
for e in range(1, a.epochs + 1):
    with open(out / 'metrics.jsonl', 'a') as f:
        f.write(json.dumps(dict(epoch=e)) + '\\n')
    time.sleep(a.sleep)
if a.fail:
    raise SystemExit('failed on purpose')
(out / 'model').mkdir(exist_ok=True)
(out / 'model' / 'model.safetensors').write_bytes(b'0' * int(a.mb * 1e6))
(out / 'final.json').write_text(json.dumps(dict(epochs=a.epochs, test_acc=50.0)))
'''


def _setup(tmp_path, lines):
    script = tmp_path / 'fake.py'
    script.write_text(FAKE)
    plan = tmp_path / 'plan.txt'
    plan.write_text('# a comment line\n\n' + '\n'.join(lines) + '\n')
    runs = tmp_path / 'runs'
    return ['--script', str(script), '--runs', str(runs), '--logs', str(tmp_path / 'logs'), str(plan)], runs


def _members(path):
    with tarfile.open(path) as tar:
        return sorted(tar.getnames())


def test_a_plan_runs_in_order_a_few_at_a_time_and_packs_records_and_weights(tmp_path):
    runs = tmp_path / 'runs'
    old = runs / 'arch' / 'old-run'  # written before the queue started: not packed
    old.mkdir(parents=True)
    (old / 'final.json').write_text('{}')
    os.utime(old / 'final.json', (time.time() - 100, time.time() - 100))
    args, runs = _setup(tmp_path, [f'--out {runs}/arch/a --epochs 2 --sleep 0.5 --mb 0.6  # trailing comment',
                                   f'--out {runs}/arch/b --epochs 1 --mb 0.6',
                                   f'--out {runs}/arch/c --epochs 1 --mb 0.6',
                                   f'--out {runs}/arch/d --fail'])
    out = tmp_path / 'out'
    summary = queue_runs.main(args + ['--parallel', '2', '--deadline', '60', '--pack', str(out), '--chunk-mb', '1.0',
                                      '--max-chunks', '2'])
    status = summary['commands']
    assert [status[n]['rc'] for n in (1, 2, 3, 4)] == [0, 0, 0, 1]
    assert status[1]['started'] == status[2]['started'] == 0  # two at once
    assert status[3]['started'] >= status[2]['started'] + status[2]['seconds'] - 0.5  # the third when one ended
    assert summary['epochs_done'] == {'arch/a': 2, 'arch/b': 1, 'arch/c': 1, 'arch/d': 1}
    records = _members(out / 'records.tar')
    assert 'arch/old-run/final.json' not in records
    assert {'arch/a/final.json', 'arch/a/metrics.jsonl', 'arch/d/metrics.jsonl', 'status.json',
            'logs/04.tail'} <= set(records)
    assert 'arch/d/final.json' not in records
    with tarfile.open(out / 'records.tar') as tar:
        tail = tar.extractfile('logs/04.tail').read().decode()
        packed = json.loads(tar.extractfile('status.json').read())
    assert 'failed on purpose' in tail and 'progress 50%' in tail.splitlines()  # carriage returns read as lines
    assert packed['commands']['4']['rc'] == 1
    # 0.6 MB a run in chunks under 1 MB, at most 2: one run a chunk, the third left out and named
    assert [_members(out / f'weights-{n}.tar') for n in (1, 2)] == [['arch/a/model/model.safetensors'],
                                                                    ['arch/b/model/model.safetensors']]
    assert not (out / 'weights-3.tar').exists() and summary['weights_left_out'] == ['arch/c']
    from jointrd_timm.io import TMP_MARK
    assert not [p for p in out.iterdir() if TMP_MARK in p.name]  # no temporary file left behind


def test_the_deadline_stops_what_runs_and_leaves_the_rest_unstarted(tmp_path):
    args, _ = _setup(tmp_path, [f'--out {tmp_path}/runs/x/slow --epochs 50 --sleep 0.2',
                                f'--out {tmp_path}/runs/x/never'])
    start = time.time()
    summary = queue_runs.main(args + ['--parallel', '1', '--deadline', '1.5', '--pack', str(tmp_path / 'out')])
    assert time.time() - start < 30
    assert summary['commands'][1]['rc'] == 'stopped at the deadline'
    assert summary['commands'][2]['rc'] == 'not started'
    assert 1 <= summary['epochs_done']['x/slow'] < 50  # its epochs so far are packed
    assert 'x/slow/metrics.jsonl' in _members(tmp_path / 'out' / 'records.tar')
    assert not (tmp_path / 'out' / 'weights-1.tar').exists()  # nothing finished


def test_plan_errors_name_the_file_and_line(tmp_path):
    plan = tmp_path / 'plan.txt'
    plan.write_text('# only comments\n\n')
    with pytest.raises(SystemExit, match=r'plan.txt: no command in the plan'):
        queue_runs.read_plan(plan)
    plan.write_text('full --arch x\nfull --variant "unclosed\n')
    with pytest.raises(SystemExit, match=r'plan.txt:2: No closing quotation'):
        queue_runs.read_plan(plan)
    with pytest.raises(SystemExit, match='--parallel must be >= 1'):
        queue_runs.main([str(plan), '--parallel', '0'])


def test_what_runs_is_packed_every_so_often_not_only_when_a_command_ends(tmp_path):
    script = tmp_path / 'fake.py'
    script.write_text(FAKE)
    calls = []
    status = queue_runs.run_queue([['--out', str(tmp_path / 'r'), '--epochs', '8', '--sleep', '0.25']], 1, 30,
                                  tmp_path / 'logs', script, on_change=lambda s: calls.append(time.time()),
                                  every=0.4)
    assert status[1]['rc'] == 0 and status[1]['seconds'] >= 2
    assert len(calls) >= 4  # about every 0.4 s over 2 s, plus the end
