"""Precompute DocMNIST embeddings: attr_embs.pth, region_embs/ and text_embs/ in the dataset folder.

    python3 preprocess/preprocess_docmnist.py --data_dir=docmnist_30000_15.2
    python3 preprocess/preprocess_docmnist.py --data_dir=docmnist_30000_15.2 \\
        --encoder=clip_rn50 --clip_weights=/path/to/RN50.pt --device=cuda

The ``default`` encoder works offline; its image tower is untrained (see villa/encoders/__init__.py),
so by default its stage-1 region embeddings are the richer untrained descriptor of
villa/encoders/rich.py (``--region_features=rich``); ``--region_features=reference`` gives the SPEC
recipe. The stage-2 image tower is the reference recipe either way.
"""

from __future__ import annotations

import argparse
import json

from villa.errors import exit_on_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data_dir", required=True, help="dataset folder, or its name under the data root")
    parser.add_argument(
        "--encoder", default="default", help="default | clip_rn50 | hf:<folder> (default: %(default)s)"
    )
    parser.add_argument(
        "--clip_weights", default=None, help="CLIP RN50 weights file (OpenAI RN50.pt or a state dict)"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: %(default)s)")
    parser.add_argument(
        "--batch_size", type=int, default=64, help="images per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--region_features",
        choices=("rich", "reference"),
        default=None,
        help="stage-1 region embeddings: rich (untrained multi-block descriptor, default for the "
        "default encoder) | reference (SPEC recipe, default for clip_rn50)",
    )
    parser.add_argument(
        "--amp",
        action="store_true",
        help="CUDA mixed precision for the image tower (faster, less exact; the rich stage-1 "
        "features always run in float32)",
    )
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


@exit_on_error
def main(argv: list[str] | None = None) -> dict:
    from villa.preprocess import preprocess_dataset

    args = build_parser().parse_args(argv)
    summary = preprocess_dataset(
        args.data_dir,
        encoder=args.encoder,
        clip_weights=args.clip_weights,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        amp=args.amp,
        region_features=args.region_features,
    )
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
