"""Precompute DocMNIST embeddings: an alias of preprocess_dataset.py, kept for the published command line.

python3 preprocess/preprocess_docmnist.py --data_dir=docmnist_30000_15.2
"""

from villa.features.preprocess import cli_main as main

if __name__ == "__main__":
    main()
