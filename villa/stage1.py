"""Stage 1: ``python -m villa.stage1 experiment=docmnist_stage1 [key=value ...]`` (see villa.mapping.run)."""

from __future__ import annotations

from villa.hydra_app import hydra_main


@hydra_main(default_experiment="docmnist_stage1")
def main(cfg) -> None:
    from villa.mapping.run import run_stage1_from_config

    run_stage1_from_config(cfg)


if __name__ == "__main__":
    main()
