"""Accuracy of teachers and their twins on CIFAR-10, by recipe id, at one of two scales: the residual teacher, its
twin alone and with JointRD (and any recipe variant, method or alternative as a row), trained from the same teacher
on the same data.

- ``subset``: the CPU budget, a seeded subset of CIFAR-10 (8,000 images, 5 epochs per run, the teacher at the same
  budget), one question per record: ``jointrd``, ``zoo`` or ``ablation`` (:mod:`scale_subset`);
- ``full``: the published-twin budget, the full training set; the teacher first, then each twin at a fraction of
  the teacher's epochs, beside the residual net trained again for as long (:mod:`scale_full`).

Runs resume where they stopped and finished ones are read back, so any command can be stopped and given again.

    python benchmarks/accuracy.py subset --question ablation --rows jointrd:default alone:default --seeds 0 1
    python benchmarks/accuracy.py full --arch resnet56_cifar --fractions 0.5 --variant kd-lr02=kd_weight:1,lr_scale:0.2
    python benchmarks/accuracy.py full --arch resnet56_cifar --report-only
    python benchmarks/accuracy.py subset --help      # a scale's own options
"""
import sys

SCALES = ('subset', 'full')


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in SCALES:
        if argv and argv[0] in ('-h', '--help'):
            print(__doc__)
            return
        raise SystemExit(f'usage: accuracy.py {{{",".join(SCALES)}}} [options]: give the scale first (got '
                         f'{argv[0] if argv else "nothing"!r}); accuracy.py SCALE --help lists its options')
    if argv[0] == 'subset':
        import scale_subset as scale
    else:
        import scale_full as scale
    scale.main(argv[1:])


if __name__ == '__main__':
    main()
