"""``python -m villa.stage2 experiment=stage2|clip|... data_dir=DATA_DIR [key=value ...]``: train the stage-2 model.

With no experiment: ``stage2`` when ``data_dir=`` is given, else the DocMNIST preset ``docmnist_stage2``.
"""

from __future__ import annotations

from villa.engine.hydra_app import hydra_main


def check(cfg) -> None:
    from villa.vlm.run import check_stage2_config

    check_stage2_config(cfg)


@hydra_main("docmnist_stage2", generic_experiment="stage2", check=check)
def main(cfg):
    from villa.vlm.run import run_stage2_from_config

    return run_stage2_from_config(cfg)


if __name__ == "__main__":
    main()
