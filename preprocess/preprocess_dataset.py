"""Precompute a dataset's embeddings: attr_embs.pth, region_embs/ and text_embs/ in the dataset folder.

    python3 preprocess/preprocess_dataset.py --data_dir=DATA_DIR [--encoder=default] [--device=auto]
    python3 preprocess/preprocess_dataset.py --data_dir=DATA_DIR \\
        --encoder=clip_rn50 --clip_weights=/path/to/RN50.pt --device=cuda

Works on any dataset folder (``python -m villa.ingest`` or the DocMNIST generator makes one). The ``default``
encoder works offline; its image tower is untrained (see villa/encoders/__init__.py), so by default its
stage-1 region embeddings are the richer untrained descriptor of villa/encoders/rich.py
(``--region_features=rich``); ``--region_features=reference`` gives the reference recipe (docs/method.md section 3.2). The stage-2 image tower
is the reference recipe either way. Images are resized by the encoder's policy (villa/datasets/images.py).
"""

from villa.features.preprocess import cli_main as main

if __name__ == "__main__":
    main()
