#!/usr/bin/env python
"""Get the Kaggle "smoking" set (1,120 JPEGs, 250x250; a mirror of the Mendeley smoker-detection set,
CC BY 4.0) into data/smoking, laid out as Training/Training, Validation/Validation, Testing/Testing.

    python scripts/download_smoking.py                          # Kaggle API, when a token is configured
    python scripts/download_smoking.py --archive ~/Downloads/archive.zip   # an archive downloaded by hand

Without a Kaggle token and without --archive it prints how to get the archive and exits with status 2.
User errors end with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

from lora_cls.data.download import (
    SMOKING_KAGGLE_SLUG,
    SMOKING_PAGE,
    extract_zip,
    kaggle_credentials,
    kaggle_download,
    report_layout,
    script_entry,
    zip_prefix,
)
from lora_cls.data.layouts import SMOKING_SPLIT_DIRS
from lora_cls.errors import UserError

MANUAL = f"""\
The smoking dataset comes from Kaggle ({SMOKING_PAGE}),
a mirror of the Mendeley smoker-detection set (https://data.mendeley.com/datasets/j45dj8bgfc/1, CC BY 4.0).
No Kaggle API token is configured (or the kaggle package is missing), so get it one of two ways:

  a) Kaggle API: pip install kaggle; on kaggle.com open Settings > API > Create New Token and save the
     kaggle.json it gives you as ~/.kaggle/kaggle.json (chmod 600), or export KAGGLE_USERNAME and
     KAGGLE_KEY; then run this script again.
  b) By hand: open the page above, press Download (sign-in needed), then run
       python scripts/download_smoking.py --archive ~/Downloads/archive.zip
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=Path("data/smoking"),
                        help="dataset folder; gets Training/, Validation/, Testing/ (default: data/smoking)")
    parser.add_argument("--archive", type=Path, default=None,
                        help="a zip of the dataset downloaded by hand: unpack and check it, no Kaggle API needed")
    parser.add_argument("--slug", default=SMOKING_KAGGLE_SLUG,
                        help=f"Kaggle dataset slug (default: {SMOKING_KAGGLE_SLUG}; it names a third-party mirror, "
                             "so check that the page still holds the 1,120-image set before relying on it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def unpack(archive: Path, dest: Path, progress: bool) -> None:
    """Unpack a smoking archive into `dest`, dropping any folder that wraps Training/Validation/Testing."""
    prefix = zip_prefix(archive, SMOKING_SPLIT_DIRS["train"])
    if prefix is None:
        raise UserError(f"{archive} holds no Training/ folder; is it the Kaggle smoking archive? Expected "
                        "Training/Training/*.jpg, Validation/Validation/*.jpg, Testing/Testing/*.jpg")
    print(f"unpacking {archive} into {dest}" + (f" (dropping the leading {prefix})" if prefix else ""))
    extract_zip(archive, dest, strip=prefix, progress=progress)


def run(args: argparse.Namespace) -> None:
    dest: Path = args.dest
    progress = not args.no_progress
    present = [dest / d for d in SMOKING_SPLIT_DIRS.values() if (dest / d).exists()]
    if present:
        print(f"{present[0]} already exists; checking it (delete Training/, Validation/, Testing/ to unpack again)")
    elif args.archive is not None:
        unpack(args.archive, dest, progress)
    else:
        token = kaggle_credentials()
        if token is None or importlib.util.find_spec("kaggle") is None:
            print(MANUAL, file=sys.stderr)
            raise UserError("no Kaggle API token or no kaggle package; follow a) or b) above, "
                            "or pass --archive PATH")
        download_dir = dest / ".kaggle-download"
        print(f"downloading Kaggle dataset {args.slug} (token from {token})")
        archive = kaggle_download(args.slug, download_dir)
        unpack(archive, dest, progress)
        shutil.rmtree(download_dir, ignore_errors=True)
    from lora_cls.conf.load import dataset_config

    report_layout("smoking", dest, dataset_config("smoking", dest))


def main(argv: list[str] | None = None) -> None:
    """Run the script; user mistakes raise UserError (the command line turns them into `error:`, exit 2)."""
    run(parse_args(argv))


if __name__ == "__main__":
    script_entry(main)
