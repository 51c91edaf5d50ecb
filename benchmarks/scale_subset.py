"""Accuracy at the CPU budget, a seeded CIFAR-10 subset (``accuracy.py subset``): every row a recipe
(``Recipe.replace``) or a method, run for one question.

Questions (``--question``), each with its record and page under benchmarks/results/:

- ``jointrd`` (``cifar10_jointrd``): the residual teacher, its shortcut-free twin alone, the twin with JointRD;
- ``zoo`` (``cifar10_zoo``): the twin trained by each distillation method (KD, FitNets, CAKD, APS, JointRD);
- ``ablation`` (``recipe_ablation``): which recipe brings the twin closest to its teacher, seeds matched by seed
  and teacher (``--name recipe_ablation_<arch>`` for another pair).

Every row trains from the same teacher (cross-entropy at the same budget, trained once per work folder) with the same
data and budget. Last-epoch accuracy on the full CIFAR-10 test set; per-epoch accuracy on a held-out split of train.
Finished runs (final.json) are read back, so an interrupted command resumes; the questions share one work folder.

    python benchmarks/accuracy.py subset --question jointrd                 # resnet56_cifar, 8k images, 5 epochs
    python benchmarks/accuracy.py subset --question ablation --rows jointrd:default alone:default --seeds 0 1
    python benchmarks/accuracy.py subset --question ablation --arch resnet110_cifar --work-name cifar10_resnet110 \\
        --name recipe_ablation_resnet110 --seeds 0 --rows jointrd:default alone:default "twin alone"
    python benchmarks/accuracy.py subset --report-only --name recipe_ablation_resnet110   # the page from its record
"""
import json
import statistics
import time
from pathlib import Path

from filelock import FileLock

import accuracy_pages as pages
from cifar_budget import (ROOT, Row, budget_meta, budget_parser, budget_schedule, check_record, cifar_splits,
                          ensure_teacher, finished, read_run, row_config)
from jointrd_timm.recipes import DEFAULT_RECIPE, get_recipe
from jointrd_timm.training.run_folder import RunFolder

RESULTS = ROOT / 'benchmarks' / 'results'
REFERENCE, DIRAC = get_recipe('reference'), get_recipe('dirac')
FADE50 = DEFAULT_RECIPE.replace(shortcut_fade=0.5)  # the default before its fade moved from 50 % to 80 % of the run
KD_TERM = dict(kd_weight=1.0, kd_temperature=4.0)
TEACHER = Row('teacher', 'teacher')
DEFAULT_ROW = pages.DEFAULT_ROW


def _default(label: str, **fields) -> Row:
    return Row(f'{DEFAULT_ROW}{label}', 'jointrd', DEFAULT_RECIPE.replace(**fields))


_JOINT = dict(eta_min=1.0, teacher_mode='joint')
QUESTIONS = {
    'jointrd': [TEACHER, Row('twin alone', 'alone', REFERENCE), Row('twin + JointRD', 'jointrd', REFERENCE),
                Row('twin + JointRD (1 sampled path)', 'jointrd', REFERENCE.replace(hybrid_paths=1))],
    'zoo': [TEACHER, Row('twin alone', 'alone', REFERENCE), Row('twin + KD', 'kd'), Row('twin + FitNets', 'fitnets'),
            Row('twin + CAKD', 'cakd'), Row('twin + APS', 'aps'), Row('twin + JointRD', 'jointrd', REFERENCE)],
    # run order = table order (the most informative first)
    'ablation': [
        Row('twin alone', 'alone', REFERENCE), Row('JointRD (reference loss)', 'jointrd', REFERENCE),
        Row('twin alone + Dirac', 'alone', DIRAC), Row('JointRD + Dirac', 'jointrd', DIRAC),
        Row('JointRD + Dirac + KD', 'jointrd', DIRAC.replace(**KD_TERM)),
        Row('JointRD + Dirac + teacher init', 'jointrd', DIRAC.replace(init_from_teacher=True)),
        Row('JointRD + teacher init', 'jointrd', REFERENCE.replace(init_from_teacher=True)),
        Row('JointRD + Dirac + margin (lambda 1e-3)', 'jointrd', DIRAC.replace(feature_loss_weight=1e-3)),
        Row('JointRD + Dirac, eta to 0 over 60 %', 'jointrd', DIRAC.replace(eta_min=0.0, eta_horizon_fraction=0.6)),
        Row('JointRD, 1 sampled path', 'jointrd', REFERENCE.replace(hybrid_paths=1)),
        Row('JointRD + Dirac, 1 sampled path', 'jointrd', DIRAC.replace(hybrid_paths=1)),
        Row('JointRD, projections kept (paper variant)', 'jointrd', REFERENCE.replace(keep_projection_shortcuts=True)),
        # shortcut fading (Monti et al. 2018): the twin starts as the teacher, its shortcuts fade over half the run
        Row('JointRD + fade + teacher init', 'jointrd', FADE50), Row('twin alone + fade + teacher init', 'alone', FADE50),
        Row('JointRD + Dirac + fade + teacher init', 'jointrd', FADE50.replace(dirac=True)),
        Row('JointRD + fade (from scratch)', 'jointrd', FADE50.replace(init_from_teacher=False)),
        # the default recipe (jointrd_timm.recipes.DEFAULT_RECIPE) and its baseline
        Row(DEFAULT_ROW, 'jointrd', DEFAULT_RECIPE), Row(pages.ALONE_ROW, 'alone', DEFAULT_RECIPE),
        Row('JointRD + fade + teacher init + KD', 'jointrd', FADE50.replace(**KD_TERM)),
        # the default with one field changed
        _default(' + margin (lambda 1e-3)', feature_loss_weight=1e-3),
        _default(', eta to 0 over 60 %', eta_min=0.0, eta_horizon_fraction=0.6),
        _default(', eta held at 1', eta_min=1.0), _default(', joint teacher', teacher_mode='joint'),
        _default(', eta held at 1, joint teacher', **_JOINT),
        # the joint teacher as the reference's JOINT branch runs it, and each of its first two fields alone
        *(_default(f', eta held at 1, joint teacher{suffix}', **_JOINT, **fields)
          for suffix, fields in pages.JOINT_VARIANT_FIELDS.items()),
        _default(', loss not divided by n', loss_normalization='none'),
        _default(', loss divided by its weights', loss_normalization='weights'),
        _default(', loss per stage', loss_normalization='per_stage'),
        _default(', eta held at 1, loss per stage', eta_min=1.0, loss_normalization='per_stage'),
        Row('JointRD + fade over 100 % + teacher init', 'jointrd', DEFAULT_RECIPE.replace(shortcut_fade=1.0)),
        Row('JointRD + staggered fade over 80 % (window 0.3) + teacher init', 'jointrd',
            DEFAULT_RECIPE.replace(shortcut_fade_window=0.3)),
        _default(', fade power 0.5', shortcut_fade_power=0.5),
        _default(', projections kept (paper variant)', keep_projection_shortcuts=True),
        # fine-tuning learning rate: the teacher-initialised twin starts trained, so lr 0.1 first undoes much of it
        Row('JointRD + fade + teacher init, lr 0.02', 'jointrd', FADE50, lr=0.02),
        # control: the residual teacher itself trained for the same extra budget from its own weights
        Row('control: teacher + same budget again (residual)', 'control'),
    ],
}
RECORD_NAMES = dict(jointrd='cifar10_jointrd', zoo='cifar10_zoo', ablation='recipe_ablation')


def model_config(row: Row, arch: str, teacher_ckpt: str, args) -> tuple:
    """:func:`cifar_budget.row_config` of ``row`` at the CPU budget (``--epochs``, ``--batch-size``, and ``--lr``
    unless the row sets its own)."""
    return row_config(row, arch, teacher_ckpt, budget_schedule(args, lr=row.lr))


class Budget:
    """The runs of one invocation: the work folder, the teacher, the data of each seed (one seed's cached)."""

    def __init__(self, args):
        import torch
        torch.set_num_threads(args.threads)
        self.args, self.work, self._data = args, Path(args.work_dir) / args.work_name, {}
        # trained once (seed 0, same budget) and reused by every row and question of this work folder
        self.teacher = ensure_teacher(args, self.work, seed=0, splits=self.data(0))
        # rows the jointrd question runs at seed 0 are shared with the other questions (same id: same run)
        self.shared = {row.id: row.label for row in QUESTIONS['jointrd']}

    def data(self, seed: int):
        if seed not in self._data:
            self._data.clear()
            self._data[seed] = cifar_splits(self.args.data, self.args.val_size, seed, limit=self.args.train_size)
        return self._data[seed]

    def folder(self, row: Row, seed: int, question: str) -> Path:
        """The run folder of ``row`` at ``seed``: ablation runs name their teacher, so a run made with an earlier
        teacher is never read back as this teacher's."""
        if row.run == 'teacher':
            return self.work / 'teacher'
        if seed == 0 and (question != 'ablation' or row.id in self.shared):
            return self.work / self.shared.get(row.id, row.label)
        suffix = f' t{self.teacher["test_acc"]:.2f}' if question == 'ablation' else ''
        return self.work / ('ablation' if question == 'ablation' else '') / f'{row.label} s{seed}{suffix}'

    def run(self, row: Row, seed: int, folder: Path):
        """Train ``row`` at ``seed`` in ``folder`` unless it finished there; its final metrics and epoch records."""
        if not finished(folder):
            from jointrd_timm.integrations import torchdistill as _registers  # noqa: F401
            from jointrd_timm.training.configs import make_config
            from jointrd_timm.training.runner import train
            args, (train_set, val_set, test_set) = self.args, self.data(seed)
            model, method, extra = model_config(row, args.arch, str(self.work / 'teacher' / 'model'), args)
            start = time.time()
            train(make_config(train_set, test_set, model, method, seed=seed, num_workers=args.workers,
                              val_set=val_set, output_dir=str(folder), **extra),
                  resume=RunFolder(folder).can_resume())  # an interrupted run continues exactly
            print(f'{row.label} seed {seed}: {time.time() - start:.0f} s', flush=True)
        return read_run(folder)


def run_rows(question: str, rows, args, recorded: dict) -> None:
    """The jointrd and zoo questions: each row at one seed, merged into the record's rows, the page rewritten."""
    budget = Budget(args)
    entries = dict(recorded.get('rows', {}))
    seed = args.seeds[0]
    for row in rows:
        final, curve = budget.run(row, seed, budget.folder(row, seed, question))
        entries[row.label] = dict(test_acc=final['test_acc'], val_curve=[c.get('val_acc') for c in curve],
                                  train_loss=[c['train_loss'] for c in curve],
                                  seconds_per_epoch=round(sum(c['seconds'] for c in curve) / len(curve), 1))
        print(row.label, entries[row.label], flush=True)
    order = [row.label for row in QUESTIONS[question]]
    entries = dict(sorted(entries.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    record = dict(meta=budget_meta(args, 'accuracy.py subset'), rows=entries, args=vars(args))
    write_question(question, args.name, record, recorded)


def run_ablation(rows, args, recorded: dict) -> None:
    """The ablation question: each row at each seed (``--seed-major``: every row at the first seed first); the
    record is rewritten after every run, under a lock, so two invocations may train different seeds side by side."""
    budget = Budget(args)
    teacher_acc = budget.teacher['test_acc']
    print(f'teacher {args.arch}: {teacher_acc:.2f} %', flush=True)
    runs, path = recorded.get('runs', {}), RESULTS / f'{args.name}.json'
    order = [(row, seed) for seed in args.seeds for row in rows] if args.seed_major else \
        [(row, seed) for row in rows for seed in args.seeds]
    for row, seed in order:
        folder, key = budget.folder(row, seed, 'ablation'), pages.run_key(row.label, seed, teacher_acc)
        if key in runs and not finished(folder) and not args.rerun:
            print(key, 'recorded:', runs[key], flush=True)  # its work folder is gone: the record stands
            continue
        final, curve = budget.run(row, seed, folder)
        runs[key] = dict(label=row.label, seed=seed, test_acc=final.get('test_acc_folded', final['test_acc']),
                         test_acc_unfolded=final['test_acc'], test_acc_folded=final.get('test_acc_folded'),
                         teacher_test_acc=teacher_acc, val_curve=[c.get('val_acc') for c in curve],
                         bn_recalibrated_batches=final.get('bn_recalibrated_batches'),
                         seconds_per_epoch=round(statistics.median(c['seconds'] for c in curve), 1))
        if row.recipe is not None and row.recipe.jointrd.get('teacher_mode') == 'joint':
            # the teacher trained along: the twin is still compared with the teacher it started from
            runs[key]['joint_teacher_test_acc'] = round(
                joint_teacher_accuracy(folder, args.arch, budget.data(seed)[2]), 2)
        print(key, runs[key], flush=True)
        with FileLock(str(RESULTS / f'.{args.name}.lock')):
            on_disk = json.loads(path.read_text()) if path.is_file() else {}
            runs = {**on_disk.get('runs', {}), key: runs[key]}
            write_question('ablation', args.name, dict(runs=runs, meta=budget_meta(args, 'accuracy.py subset')),
                           on_disk)


def write_question(question: str, name: str, record: dict, previous: dict, report_only: bool = False) -> None:
    """Write the record, page and plot of ``question`` as ``name``: a report rewrite keeps the recorded meta; an
    ablation record lists every command that added runs to it."""
    meta, before = record['meta'], previous.get('meta', {})
    if report_only:
        meta.update({k: before[k] for k in ('command', 'budget', 'date', 'machine', 'torch') if k in before})
    if question == 'ablation':
        commands = before.get('commands', [])
        meta['commands'] = commands if report_only or meta['command'] in commands else commands + [meta['command']]
    labels = {row.label: row for row in QUESTIONS[question]}
    pages.write_page(question, name, record, labels, RESULTS)


def joint_teacher_accuracy(folder: Path, arch: str, test_set, batch_size: int = 256) -> float:
    """Test accuracy (%) of the teacher at the end of a joint-teacher run."""
    from jointrd_timm.io import top1_accuracy
    return top1_accuracy(load_joint_teacher(folder, arch), test_set, batch_size)


def load_joint_teacher(folder: Path, arch: str):
    """The teacher at the end of a joint-teacher run, read from the run's last checkpoint (the JointRD module's
    ``teacher.*`` tensors), in eval mode."""
    import timm
    from jointrd_timm.io import load_weights
    return load_weights(timm.create_model(arch, num_classes=10), Path(folder) / 'last.safetensors', part='teacher').eval()


def question_of(record: dict) -> str:
    """The question a record answers (records written before ``meta['question']`` are told by their shape)."""
    if 'question' in record.get('meta', {}):
        return record['meta']['question']
    return 'ablation' if 'runs' in record else 'zoo' if 'xu2017_cifar10_error' in record else 'jointrd'


def select_rows(parser, question: str, names) -> list:
    """The rows of ``question`` named by label or id (``--rows``); all of them by default."""
    rows = QUESTIONS[question]
    if not names:
        return list(rows)
    by_name = {**{row.id: row for row in rows}, **{row.label: row for row in rows}}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        parser.error(f'unknown row(s) {unknown} for --question {question}; rows (label = id): '
                     + '; '.join(f'{row.label} = {row.id}' for row in rows))
    return [by_name[n] for n in names]


def parser():
    p = budget_parser(__doc__, None)
    p.prog = 'accuracy.py subset'
    p.add_argument('--question', choices=sorted(QUESTIONS), default=None,
                   help="what to run (default: the record's question with --report-only, else 'ablation')")
    p.add_argument('--rows', nargs='+', default=None, help='row labels or ids to run (default: every row, in order)')
    p.add_argument('--seeds', type=int, nargs='+', default=None,
                   help='seeds (default: 0 1 for the ablation, 0 for the other questions, which take one)')
    p.add_argument('--seed-major', action='store_true', help='ablation: every row at the first seed first')
    p.add_argument('--work-name', default='cifar10_jointrd', help='run folder under --work-dir (shared by the questions)')
    p.add_argument('--report-only', action='store_true', help='rewrite record, page and plot from the record')
    p.add_argument('--rerun', action='store_true',
                   help='ablation: retrain recorded runs whose work folder is gone (default: keep the recorded result)')
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    args.name = args.name or RECORD_NAMES[args.question or 'ablation']
    path = RESULTS / f'{args.name}.json'
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    if args.report_only:
        if not recorded:
            p.error(f'--report-only: no record {path}')
        write_question(question_of(recorded), args.name, dict(recorded), recorded, report_only=True)
        return
    question = args.question or question_of(recorded) if recorded else args.question or 'ablation'
    args.question = question
    args.seeds = args.seeds or ([0, 1] if question == 'ablation' else [0])
    if question != 'ablation' and len(args.seeds) != 1:
        p.error(f'--question {question} runs one seed (got {args.seeds})')
    check_record(p, args, recorded.get('meta'), path)
    rows = select_rows(p, question, args.rows)
    if question == 'ablation':
        run_ablation(rows, args, recorded)
    else:
        run_rows(question, [TEACHER, *(row for row in rows if row.run != 'teacher')], args, recorded)

