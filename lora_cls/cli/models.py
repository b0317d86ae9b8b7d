"""lora-models: the classifiers lora-train accepts, with parameter counts and default LoRA targets at a rank."""

from __future__ import annotations

import argparse
import fnmatch
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-models", description=__doc__)
    p.add_argument("patterns", nargs="*", help="model names or globs (default: every torchvision classifier)")
    p.add_argument("--source", default="torchvision", choices=("torchvision", "timm"))
    p.add_argument("--rank", type=int, default=8, help="lora.rank for the trainable count (default 8)")
    p.add_argument("--classes", type=int, default=2, help="classes of the new head (default 2)")
    return p


def main(argv: list[str] | None = None) -> None:
    from lora_cls.cli.common import fail
    from lora_cls.errors import UserError

    args = _parser().parse_args(argv)
    try:
        _list(args)
    except UserError as exc:
        fail(str(exc))


def _names(args: argparse.Namespace) -> list[str]:
    from lora_cls.models import registry as zoo

    if args.source == "torchvision":
        known = zoo.torchvision_names()
        return [n for n in known if not args.patterns or any(fnmatch.fnmatchcase(n, p) for p in args.patterns)]
    if not args.patterns:
        from lora_cls.errors import UserError

        raise UserError("timm has 1,000+ models: name some, or a glob such as 'convnext_*'")
    timm = zoo._timm()
    return sorted({n for p in args.patterns for n in timm.list_models(p)})


def _list(args: argparse.Namespace) -> None:
    import warnings

    from rich.console import Console
    from rich.table import Table

    from lora_cls.models import registry as zoo
    from lora_cls.models.build import build_model
    from lora_cls.models.finetune import parameter_report, prepare_finetune

    table = Table(title=f"{args.source} classifiers · LoRA rank {args.rank}, default targets, {args.classes} classes")
    for column in ("model", "total", "adapted", "trainable", "%", "default targets"):
        table.add_column(column, justify="right" if column in ("total", "adapted", "trainable", "%") else "left")
    for name in _names(args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = zoo.on_meta(lambda n=name: build_model(n, None, args.classes, source=args.source))
            adapted = prepare_finetune(model, name, "lora", rank=args.rank, source=args.source)
        report = parameter_report(model)
        table.add_row(name, f"{report['total']:,}", str(len(adapted)),
                      f"{report['trainable']:,}", f"{report['trainable_pct']:.2f}", zoo.summarize(adapted))
    Console(width=max(Console().width, 160) if not sys.stdout.isatty() else None).print(table)


if __name__ == "__main__":
    main()
