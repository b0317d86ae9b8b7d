#!/usr/bin/env python
"""Download, verify and unpack the NIH/NLM malaria cell images (27,558 PNGs) into data/malaria.

    python scripts/download_malaria.py                      # download (resumable), verify, unpack, check
    python scripts/download_malaria.py --archive cell_images.zip   # a copy you downloaded yourself

The archive is 353,452,851 bytes; its sha256 is checked before anything is unpacked. An interrupted download
leaves data/malaria/cell_images.zip.part, which the next run resumes. User errors end with one `error:` line
and exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_cls.data.download import (
    MALARIA_ARCHIVE,
    download,
    extract_zip,
    report_layout,
    script_entry,
    verify_file,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=Path("data/malaria"),
                        help="dataset folder; gets cell_images/{Parasitized,Uninfected} (default: data/malaria)")
    parser.add_argument("--archive", type=Path, default=None,
                        help="use this cell_images.zip instead of downloading it (verified all the same)")
    parser.add_argument("--url", default=MALARIA_ARCHIVE.url, help=f"download address (default: {MALARIA_ARCHIVE.url})")
    parser.add_argument("--keep-archive", action="store_true",
                        help="keep the downloaded zip after unpacking (it is deleted by default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    dest: Path = args.dest
    progress = not args.no_progress
    if (dest / "cell_images").exists():
        print(f"{dest / 'cell_images'} already exists; checking it (delete it to download and unpack again)")
    else:
        if args.archive is not None:
            archive = args.archive
            print(f"verifying {archive} (size and sha256)")
            verify_file(archive, MALARIA_ARCHIVE.size, MALARIA_ARCHIVE.sha256, progress)
        else:
            archive = dest / "cell_images.zip"
            print(f"downloading {args.url} to {archive}")
            download(args.url, archive, MALARIA_ARCHIVE.size, MALARIA_ARCHIVE.sha256, progress)
        print(f"{archive}: size and sha256 match the published file; unpacking into {dest}")
        extract_zip(archive, dest, progress=progress)
        if args.archive is None and not args.keep_archive:
            archive.unlink()
    from lora_cls.conf.load import dataset_config

    report_layout("malaria", dest, dataset_config("malaria", dest))


def main(argv: list[str] | None = None) -> None:
    """Run the script; user mistakes raise UserError (the command line turns them into `error:`, exit 2)."""
    run(parse_args(argv))


if __name__ == "__main__":
    script_entry(main)
