"""``python -m villa.stage2 experiment=docmnist_stage2 [key=value ...]``: train the stage-2 model."""

from villa.hydra_app import hydra_main


@hydra_main("docmnist_stage2")
def main(cfg):
    from villa.vlm.run import run_stage2_from_config

    return run_stage2_from_config(cfg)


if __name__ == "__main__":
    main()
