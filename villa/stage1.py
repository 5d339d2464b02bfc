"""Stage 1: ``python -m villa.stage1 experiment=stage1 data_dir=DATA_DIR [key=value ...]`` (see villa.mapping.run).

With no experiment: ``stage1`` when ``data_dir=`` is given, else the DocMNIST preset ``docmnist_stage1``.
"""

from __future__ import annotations

from villa.engine.hydra_app import hydra_main


def check(cfg) -> None:
    from villa.mapping.run import check_mapping_config

    check_mapping_config(cfg)


@hydra_main(default_experiment="docmnist_stage1", generic_experiment="stage1", check=check)
def main(cfg) -> None:
    from villa.mapping.run import run_stage1_from_config

    run_stage1_from_config(cfg)


if __name__ == "__main__":
    main()
