from setuptools import find_packages, setup

#: experiment trackers (logger=tensorboard|wandb|mlflow|many; docs/tracking.md), each an optional extra
TRACKERS = {
    "tensorboard": ["tensorboard>=2.14"],
    "wandb": ["wandb>=0.19.10"],  # wandb.init(reinit="create_new"): one run after another in a sweep
    # the tracking client and its file store; `pip install mlflow` adds the `mlflow ui` server
    "mlflow": ["mlflow-skinny>=2.10"],
}

setup(
    name="villa",
    version="0.1.0",
    description="ViLLA: fine-grained vision-language learning from data with high image-text sample complexity",
    python_requires=">=3.10",
    packages=find_packages(include=["villa", "villa.*"]),
    package_data={"villa": ["configs/*.yaml", "configs/*/*.yaml", "example_model/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.1,<2.15",
        "torchvision>=0.16,<0.30",
        "numpy>=1.24",
        "pandas>=2.0",
        "pyarrow>=12",
        "pillow>=9",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3",
        "python-dotenv>=1.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "transformers>=4.40",
        "open-clip-torch>=2.20",
        "pycocotools>=2.0.6",
        "huggingface-hub>=0.20",  # clip_weights=openai: open_clip's Hub cache and download
        "safetensors>=0.4",  # the Hub copy of OpenAI's RN50 is a safetensors state dict
        "scikit-image>=0.21",  # the region proposer's Felzenszwalb segmentation (villa.regions.proposals)
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "nbclient>=0.7",
            "nbformat>=5",
            "ipykernel>=6",
            "ruff>=0.5",
            "pre-commit>=3",
            *(
                req for reqs in TRACKERS.values() for req in reqs
            ),  # tests/test_tracking.py reads each one back
        ],
        **TRACKERS,
    },
)
