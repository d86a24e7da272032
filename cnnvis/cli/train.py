"""`cnnvis train-demo` (train the embedded Fashion-MNIST model) and `cnnvis evaluate`."""
from __future__ import annotations


from . import common

ORDER = 80


def register(sub) -> None:
    p = sub.add_parser("train-demo", help="train the demo CaffeNet-shaped model on Fashion-MNIST "
                                          "(numpy SGD, gradients from cnnvis's own backward graphs)")
    p.add_argument("--data", dest="data_dir", default=None, help="folder with the Fashion-MNIST IDX files "
                                                "(default: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--epochs", type=common.positive_int, default=None)
    p.add_argument("--batch-size", type=common.positive_int, default=None)
    p.add_argument("--lr", type=common.positive_float, default=None, help="peak learning rate")
    p.add_argument("--seed", type=common.seed, default=None)
    p.add_argument("--workers", type=common.thread_count, default=None,
                   help="concurrent parts per batch (default 2; the committed model used 1)")
    p.add_argument("--limit", type=common.positive_int, default=None,
                   help="train on the first N training images only (quick runs)")
    p.add_argument("--checkpoints", default="1,2,4,8",
                   help="epochs whose weights are also saved (comma separated; default 1,2,4,8)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=common.thread_count, default=None)
    p.add_argument("--no-caffe", action="store_true", help="do not also write Caffe prototxt + caffemodel")
    common.add_output_options(p, "out/train-demo")
    p.set_defaults(func=cmd_train_demo)

    p = sub.add_parser("evaluate", help="accuracy of a model on the Fashion-MNIST test set")
    common.add_model_options(p)
    p.add_argument("--data", dest="data_dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_evaluate, batch_size=256)  # 10,000 small images: larger batches by default


def cmd_train_demo(args) -> int:
    from .. import demo
    from ..training import TrainingRecipe

    recipe = TrainingRecipe()
    for field in ("epochs", "batch_size", "lr", "seed", "workers"):
        value = getattr(args, field)
        if value is not None:
            setattr(recipe, field, value)
    try:
        checkpoints = sorted({int(e) for e in args.checkpoints.split(",") if e.strip()})
    except ValueError:
        from ..errors import CnnvisError

        raise CnnvisError(f"--checkpoints {args.checkpoints!r}: expected comma-separated epoch numbers") from None
    result = demo.train_and_write(args.out, recipe, data_dir=args.data_dir, limit=args.limit,
                                  checkpoints=checkpoints, device=args.device, threads=args.threads,
                                  caffe=not args.no_caffe, progress=True)
    print(f"cnnvis train-demo: test accuracy {result['test_accuracy']:.4f} on {result['test_n']} images; "
          f"wrote {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from .. import demo

    model = common.load_model(args)
    result = demo.evaluate_on_fashion_mnist(model, data_dir=args.data_dir, batch_size=args.batch_size)
    print(f"{model.name}: accuracy {result['accuracy']:.4f} on the {result['n']} Fashion-MNIST test images")
    names = model.class_names
    conf = result["confusion"]
    for i, row in enumerate(conf):
        print(f"  {names[i]:12s} {row[i] / max(1, row.sum()):.3f}  " + " ".join(f"{v:4d}" for v in row))
    return 0
