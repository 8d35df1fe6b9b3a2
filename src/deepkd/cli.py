"""The ``deepkd`` command: train, sweep, eval, demo, list, plot, summary, export, quantize, predict, profile."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from deepkd.errors import ConfigError, DeepKDError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepkd", description="Logit knowledge distillation trainer.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a teacher or distil a student from a YAML recipe")
    train.add_argument("recipe", help="a shipped recipe's name (deepkd list recipes), a YAML file, or a run folder "
                                      "to continue with --resume")
    train.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optimizer.lr=0.1")
    train.add_argument("--resume", action="store_true",
                       help="continue from last.pt of the recipe's run folder (or of the run folder given)")
    _demo_parser(sub)
    listing = sub.add_parser("list", help="list models, methods or recipes")
    listing.add_argument("what", choices=["models", "methods", "recipes"])
    listing.add_argument("pattern", nargs="?", default=None)
    plot = sub.add_parser("plot", help="PNG figures of one or more runs")
    plot.add_argument("runs", nargs="+")
    plot.add_argument("--out", default=None,
                      help="output folder (default: the run's folder; for several runs their common parent)")
    _sweep_parser(sub)
    _summary_parser(sub)
    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on a dataset's test split")
    evaluate.add_argument("recipe", help="recipe whose data and student sections are used")
    evaluate.add_argument("weights", help="checkpoint to evaluate (deepkd, community or .safetensors)")
    evaluate.add_argument("overrides", nargs="*")
    download = sub.add_parser("download", help="download and verify files into deepkd's cache")
    download.add_argument("what", choices=["teachers"], help="teachers: mdistiller's CIFAR-100 cifar_teachers.tar")
    download.add_argument("--root", default=None, help="cache folder (default: $DEEPKD_DATA or ~/.cache/deepkd)")
    download.add_argument("--file", default=None, help="a local cifar_teachers.tar, used instead of downloading")
    _deploy_parsers(sub)
    return parser


def _demo_parser(sub) -> None:
    """``deepkd demo``."""
    demo = sub.add_parser("demo", help="distillation in minutes: Fashion-MNIST when on this machine, else synthetic")
    demo.add_argument("what", nargs="?", choices=["classification", "detection"], default="classification",
                      help="classification (default): Fashion-MNIST or the synthetic set; detection: tiny Faster "
                           "R-CNN, COCO-format synthetic set")
    demo.add_argument("--data", choices=["auto", "fashion_mnist", "synthetic"], default="auto",
                      help="classification: Fashion-MNIST when found or downloadable (auto), or force one")
    demo.add_argument("--root", default=None,
                      help="a folder holding Fashion-MNIST's four files (default: the Debian package's, else the "
                           "download folder)")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (CI smoke test)")
    demo.add_argument("--json", action="store_true", help="print a JSON object of the results last")
    demo.add_argument("--train-teacher", action="store_true",
                      help="train the teacher here first, from its recipe (synthetic: 2.5 minutes; Fashion-MNIST: "
                           "about 15)")
    demo.add_argument("--features", action="store_true",
                      help="detection: also ReviewKD and DKD+ReviewKD on the FPN (two more students)")
    demo.add_argument("--out", default=None,
                      help="folder for the demo's runs and plot (runs/demo, runs/demo_detection)")


def _summary_parser(sub) -> None:
    """``deepkd summary``."""
    summary = sub.add_parser("summary", help="best and last top-1 per experiment, mean +- std and 95%% CI over seeds")
    summary.add_argument("runs", nargs="+", help="run folders, folders containing runs, or --export JSON files")
    summary.add_argument("--export", metavar="PATH", help="also write every run's record (metrics, curve) as JSON, "
                         "which deepkd summary reads back in place of the run folders")
    summary.add_argument("--json", action="store_true")
    summary.add_argument("--cards", action="store_true", help="write a model card (README.md) per experiment in "
                         "the folder its seeds share: top-1 mean +- std, cost, provenance")
    summary.add_argument("--compare", nargs=2, metavar=("A", "B"),
                         help="difference of means A - B of two experiments, with a 95%% Welch confidence interval")
    summary.add_argument("--reach", type=float, metavar="ACC",
                         help="epochs to first reach this test top-1 (box AP), per experiment; speed-up with --compare")
    summary.add_argument("--figure", metavar="PATH", help="PNG: test top-1 per epoch (mean +- std), best with 95%% CI")


def _deploy_parsers(sub) -> None:
    """``deepkd export``, ``quantize``, ``predict`` and ``profile``; defaults live in the signatures of
    :mod:`deepkd.deploy`."""
    export = sub.add_parser("export", argument_default=argparse.SUPPRESS,
                            help="a run's student as ONNX, TorchScript or torch.export (pt2), checked against "
                                 "PyTorch on the run's test images")
    export.add_argument("run", help="a finished run folder (config.yaml, data.json, student.safetensors)")
    export.add_argument("--format", required=True, choices=["onnx", "torchscript", "pt2"])
    export.add_argument("-o", "--out", help="the file to write (default: student.onnx, student.torchscript.pt or "
                                            "student.pt2 in the run folder)")
    export.add_argument("--tolerance", type=float, help="refuse the export past this max |logit difference| "
                                                        "(default 1e-4)")
    export.add_argument("--images", type=int, help="test images of the parity check (default 64)")
    predict = sub.add_parser("predict", help="class probabilities of image files (PNG, JPEG)",
                             argument_default=argparse.SUPPRESS)
    predict.add_argument("model", help="a run folder, or a file of deepkd export (.onnx, .pt2, TorchScript .pt)")
    predict.add_argument("images", nargs="+")
    predict.add_argument("--top", type=int, help="classes shown per image (default 5)")
    predict.add_argument("--json", action="store_true", help="one JSON object per image and line")
    _quantize_parser(sub)
    profile = sub.add_parser("profile", help="parameters, MACs and CPU latency of a teacher and a student",
                             argument_default=argparse.SUPPRESS)
    profile.add_argument("teacher", help="a model name (deepkd list models), a recipe (its teacher) or a run folder")
    profile.add_argument("student", help="a model name, a recipe (its student) or a run folder")
    profile.add_argument("--batch-sizes", type=int, nargs="+", help="latency batch sizes (default 1 32)")
    profile.add_argument("--repeats", type=int, help="timed runs per batch size, median reported (default 10)")
    profile.add_argument("--warmup", type=int, help="untimed runs before them (default 3)")
    profile.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    profile.add_argument("--num-classes", type=int, help="classes of a named model (default: its own)")
    profile.add_argument("--input-size", type=int, help="input side of a named model (default: its own)")
    profile.add_argument("--json", action="store_true")


def _quantize_parser(sub) -> None:
    """``deepkd quantize``; defaults in :func:`deepkd.deploy.quantize_run`'s signature."""
    quantize = sub.add_parser("quantize", argument_default=argparse.SUPPRESS,
                              help="int8 ONNX of a run's student (ONNX Runtime static quantisation), with top-1 "
                                   "before and after and the latency ratio")
    quantize.add_argument("run", help="a finished run folder")
    quantize.add_argument("-o", "--out", help="the file to write (default: student.int8.onnx in the run folder)")
    quantize.add_argument("--calibration", type=int, help="training images that set the activation ranges "
                                                          "(default 256)")
    quantize.add_argument("--calibrate", choices=["minmax", "percentile", "entropy"], help="default minmax")
    quantize.add_argument("--per-tensor", dest="per_channel", action="store_false",
                          help="one weight scale per tensor (default: per output channel)")
    quantize.add_argument("--images", type=int, help="test images of the top-1 measurement (default: all)")
    quantize.add_argument("--batch-sizes", type=int, nargs="+", help="latency batch sizes (default 1 32)")
    quantize.add_argument("--repeats", type=int, help="timed runs per batch size, median reported (default 50)")
    quantize.add_argument("--warmup", type=int, help="untimed runs before them (default 10)")
    quantize.add_argument("--threads", type=int, help="ONNX Runtime CPU threads (default 1)")
    quantize.add_argument("--max-drop", type=float, help="keep nothing if int8 top-1 falls more than this many "
                                                         "points below fp32")
    quantize.add_argument("--json", action="store_true")


def _sweep_parser(sub) -> None:
    """``deepkd sweep``; no defaults here: :func:`deepkd.commands.sweep.run_sweep`'s signature holds them."""
    sweep = sub.add_parser("sweep", help="a grid of recipes x --set values x seeds, one run folder each",
                           argument_default=argparse.SUPPRESS)
    sweep.add_argument("overrides", nargs="+", metavar="RECIPE [RECIPE ...] [key=value ...]",
                       help="recipes (names or YAML files), then overrides applied to every run")
    sweep.add_argument("--seeds", help="seeds: 0-4, 0,2,5 or 0-2,7 (default: each recipe's seed)")
    sweep.add_argument("--set", dest="set_values", action="append", metavar="KEY=V1,V2",
                       help="a grid axis, e.g. --set optimizer.lr=0.1,0.2 (repeat for more axes)")
    sweep.add_argument("--out", help="the sweep folder, <out>/<configuration>/seed<seed> (default: <output_dir>/sweep, "
                                     "the output_dir all the recipes share; recipes that differ in it need --out)")
    sweep.add_argument("--jobs", type=int, help="runs at once (default: 1 locally, all on SLURM)")
    sweep.add_argument("--executor", choices=["local", "slurm", "submitit-local"],
                       help="local processes (default), SLURM through submitit, or submitit's local executor")
    sweep.add_argument("--dry-run", action="store_true", help="print each run's command (or skip), run nothing")
    sweep.add_argument("--timeout-min", type=float, help="submitit: a job's time limit in minutes")
    sweep.add_argument("--gpus-per-node", type=int, help="slurm: GPUs per job (one run per job)")
    sweep.add_argument("--slurm-partition", help="slurm: the partition")
    sweep.add_argument("--cpus-per-task", type=int, help="slurm: CPUs per job (and the run's torch threads)")
    sweep.add_argument("--mem-gb", type=float, help="slurm: memory per job")
    sweep.add_argument("--slurm", action="append", metavar="KEY=VALUE",
                       help="slurm: any other submitit slurm_<KEY> parameter, e.g. --slurm account=abc")


def cmd_train(args) -> int:
    from deepkd.train.runner import run_recipe

    summary = run_recipe(args.recipe, args.overrides, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # other ranks' summaries are not the run's files
        print(json.dumps(summary))
    return 0


def cmd_list(args) -> int:
    if args.what == "models":
        from deepkd.models import format_model_table

        print(format_model_table(args.pattern))
    elif args.what == "methods":
        from deepkd.losses.registry import SETTINGS, list_methods, method_info

        names = list_methods(args.pattern)
        width = max((len(n) for n in names), default=0)
        print("\n".join(f"{n:<{width}}  {method_info(n).get('paper', '')}".rstrip() for n in names))
        if args.pattern is None:
            print("\nsettings of the methods above:\n" + "\n".join(SETTINGS))
    else:
        from deepkd.train.recipes import list_recipes

        print("\n".join(list_recipes(args.pattern)))
    return 0


def cmd_eval(args) -> int:
    from deepkd.commands.evaluate import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(args.recipe, args.weights, args.overrides)))
    return 0


def cmd_plot(args) -> int:
    from deepkd.commands.plots import plot_runs

    for path in plot_runs(args.runs, args.out):
        print(path)
    return 0


def cmd_sweep(args) -> int:
    from deepkd.commands.sweep import run_sweep

    options = {k: v for k, v in vars(args).items() if k not in ("command", "overrides")}
    recipes = [o for o in args.overrides if "=" not in o or Path(o).is_file()]
    overrides = [o for o in args.overrides if o not in recipes]
    states = run_sweep(recipes, overrides, **options)
    return 0 if options.get("dry_run") or all(s == "finished" for s in states.values()) else 1


def cmd_summary(args) -> int:
    from deepkd.commands.summary import collect, compare, export_runs, format_comparison, format_summary, summary_rows

    groups = collect(args.runs)
    if args.export:
        export_runs(groups, args.export)
    rows = summary_rows(groups, reach=args.reach)
    comparison = compare(groups, *args.compare, reach=args.reach) if args.compare else None
    if args.figure:
        from deepkd.commands.plots import plot_summary

        plot_summary(groups, rows, args.figure)
    if args.cards:
        from deepkd.commands.summary import write_cards

        for card in write_cards(groups):
            print(f"wrote {card}", file=sys.stderr)
    if args.json:  # a list of rows; an object {"rows", "compare"} with --compare
        print(json.dumps({"rows": rows, "compare": comparison} if comparison else rows))
    else:
        print(format_summary(rows) + (f"\n{format_comparison(comparison)}" if comparison else ""))
    return 0


def cmd_demo(args) -> int:
    from deepkd.commands.demo import run_demo, run_detection_demo

    if args.features and args.what != "detection":
        raise ConfigError("--features adds the FPN feature methods to deepkd demo detection; the classification "
                          "demo has no such rows")
    if args.what == "detection" and (args.data != "auto" or args.root):
        raise ConfigError("--data and --root choose the classification demo's images; deepkd demo detection runs on "
                          "its synthetic COCO-format set")
    if args.what == "detection":
        run_detection_demo(out=args.out or "runs/demo_detection", quick=args.quick, as_json=args.json,
                           features=args.features)
    else:
        run_demo(out=args.out or "runs/demo", quick=args.quick, as_json=args.json, train_teacher=args.train_teacher,
                 data=args.data, root=args.root)
    return 0


def cmd_download(args) -> int:
    from deepkd.models.teachers import download_teachers, format_teachers

    print(format_teachers(download_teachers(args.root, file=args.file)))
    return 0


def cmd_export(args) -> int:
    from deepkd.deploy import export_run, format_report

    options = {k: v for k, v in vars(args).items() if k not in ("command", "run", "format")}
    print(format_report(export_run(args.run, args.format, **options)))
    return 0


def cmd_predict(args) -> int:
    from deepkd.deploy import format_prediction, load_predictor, predict

    options = {"top": args.top} if "top" in args else {}
    for record in predict(load_predictor(args.model), args.images, **options):
        print(json.dumps(record) if getattr(args, "json", False) else format_prediction(record))
    return 0


def cmd_quantize(args) -> int:
    from deepkd.deploy import format_quantize, quantize_run

    options = {k: v for k, v in vars(args).items() if k not in ("command", "run", "json")}
    report = quantize_run(args.run, **options)
    print(json.dumps(report) if getattr(args, "json", False) else format_quantize(report))
    return 0


def cmd_profile(args) -> int:
    from deepkd.deploy import format_profile, profile

    options = {k: v for k, v in vars(args).items() if k not in ("command", "teacher", "student", "json")}
    report = profile(args.teacher, args.student, **options)
    print(json.dumps(report) if getattr(args, "json", False) else format_profile(report))
    return 0


COMMANDS = {"train": cmd_train, "sweep": cmd_sweep, "list": cmd_list, "eval": cmd_eval, "plot": cmd_plot,
            "summary": cmd_summary, "demo": cmd_demo, "download": cmd_download, "export": cmd_export,
            "predict": cmd_predict, "profile": cmd_profile, "quantize": cmd_quantize}


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides given after an option (train recipe.yaml --resume a.b=1) are still overrides
        if args.command not in ("train", "eval", "sweep") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("deepkd: interrupted", file=sys.stderr)
        return 130
    except DeepKDError as err:  # what the user can fix: one line; anything else keeps its traceback
        if os.environ.get("DEEPKD_DEBUG"):
            raise
        print(f"deepkd: error: {err}", file=sys.stderr)
        return 2


def entry() -> None:
    """Console entry point. A torchrun worker leaves with ``os._exit`` once its process group is
    destroyed: interpreter finalisation can otherwise meet gloo's C++ threads and abort the worker
    ("terminate called without an active exception") after a successful run."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
