"""``python -m villa.ingest coco|table ...``: turn your own image-text data into a villa dataset folder.

    python -m villa.ingest coco  --images=IMG_DIR --instances=instances.json --captions=captions.json --out=DATA_DIR
    python -m villa.ingest table --table=pairs.csv --images=IMG_DIR --attributes=attributes.yaml \\
        --regions=proposals --out=DATA_DIR

Then ``python3 preprocess/preprocess_dataset.py --data_dir=DATA_DIR`` and the stages (README, "Your own data"; docs/datasets.md).
The importers are :mod:`villa.datasets.coco` and :mod:`villa.datasets.table`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from villa.regions.proposals import DEFAULT_MAX_PROPOSALS
from villa.storage.errors import VillaError, exit_on_error


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error: ...`` line (exit 2), like every villa error."""

    def error(self, message: str):
        raise VillaError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m villa.ingest", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="format", required=True, metavar="{coco,table}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="the dataset folder to create")
        p.add_argument("--splits", default=None, help="file naming each image's split (JSON or CSV); "
                       "default: a seeded 70/15/15 split by image")  # fmt: skip
        p.add_argument("--seed", type=int, default=0, help="seed of the default split (default: %(default)s)")
        p.add_argument("--copy_images", action="store_true",
                       help="copy the images into the dataset folder (default: reference them where they are)")  # fmt: skip
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing --out folder that is a villa dataset (docs/safety.md)")  # fmt: skip
        p.add_argument("--negated", choices=("drop", "keep"), default=None,
                       help="attributes a text mentions only to deny them ('no star'): drop or keep (default: the "
                       "vocabulary file's 'negated', else drop); recorded in the dataset's attributes.yaml")  # fmt: skip
        p.add_argument("--uncertain", choices=("keep", "drop"), default=None,
                       help="attributes a text mentions only as possible ('possibly a star'): keep or drop "
                       "(default: the vocabulary file's 'uncertain', else keep)")  # fmt: skip
        p.add_argument("--no_progress", action="store_true", help="hide progress bars")

    coco = sub.add_parser("coco", help="COCO instances + captions JSON")
    coco.add_argument("--images", required=True, help="folder of the images (file_name is relative to it)")
    coco.add_argument("--instances", required=True, help="COCO instances JSON (boxes and categories)")
    coco.add_argument("--captions", required=True, help="COCO captions JSON")
    coco.add_argument("--attributes", default=None, help="vocabulary YAML (default: the categories)")
    coco.add_argument("--regions", default=None,
                      help="boxes (the instance boxes, default), proposals[:K] (villa's region proposer, top K; "
                           f"K={DEFAULT_MAX_PROPOSALS} when omitted) or grid:RxC")  # fmt: skip
    coco.add_argument("--proposals", default=None,
                      help="COCO detection-results JSON of region proposals to use as regions")  # fmt: skip
    coco.add_argument(
        "--max_regions", type=int, default=100, help="proposals kept per image (default: %(default)s)"
    )
    coco.add_argument(
        "--min_score", type=float, default=0.0, help="lowest proposal score kept (default: %(default)s)"
    )
    common(coco)

    table = sub.add_parser("table", help="CSV or JSONL of image paths and texts")
    table.add_argument(
        "--table",
        required=True,
        help="CSV or JSONL with columns image, text [, id, split, boxes, region_labels]",
    )
    table.add_argument(
        "--images", default=None, help="folder the image paths are relative to (default: the table's)"
    )
    table.add_argument("--attributes", required=True, help="vocabulary YAML (attributes.yaml)")
    table.add_argument("--regions", default=None,
                       help="regions of the images without boxes: proposals[:K] (villa's region proposer, top K; "
                            f"K={DEFAULT_MAX_PROPOSALS} when omitted) or grid:RxC (e.g. grid:3x3)")  # fmt: skip
    common(table)
    return parser


@exit_on_error
def main(argv: Sequence[str] | None = None):
    from villa.datasets.importing import run_import

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    created_by = "python -m villa.ingest " + shlex.join(argv)
    common = {
        "splits": args.splits,
        "seed": args.seed,
        "copy_images": args.copy_images,
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
        "created_by": created_by,
        "negated": args.negated,
        "uncertain": args.uncertain,
    }
    if args.format == "coco":
        from villa.datasets.coco import import_coco

        return run_import(lambda: import_coco(
            args.images, args.instances, args.captions, args.out, attributes=args.attributes,
            regions=args.regions, proposals=args.proposals, max_regions=args.max_regions, min_score=args.min_score, **common,
        ))  # fmt: skip
    from villa.datasets.table import import_table

    return run_import(lambda: import_table(
        args.table, args.out, attributes=args.attributes, images=args.images, regions=args.regions, **common
    ))  # fmt: skip


if __name__ == "__main__":
    main()
