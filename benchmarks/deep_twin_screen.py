"""Screen: a deep twin's conversion from its teacher, with per-block probes, on a subset of CIFAR-10.

Trains the fading twin of ``--arch`` (started from ``--teacher``) alone, or with JointRD (``--jointrd``), for
``--steps`` SGD steps on ``--train-size`` training images, and every ``--log-every`` steps records the shortcut
scale s, lr, loss, train accuracy and, per block, the branch and scaled-shortcut RMS, the shortcut's share of the
block output, the gradient norm and the BatchNorm drift (``jointrd_timm.twins.probe``). At the end the deployed
twin (fade finished, BN statistics recomputed on training batches) is evaluated on ``--test-size`` test images.
Writes one JSON record (``--out``); ``deep_twin_report.py`` turns records into the diagnostics page.

    python benchmarks/deep_twin_screen.py --steps 375 --out /tmp/screen-baseline.json
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=str(ROOT.parent / 'shared/datasets/cifar10'))
    p.add_argument('--arch', default='resnet56_cifar')
    p.add_argument('--teacher', default=str(ROOT / 'registry/weights/resnet56_cifar.ce_full_cifar10'))
    p.add_argument('--train-size', type=int, default=48000)
    p.add_argument('--test-size', type=int, default=2000)
    p.add_argument('--steps', type=int, default=375)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, default=0.1,
                   help="the peak lr, as given (a recipe's lr_scale, lr_hold and batch_scale are not applied here)")
    p.add_argument('--recipe', default='default',
                   help="the recipe the levers change (a name or id of jointrd_timm.recipes; default: 'default', the "
                        "recipe of the recorded screens, not the architecture's current one)")
    p.add_argument('--fade', type=float, default=0.8)
    p.add_argument('--lever', action='append', default=[], help='recipe fields as key=value (JointRDConfig / fade)')
    p.add_argument('--jointrd', action='store_true')
    p.add_argument('--clip', type=float, default=None, help='gradient clipping value (timm dispatch_clip_grad)')
    p.add_argument('--clip-mode', default='agc', choices=('agc', 'norm', 'value'))
    p.add_argument('--kd', type=float, default=0.0, help='weight of Hinton KD (T=4) against CE, twin alone')
    p.add_argument('--hint', type=float, default=0.0, help='weight of block-wise feature hints, twin alone')
    p.add_argument('--share', action='store_true', help="the 'share' fade (twins.fade.pin_shortcut_share)")
    p.add_argument('--log-every', type=int, default=25)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out', required=True)
    return p


def build(args):
    """(recipe, teacher, twin, method, train set, test set) of the screen: the published teacher, its twin started
    from it, and the fading twin alone or JointRD over ``args.steps`` steps."""
    import timm
    import jointrd_timm
    from jointrd_timm.io import load_weights
    from jointrd_timm.training.data import load_image_dataset
    from jointrd_timm.methods import FadingStudent, JointRD
    from jointrd_timm.methods.fading import ShortcutFade
    teacher = timm.create_model(args.arch, num_classes=10)
    load_weights(teacher, args.teacher)
    recipe = screen_recipe(args)
    twin = timm.create_model(f'plain_{args.arch}', num_classes=10, **recipe.twin_kwargs())
    jointrd_timm.load_teacher_weights(twin, teacher)
    train = load_image_dataset(args.data, 'train', transform='cifar', limit=args.train_size, seed=args.seed)
    test = load_image_dataset(args.data, 'test', transform='cifar', limit=args.test_size, seed=args.seed)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    epochs = math.ceil(args.steps / steps_per_epoch)
    if args.jointrd:
        method = JointRD(twin, teacher, recipe.jointrd_config(), num_epochs=epochs, steps_per_epoch=steps_per_epoch)
    else:
        method = FadingStudent(twin, ShortcutFade.from_fields(recipe), num_epochs=epochs,
                               steps_per_epoch=steps_per_epoch)
    return recipe, teacher, twin, method, train, test


def block_taps(teacher, twin) -> tuple:
    """Forward hooks recording each fading block's output in the teacher and in the twin (for block-wise hints)."""
    from jointrd_timm.twins.fade import FadingGraphBlock
    teacher.eval()
    teacher_out, twin_out = {}, {}
    for n in [n for n, m in twin.named_modules() if isinstance(m, FadingGraphBlock)]:
        teacher.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: teacher_out.__setitem__(n, o))
        twin.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: twin_out.__setitem__(n, o))
    return teacher_out, twin_out


def screen_loss(args, method, teacher, taps, x, y):
    """(loss, logits) of one step: JointRD's loss, or the twin alone's CE with the optional KD and block hints."""
    if args.jointrd:
        out = method(x, y)
        return out['loss'], out['logits']
    logits = method(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    if args.kd or args.hint:
        with torch.no_grad():
            t_logits = teacher(x)
    if args.kd:
        from jointrd_timm.methods.base import hinton_kd
        loss = (1 - args.kd) * loss + args.kd * hinton_kd(logits, t_logits, 4.0)
    if args.hint:
        teacher_out, twin_out = taps
        hint = sum(((twin_out[n] - teacher_out[n]) ** 2).mean() / teacher_out[n].pow(2).mean()
                   for n in teacher_out) / len(teacher_out)
        loss = loss + args.hint * hint
    return loss, logits


def probe_entry(probe, twin, x, step: int, lr: float, window: dict, seconds: float) -> dict:
    """One log entry: s, lr, the window's loss and train accuracy, and per block the probe's statistics, gradient
    norm and eval-mode output RMS, with the BatchNorm drift on the batch ``x``."""
    from jointrd_timm.twins.fade import shortcut_scale
    from jointrd_timm.twins.probe import batchnorm_drift
    stats, grads = probe.stats(), probe.gradient_norms()
    drift = batchnorm_drift(twin, x)
    twin.eval()
    with torch.no_grad():
        probe.reset()
        twin(x)
        eval_stats = probe.stats()
    twin.train()
    entry = dict(step=step, s=shortcut_scale(twin), lr=lr, loss=window['loss'] / window['seen'],
                 train_acc=100.0 * window['correct'] / window['seen'],
                 blocks={n: dict(stats[n], grad_norm=grads[n], eval_output_rms=eval_stats[n].get('output_rms'))
                         for n in stats},
                 bn_drift=drift, seconds=seconds)
    print(f"step {step} s={entry['s']:.4f} lr={lr:.4f} loss={entry['loss']:.3f} acc={entry['train_acc']:.1f} "
          f"share(mean)={sum(b['shortcut_share'] for b in entry['blocks'].values()) / len(stats):.3f} "
          f'{seconds:.0f}s', flush=True)
    probe.reset()
    return entry


def deployed_accuracy(twin, train, test, batch_size: int) -> float:
    """Test accuracy of the deployed twin: shortcuts removed, BN statistics recomputed on 100 training batches."""
    from jointrd_timm.io import top1_accuracy
    from jointrd_timm.training.runner import recalibrate_batchnorm
    from jointrd_timm.twins.fade import deployable
    deployed = deployable(twin)
    recalibrate_batchnorm(deployed, torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True), 100)
    return top1_accuracy(deployed.eval(), test)


def screen_recipe(args):
    """The screen's recipe: ``--recipe`` with the fade over ``--fade``, each ``--lever`` and ``--share``."""
    from jointrd_timm.recipes import get_recipe
    levers = {}
    for item in args.lever:
        key, _, value = item.partition('=')
        levers[key] = json.loads(value)
    if args.share:
        levers['shortcut_fade_mode'] = 'share'
    return get_recipe(args.recipe).replace(shortcut_fade=args.fade, **levers)


def main():
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from jointrd_timm.twins.probe import FadeProbe
    recipe, teacher, twin, method, train, test = build(args)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, args.steps) / args.steps)))
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    taps = block_taps(teacher, twin) if not args.jointrd and (args.kd or args.hint) else None
    probe = FadeProbe(twin)
    log, step, t0 = [], 0, time.time()
    window = dict(loss=0.0, correct=0, seen=0)
    method.train()
    while step < args.steps:
        for x, y in loader:
            if step >= args.steps:
                break
            loss, logits = screen_loss(args, method, teacher, taps, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            window['loss'] += float(loss.detach()) * len(y)
            window['correct'] += int((logits.argmax(1) == y).sum())
            window['seen'] += len(y)
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                log.append(probe_entry(probe, twin, x, step, sched.get_last_lr()[0], window, time.time() - t0))
                window = dict(loss=0.0, correct=0, seen=0)
            if args.clip is not None:
                from timm.utils import dispatch_clip_grad
                dispatch_clip_grad(params, args.clip, mode=args.clip_mode)
            opt.step()
            sched.step()
    probe.close()
    acc = deployed_accuracy(twin, train, test, args.batch_size)
    record = dict(args=vars(args), recipe=recipe.id, test_acc=acc, test_images=len(test), log=log,
                  seconds=time.time() - t0)
    Path(args.out).write_text(json.dumps(record))
    print(f'test acc {acc:.2f} on {len(test)} images; {time.time() - t0:.0f}s')


if __name__ == '__main__':
    main()
