"""Which recipe brings the shortcut-free twin closest to its teacher? An ablation on CIFAR-10 at CPU scale.

Teacher resnet56_cifar (cross-entropy, trained once and reused), student its fully plain twin
plain_resnet56_cifar; every row the same data, recipe and budget as cifar10_jointrd.py / cifar10_zoo.py (their runs
are shared: same work folder). Each row changes one or two config fields; every row is a torchdistill config
built by ``jointrd_timm.training.configs.make_config`` and run by the project's runner. Last-epoch accuracy on
the full CIFAR-10 test set; Dirac rows are evaluated after folding the parametrisation into plain convs (the
runner records both, and they agree).

Rows run in the order given (most informative first) and seeds inside a row; finished runs (final.json) are read
back, so the script resumes and can be stopped at any time: results are rewritten after every run. A missing
teacher is trained first (seed 0, same budget). Every run records the teacher it learned from, and rows are
compared by the gap to that teacher; runs already recorded in the results JSON for the current teacher are kept
even when their work folder is gone (--rerun retrains them). The default recipe (DEFAULT_ROW) is the one of
yamls/ and `jointrd demo`; PAIRS match each JointRD row with the twin alone given the same ingredients.

    python benchmarks/recipe_ablation.py                     # every row, seeds 0 and 1 (~4 h on 2 cores)
    python benchmarks/recipe_ablation.py --rows "JointRD + fade over 80 % + teacher init" \
        "twin alone + fade over 80 % + teacher init" --seeds 0 1          # the default recipe and its baseline
    python benchmarks/recipe_ablation.py --arch resnet110_cifar --name recipe_ablation_resnet110 \
        --work-name cifar10_resnet110 --seeds 0 --rows "JointRD + fade over 80 % + teacher init" \
        "twin alone + fade over 80 % + teacher init" "twin alone"         # depth 110 (own teacher)
    python benchmarks/recipe_ablation.py --report-only                # rewrite outputs from the record (at the
                                                                      # pair and budget the record was measured at)
"""
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from filelock import FileLock

from jointrd_timm.recipes import DEFAULT_RECIPE, REFERENCE_JOINTRD, SCHEDULES, teacher_sgd
from report import pyplot, write_report
from cifar_budget import (ROOT, budget_parser, budget_settings, check_record, cifar_splits, command_line, ensure_teacher,
                          finished, read_run)

DEFAULT_ROW = 'JointRD + fade over 80 % + teacher init'  # jointrd_timm.recipes.DEFAULT_RECIPE
JOINTRD_REFERENCE = dict(REFERENCE_JOINTRD)
DEFAULT_SHORTCUT_FADE = DEFAULT_RECIPE.shortcut_fade


# suffix of the joint-teacher row -> the JointRDConfig fields that make it the reference's (see JOINT_ROW)
JOINT_VARIANT_FIELDS = {
    ' as the reference (teacher step first, running BN, margin per epoch)': dict(
        joint_step_order='teacher_first', hybrid_teacher_bn='running', margin_refresh='epoch'),
    ', teacher step first': dict(joint_step_order='teacher_first'),
    ', tails on running BN statistics': dict(hybrid_teacher_bn='running'),
}
JOINT_ROW = f'{DEFAULT_ROW}, eta held at 1, joint teacher'


def default_with(**fields):
    """The row of ``DEFAULT_RECIPE.replace(**fields)`` (recipe or JointRDConfig fields): JointRD, the fading twin
    started from the teacher."""
    recipe = DEFAULT_RECIPE.replace(**fields)
    return ('jointrd', recipe.twin_kwargs(), recipe.jointrd_fields(), dict(init_student_from_teacher=True))


def rows_spec():
    """label -> (method, student kwargs, jointrd fields, jointrd_model extras). Order = run order."""
    ref = JOINTRD_REFERENCE
    return {
        'twin alone': ('ce', {}, None, {}),
        'JointRD (reference loss)': ('jointrd', {}, ref, {}),
        'twin alone + Dirac': ('ce', dict(dirac=True), None, {}),
        'JointRD + Dirac': ('jointrd', dict(dirac=True), ref, {}),
        'JointRD + Dirac + KD': ('jointrd', dict(dirac=True), dict(ref, kd_weight=1.0, kd_temperature=4.0), {}),
        'JointRD + Dirac + teacher init': ('jointrd', dict(dirac=True), ref, dict(init_student_from_teacher=True)),
        'JointRD + teacher init': ('jointrd', {}, ref, dict(init_student_from_teacher=True)),
        'JointRD + Dirac + margin (lambda 1e-3)': ('jointrd', dict(dirac=True), dict(ref, feature_loss_weight=1e-3), {}),
        'JointRD + Dirac, eta to 0 over 60 %': ('jointrd', dict(dirac=True),
                                                 dict(ref, eta_min=0.0, eta_horizon_fraction=0.6), {}),
        'JointRD, 1 sampled path': ('jointrd', {}, dict(ref, hybrid_paths=1), {}),
        'JointRD + Dirac, 1 sampled path': ('jointrd', dict(dirac=True), dict(ref, hybrid_paths=1), {}),
        'JointRD, projections kept (paper variant)': ('jointrd', dict(keep_projection_shortcuts=True), ref, {}),
        # shortcut fading (Monti et al. 2018): the twin starts as the teacher (its weights, shortcuts scaled by s = 1)
        # and s fades to 0 over the first half of the run; deployed with the shortcuts removed
        'JointRD + fade + teacher init': ('jointrd', dict(shortcut_fade=True), dict(ref, shortcut_fade=0.5),
                                          dict(init_student_from_teacher=True)),
        'twin alone + fade + teacher init': ('ce', {}, None, dict(shortcut_fade=0.5, teacher_init=True)),
        'JointRD + Dirac + fade + teacher init': ('jointrd', dict(dirac=True, shortcut_fade=True),
                                                  dict(ref, shortcut_fade=0.5), dict(init_student_from_teacher=True)),
        'JointRD + fade (from scratch)': ('jointrd', dict(shortcut_fade=True), dict(ref, shortcut_fade=0.5), {}),
        # the default recipe (jointrd_timm.recipes.DEFAULT_RECIPE) and its baseline
        'JointRD + fade over 80 % + teacher init': default_with(),
        'twin alone + fade over 80 % + teacher init': ('ce', {}, None, dict(shortcut_fade=DEFAULT_SHORTCUT_FADE,
                                                                            teacher_init=True)),
        'JointRD + fade + teacher init + KD': ('jointrd', dict(shortcut_fade=True),
                                               dict(ref, shortcut_fade=0.5, kd_weight=1.0, kd_temperature=4.0),
                                               dict(init_student_from_teacher=True)),
        # the default recipe with one more field changed: the margin feature loss, eta faded to 0 or held at 1 (the
        # hybrid paths' weight for the whole run), a slower fade (the s = 0 phase shrinks to the last step), the
        # paper's variant that keeps the projection shortcuts
        f'{DEFAULT_ROW} + margin (lambda 1e-3)': default_with(feature_loss_weight=1e-3),
        f'{DEFAULT_ROW}, eta to 0 over 60 %': default_with(eta_min=0.0, eta_horizon_fraction=0.6),
        f'{DEFAULT_ROW}, eta held at 1': default_with(eta_min=1.0),
        # the reference code's JOINT branch: the teacher keeps training on its own cross-entropy during the run (the
        # hybrid paths still never move it), so the twin's stage outputs are read by later stages that keep improving
        f'{DEFAULT_ROW}, joint teacher': default_with(teacher_mode='joint'),
        # depth 110's best recipe (eta held at 1) with the joint teacher as well
        f'{DEFAULT_ROW}, eta held at 1, joint teacher': default_with(eta_min=1.0, teacher_mode='joint'),
        # that joint teacher as the reference's JOINT branch runs it (issue 23): the teacher's own SGD step first
        # (its optimizer the twin's, filled in at run time: JOINT_TEACHER_OPTIMIZER), then the hybrid paths through
        # the updated teacher in eval mode (running BN statistics), the margin refreshed every epoch (no effect at
        # lambda 0); and each of the first two fields alone
        **{f'{JOINT_ROW}{suffix}': default_with(eta_min=1.0, teacher_mode='joint', **fields)
           for suffix, fields in JOINT_VARIANT_FIELDS.items()},
        # the loss normalisation (JointRDConfig.loss_normalization): the reference divides the sums by n stages, so
        # the twin's own CE has weight 1/n; 'none' keeps it at 1 (the twin alone's objective, hybrid terms added),
        # 'weights' divides by 1 + eta (n - 1) (a weighted mean of the terms)
        f'{DEFAULT_ROW}, loss not divided by n': default_with(loss_normalization='none'),
        f'{DEFAULT_ROW}, loss divided by its weights': default_with(loss_normalization='weights'),
        # per stage (DECISION, JointRDConfig): nothing divided; stage j's gradient divided by 1 + eta (n - j), the
        # weight of the terms reaching it (the last stage at the twin alone's rate, the first at 'weights')
        f'{DEFAULT_ROW}, loss per stage': default_with(loss_normalization='per_stage'),
        f'{DEFAULT_ROW}, eta held at 1, loss per stage': default_with(eta_min=1.0, loss_normalization='per_stage'),
        'JointRD + fade over 100 % + teacher init': default_with(shortcut_fade=1.0),
        # staggered fade (DECISION in twins.fade.block_scales): the blocks drop their shortcuts one group after
        # another, first block first, each over 30 % of the fade, instead of all together
        'JointRD + staggered fade over 80 % (window 0.3) + teacher init': default_with(shortcut_fade_window=0.3),
        # depth-matched fade (twins.fade.fade_scale): s = cosine ** 0.5 gives resnet110 (18 blocks per stage) the
        # shortcut-path weights s ** N that resnet56 (9 per stage) has under the default fade
        f'{DEFAULT_ROW}, fade power 0.5': default_with(shortcut_fade_power=0.5),
        f'{DEFAULT_ROW}, projections kept (paper variant)': (
            'jointrd', dict(shortcut_fade=True, keep_projection_shortcuts=True),
            dict(ref, shortcut_fade=DEFAULT_SHORTCUT_FADE), dict(init_student_from_teacher=True)),
        # fine-tuning learning rate: the teacher-initialised twin starts trained, so lr 0.1 first undoes much of it
        'JointRD + fade + teacher init, lr 0.02': ('jointrd', dict(shortcut_fade=True), dict(ref, shortcut_fade=0.5),
                                                   dict(init_student_from_teacher=True, lr=0.02)),
        # control: the residual teacher itself trained for the same extra budget from its own weights
        'control: teacher + same budget again (residual)': ('ce', {}, None, dict(continue_teacher=True)),
    }


# variants of the default that change only the loss: the twin alone with the default's ingredients is their baseline
LOSS_VARIANTS = [f'{DEFAULT_ROW} + margin (lambda 1e-3)', f'{DEFAULT_ROW}, eta to 0 over 60 %',
                 f'{DEFAULT_ROW}, eta held at 1', f'{DEFAULT_ROW}, joint teacher',
                 f'{DEFAULT_ROW}, loss not divided by n', f'{DEFAULT_ROW}, loss divided by its weights',
                 f'{DEFAULT_ROW}, loss per stage']
# rows that change one field of the default recipe: each compared with the default's run (same seed and teacher)
DEFAULT_VARIANTS = [*LOSS_VARIANTS, 'JointRD + fade + teacher init',
                    'JointRD + fade over 100 % + teacher init',
                    'JointRD + staggered fade over 80 % (window 0.3) + teacher init', f'{DEFAULT_ROW}, fade power 0.5',
                    f'{DEFAULT_ROW}, projections kept (paper variant)']

# rows measured on the earlier recipe (fade over 50 %, before the default moved to 80 %) that change one field of it:
# each compared with that recipe's run (same seed and teacher)
FADE50_ROW = 'JointRD + fade + teacher init'
FADE50_VARIANTS = ['JointRD + fade + teacher init + KD', 'JointRD + fade + teacher init, lr 0.02',
                   'JointRD + Dirac + fade + teacher init']

# rows that change one field of the default with eta held at 1 (depth 110's best): compared with that row's run
ETA1_ROW = f'{DEFAULT_ROW}, eta held at 1'
ETA1_VARIANTS = [f'{ETA1_ROW}, joint teacher', f'{ETA1_ROW}, loss per stage']

# the joint teacher of depth 110's recipe: ours (one simultaneous update, tails on batch statistics) against the
# reference's JOINT branch (JointRDConfig.joint_step_order / hybrid_teacher_bn / margin_refresh), matched by seed:
#   python benchmarks/recipe_ablation.py --arch resnet110_cifar --name recipe_ablation_resnet110 \
#       --work-name cifar10_resnet110 --seeds 0 1 --rows \
#       "JointRD + fade over 80 % + teacher init, eta held at 1, joint teacher" \
#       "JointRD + fade over 80 % + teacher init, eta held at 1, joint teacher as the reference (teacher step first, \
#       running BN, margin per epoch)"                     (about 2 hours of 2-core CPU per seed pair; not run yet)
JOINT_VARIANTS = [f'{JOINT_ROW}{suffix}' for suffix in JOINT_VARIANT_FIELDS]


def joint_teacher_optimizer(args, lr: float) -> dict:
    """A 'teacher_first' joint teacher's own SGD: the twin's (the budget's run: weight decay 5e-4 as make_config is
    given it, ``args.epochs``, ``lr``)."""
    return teacher_sgd(SCHEDULES['cpu-budget'].replace(epochs=args.epochs, lr=lr, weight_decay=5e-4))


# what JointRD adds: each JointRD row against the twin trained alone with the same ingredients (same seed and teacher)
PAIRS = {'JointRD (reference loss)': 'twin alone', 'JointRD + Dirac': 'twin alone + Dirac',
         'JointRD + fade + teacher init': 'twin alone + fade + teacher init',
         DEFAULT_ROW: 'twin alone + fade over 80 % + teacher init',
         **dict.fromkeys(LOSS_VARIANTS, 'twin alone + fade over 80 % + teacher init')}


def paired(runs, pairs=None):
    """{row: [(seed, teacher, row acc, baseline acc)]} over runs matched by seed and teacher (default: PAIRS, each
    JointRD row against the twin alone with the same ingredients)."""
    out = {}
    for with_rd, alone in (pairs or PAIRS).items():
        by = {(r['seed'], r['teacher_test_acc']): r['test_acc'] for r in runs.values() if r['label'] == alone}
        matched = [(r['seed'], r['teacher_test_acc'], r['test_acc'], by[(r['seed'], r['teacher_test_acc'])])
                   for r in runs.values() if r['label'] == with_rd and (r['seed'], r['teacher_test_acc']) in by]
        if matched:
            out[with_rd] = sorted(matched)
    return out


# runs recorded by cifar10_jointrd.py with exactly these settings (seed 0): reused, not retrained
SHARED_FOLDERS = {('twin alone', 0): 'twin alone', ('JointRD (reference loss)', 0): 'twin + JointRD',
                  ('JointRD, 1 sampled path', 0): 'twin + JointRD (1 sampled path)'}


def main():
    parser = budget_parser(__doc__, 'recipe_ablation')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    parser.add_argument('--rows', nargs='+', default=None, help='row labels to run (default: all, in order)')
    parser.add_argument('--seed-major', action='store_true',
                        help='run every row with the first seed before any second seed')
    parser.add_argument('--work-name', default='cifar10_jointrd')
    parser.add_argument('--report-only', action='store_true',
                        help='rewrite the results (JSON, table, plot) from the recorded runs; train nothing')
    parser.add_argument('--rerun', action='store_true',
                        help='retrain recorded runs whose work folder is gone (default: keep the recorded result)')
    args = parser.parse_args()

    from jointrd_timm.integrations import torchdistill as _registers  # noqa: F401
    from jointrd_timm.training.configs import make_config
    from jointrd_timm.training.runner import train

    torch.set_num_threads(args.threads)
    spec = rows_spec()
    labels = args.rows or list(spec)
    unknown = [x for x in labels if x not in spec]
    if unknown:
        parser.error(f'unknown row(s) {unknown}; rows: {list(spec)}')
    work = Path(args.work_dir) / args.work_name
    out = ROOT / 'benchmarks/results'
    teacher_ckpt = work / 'teacher' / 'model'
    common = dict(num_classes=10)
    results_path = out / f'{args.name}.json'
    recorded = json.loads(results_path.read_text()) if results_path.is_file() else {}
    runs = recorded.get('runs', {})
    check_record(parser, args, recorded.get('meta'), results_path, report_only=args.report_only)
    data_cache = {}
    if args.report_only:
        if not runs:
            parser.error(f'--report-only: no recorded runs in {results_path}')
        write(runs, spec, args, out, record_command=False)
        return

    def datasets(seed):
        if seed not in data_cache:
            data_cache.clear()
            data_cache[seed] = cifar_splits(args, seed)
        return data_cache[seed]

    # trained once (seed 0, same budget, the same run as cifar10_jointrd.py's teacher row) and reused by every row
    teacher_final = ensure_teacher(args, work, seed=0, splits=datasets(0))
    teacher_acc = teacher_final['test_acc']
    # every run records the accuracy of the teacher it was trained from (a retrained teacher is another teacher:
    # CPU training is not bit-reproducible across machines and code versions), and rows are compared by the gap to
    # their teacher
    print(f'teacher {args.arch}: {teacher_acc:.2f} %', flush=True)

    order = [(label, seed) for seed in args.seeds for label in labels] if args.seed_major else \
        [(label, seed) for label in labels for seed in args.seeds]
    for label, seed in order:
        method, student_extra, jointrd, extras = spec[label]
        # the folder names its teacher, so a run made with an earlier teacher is never read back as this teacher's
        folder = work / SHARED_FOLDERS.get((label, seed), f'ablation/{label} s{seed} t{teacher_acc:.2f}')
        key = run_key(label, seed, teacher_acc)
        if key in runs and not finished(folder) and not args.rerun:
            # recorded by an earlier invocation whose work folder is gone: the record stands (--rerun retrains)
            print(key, 'recorded:', runs[key], flush=True)
            continue
        if not finished(folder):
            train_set, val_set, test_set = datasets(seed)
            student = dict(model_name=f'plain_{args.arch}', **common, **student_extra)
            if extras.get('continue_teacher'):
                model = dict(key='timm_model', kwargs=dict(model_name=args.arch, checkpoint=str(teacher_ckpt), **common))
            elif 'shortcut_fade' in extras:
                model = dict(key='fading_model', kwargs=dict(
                    student=student, shortcut_fade=extras['shortcut_fade'],
                    shortcut_fade_window=extras.get('shortcut_fade_window', 1.0),
                    shortcut_fade_power=extras.get('shortcut_fade_power', 1.0),
                    teacher_checkpoint=str(teacher_ckpt) if extras.get('teacher_init') else None))
            elif method == 'ce':
                model = dict(key='timm_model', kwargs=student)
            else:
                if jointrd.get('joint_step_order') == 'teacher_first':
                    jointrd = dict(jointrd, teacher_optimizer=joint_teacher_optimizer(args, extras.get('lr', args.lr)))
                model = dict(key='jointrd_model', kwargs=dict(
                    teacher=dict(model_name=args.arch, checkpoint=str(teacher_ckpt), **common), student=student,
                    jointrd=jointrd, **{k: v for k, v in extras.items() if k != 'lr'}))
            start = time.time()
            train(make_config(train_set, test_set, model, method, epochs=args.epochs, batch_size=args.batch_size,
                              lr=extras.get('lr', args.lr), weight_decay=5e-4, seed=seed, num_workers=args.workers, val_set=val_set,
                              output_dir=str(folder)),
                  resume=(folder / 'last.safetensors').is_file())  # an interrupted run continues exactly
            print(f'{label} seed {seed}: {time.time() - start:.0f} s', flush=True)
        final, curve = read_run(folder)
        runs[key] = dict(label=label, seed=seed, test_acc=final.get('test_acc_folded', final['test_acc']),
                         test_acc_unfolded=final['test_acc'], test_acc_folded=final.get('test_acc_folded'),
                         teacher_test_acc=teacher_acc, val_curve=[c.get('val_acc') for c in curve],
                         bn_recalibrated_batches=final.get('bn_recalibrated_batches'),
                         seconds_per_epoch=round(statistics.median(c['seconds'] for c in curve), 1))
        if jointrd and jointrd.get('teacher_mode') == 'joint' and 'joint_teacher_test_acc' not in runs[key]:
            # the teacher trained along: what the twin is compared with is still the teacher it started from
            runs[key]['joint_teacher_test_acc'] = round(joint_teacher_accuracy(folder, args.arch, datasets(seed)[2]), 2)
        print(key, runs[key], flush=True)
        # two invocations may train different seeds side by side (one torch thread each): the record is re-read under
        # a lock so that neither drops the runs the other recorded since it started
        with FileLock(str(out / f'.{args.name}.lock')):
            on_disk = json.loads(results_path.read_text()).get('runs', {}) if results_path.is_file() else {}
            runs = {**on_disk, key: runs[key]}
            write(runs, spec, args, out)


def load_joint_teacher(folder: Path, arch: str) -> torch.nn.Module:
    """The teacher at the end of a joint-teacher run, read from the run's last checkpoint (the JointRD module's
    ``teacher.*`` tensors), in eval mode."""
    import timm
    from jointrd_timm.training.checkpoint import load_weights
    return load_weights(timm.create_model(arch, num_classes=10), Path(folder) / 'last.safetensors', part='teacher').eval()


def joint_teacher_accuracy(folder: Path, arch: str, test_set, batch_size: int = 256) -> float:
    """Test accuracy (%) of the teacher at the end of a joint-teacher run."""
    from jointrd_timm.io import top1_accuracy
    return top1_accuracy(load_joint_teacher(folder, arch), test_set, batch_size)


def run_key(label: str, seed: int, teacher_acc: float) -> str:
    return f'{label} s{seed} (teacher {teacher_acc:.2f})'


def summarise(runs, spec):
    table = {}
    for label in spec:
        accs = [r['test_acc'] for r in runs.values() if r['label'] == label]
        if accs:
            secs = [r['seconds_per_epoch'] for r in runs.values() if r['label'] == label]
            # the least disturbed run's median epoch: runs that shared the 2 cores with other jobs are slower
            gaps = [r['teacher_test_acc'] - r['test_acc'] for r in runs.values() if r['label'] == label]
            teachers = sorted({r['teacher_test_acc'] for r in runs.values() if r['label'] == label})
            table[label] = dict(mean=statistics.mean(accs), spread=(max(accs) - min(accs)) / 2, n=len(accs),
                                sd=statistics.stdev(accs) if len(accs) > 1 else None, accs=accs,
                                gap=statistics.mean(gaps), teachers=teachers, seconds_per_epoch=min(secs))
    return table


def write(runs, spec, args, out, record_command: bool = True):
    table = summarise(runs, spec)
    meta = dict(command=command_line('recipe_ablation.py', args),
                machine=f'{platform.machine()}, {torch.get_num_threads()} torch threads', torch=torch.__version__,
                budget=f'{args.train_size} train images, {args.epochs} epochs, batch {args.batch_size}, cosine lr '
                       f'{args.lr}', date=time.strftime('%Y-%m-%d'), settings=budget_settings(args))
    teachers = sorted({r['teacher_test_acc'] for r in runs.values()})
    path = out / f'{args.name}.json'
    previous = json.loads(path.read_text())['meta'] if path.is_file() else {}
    commands = previous.get('commands', [])
    meta['commands'] = commands + [meta['command']] if record_command and meta['command'] not in commands else commands
    if not record_command:  # a report rewrite: the budget and date stay those of the runs
        meta.update({k: previous[k] for k in ('command', 'budget', 'date', 'machine') if k in previous})
    pairs = paired(runs)
    variants = paired(runs, dict.fromkeys(DEFAULT_VARIANTS, DEFAULT_ROW))
    fade50 = paired(runs, dict.fromkeys(FADE50_VARIANTS, FADE50_ROW))
    eta1 = paired(runs, dict.fromkeys(ETA1_VARIANTS, ETA1_ROW))
    joint_ref = paired(runs, dict.fromkeys(JOINT_VARIANTS, JOINT_ROW))
    record = dict(meta=meta, teachers=teachers, runs=runs, table=table, paired=pairs, vs_default=variants,
                  vs_fade50=fade50, vs_eta1=eta1, vs_joint=joint_ref)
    alone = table.get('twin alone', {}).get('mean')
    lines = [f'# Recipe ablation: plain_{args.arch} trained from its teacher {args.arch}, CIFAR-10 at CPU scale', '',
             f'Budget per row: {meta["budget"]} (same for every row and for the teacher). Machine: {meta["machine"]}, '
             f'{meta["date"]}. Commands (every run recorded here; finished runs are read back): '
             + '; '.join(f'`{c}`' for c in meta['commands']) + f'. Teacher ({args.arch}, cross-entropy, same budget, '
             f'seed 0) test accuracy: ' + ', '.join(f'**{t:.2f} %**' for t in teachers) + '.', '']
    if len(teachers) > 1:
        lines += ['Runs come from more than one teacher: a work folder was lost between sessions and the teacher '
                  'retrained with the same command (CPU training here is not bit-reproducible across machines and '
                  'code versions). Every run records its teacher; "gap to its teacher" is the mean over the row\'s runs '
                  'of (its teacher - twin), which is what rows are compared by.', '']
    lines += [
             'Accuracy: last epoch, full 10k test set, mean over runs with half the range (±) and the sample '
             'standard deviation (sd) (n = runs; a seed sets the data subset, split and init). Gap = teacher - twin '
             '(negative: the twin is above its teacher). '
             'Dirac rows: evaluated with the parametrisation folded into plain convs.', '',
             's / epoch: median epoch of the least disturbed run of the row (some runs shared the 2 cores with '
             'other jobs; training_cost.md has clean side-by-side step costs).', '',
             '| row | test acc % | ± | sd | n | teacher(s) % | gap to its teacher (points) | vs twin alone | s / epoch |',
             '|---|---|---|---|---|---|---|---|---|']
    for label, r in table.items():
        vs = f'{r["mean"] - alone:+.2f}' if alone is not None else ''
        sd = '' if r['sd'] is None else f'{r["sd"]:.2f}'
        lines.append(f'| {label} | {r["mean"]:.2f} | {r["spread"]:.2f} | {sd} | {r["n"]} | '
                     f'{", ".join(f"{t:.2f}" for t in r["teachers"])} | {r["gap"]:+.2f} | {vs} | '
                     f'{r["seconds_per_epoch"]} |')
    recalibrated = [r for r in runs.values() if r.get('bn_recalibrated_batches')]
    if recalibrated:
        lines += ['', "BN statistics: these runs' faded twins were deployed with their BatchNorm statistics recomputed "
                  'on the training data (`runner.recalibrate_bn`); the table reads the deployed twin. As trained '
                  '(moving-average statistics) -> deployed: '
                  + '; '.join(f'{r["label"]} s{r["seed"]}: {r["test_acc_unfolded"]:.2f} -> {r["test_acc"]:.2f} %'
                              for r in recalibrated) + '.']
    joint = [r for r in runs.values() if r.get('joint_teacher_test_acc') is not None]
    if joint:
        lines += ['', 'Joint-teacher runs: the teacher keeps training on its own cross-entropy during the run; the twin '
                  'is still compared with the teacher it started from. The teacher trained along reached: '
                  + '; '.join(f'{r["label"]} s{r["seed"]}: {r["teacher_test_acc"]:.2f} -> '
                              f'{r["joint_teacher_test_acc"]:.2f} %' for r in joint) + '.']
    lines += matched_table(pairs, '## What JointRD adds over the twin alone with the same ingredients',
                           'Runs matched by seed and teacher (the twin alone never sees the teacher in its loss; with '
                           '"teacher init" it starts from the same teacher weights).', 'JointRD row', 'JointRD vs alone')
    lines += matched_table(variants, f'## One field of the default recipe changed ({DEFAULT_ROW})',
                           "Runs matched by seed and teacher with the default recipe's run.", 'row', 'variant vs default')
    lines += matched_table(fade50, f'## One field of the earlier recipe changed ({FADE50_ROW}: fade over 50 %)',
                           'Rows measured before the default moved to a fade over 80 %; runs matched by seed and teacher '
                           "with that recipe's run.", 'row', 'variant vs fade over 50 %')
    lines += matched_table(eta1, f'## One more field changed on {ETA1_ROW}',
                           "Runs matched by seed and teacher with that row's run.", 'row', 'variant vs eta held at 1')
    lines += matched_table(joint_ref, f'## The joint teacher as the reference runs it, against ours ({JOINT_ROW})',
                           'Ours: one simultaneous update, the hybrid paths on the pre-update teacher with batch BN '
                           "statistics. Runs matched by seed and teacher with that row's run.", 'row',
                           'variant vs ours')
    write_report(args.name, record, lines,
                 lambda png: plot(table, teachers, png, f'plain_{args.arch} <- {args.arch}, CIFAR-10: {meta["budget"]}'),
                 out)


def matched_table(matched_rows, title: str, intro: str, row_header: str, versus: str) -> list:
    """Markdown lines of a table of runs matched by seed and teacher (:func:`paired`); none when nothing matched."""
    if not matched_rows:
        return []
    lines = ['', title, '', intro + ' SE: standard error of the mean difference (sd / sqrt(n)); t = mean / SE, read '
             'against Student\'s t with n - 1 degrees of freedom (5 % two-sided: 12.7 at n = 2, 2.57 at n = 6, '
             '2.26 at n = 10).', '',
             f'| {row_header} | matched runs (seed, teacher %: {versus}) | mean difference (points) | n | sd | SE | t '
             '| positive |', '|---|---|---|---|---|---|---|---|']
    for label, matched in matched_rows.items():
        cells = '; '.join(f's{seed}, {teacher:.2f}: {a:.2f} vs {b:.2f}' for seed, teacher, a, b in matched)
        d = difference_stats([a - b for _, _, a, b in matched])
        sd_se_t = ' | '.join('' if d[k] is None else f'{d[k]:.2f}' for k in ('sd', 'se', 't'))
        lines.append(f'| {label} | {cells} | {d["mean"]:+.2f} | {d["n"]} | {sd_se_t} | {d["positive"]} of {d["n"]} |')
    return lines


def difference_stats(diffs) -> dict:
    """Mean, sample sd, standard error, t = mean / SE and the count of positive values of matched differences
    (sd, SE and t are None below 2 differences, t also when they are all equal)."""
    diffs = list(diffs)
    if not diffs:
        raise ValueError('difference_stats needs at least one matched difference')
    n, mean = len(diffs), statistics.mean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else None
    se = sd / math.sqrt(n) if sd is not None else None
    return dict(n=n, mean=mean, sd=sd, se=se, t=mean / se if se else None, positive=sum(x > 0 for x in diffs))


def plot(table, teachers, path, title):
    plt = pyplot()
    labels = list(table)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.5))
    y = range(len(labels))
    ax.barh(y, [table[k]['mean'] for k in labels], xerr=[table[k]['spread'] for k in labels],
            color=['#c44e52' if k == DEFAULT_ROW else '#55a868' for k in labels])
    for i, k in enumerate(labels):
        ax.plot(table[k]['accs'], [i] * len(table[k]['accs']), 'k.', ms=4)
    for teacher, style in zip(teachers, ('--', ':', '-.', (0, (5, 1)), (0, (1, 3)), (0, (3, 1, 1, 1, 1, 1)))):
        ax.axvline(teacher, color='#4c72b0', ls=style, label=f'teacher {teacher:.2f} %')
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel('last-epoch test accuracy (%)')
    ax.legend(fontsize=8, loc='lower right')
    ax.set_title(title.replace(': ', ':\n', 1) + f'\n(red: the default recipe, {DEFAULT_ROW})', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format='png')
    plt.close(fig)


if __name__ == '__main__':
    main()
