"""``python -m villa.evaluate experiment=<name> [key=value ...]``: retrieval metrics on the test split."""

from villa.engine.hydra_app import hydra_main


def check(cfg) -> None:
    from villa.evaluation.run import check_evaluation_config

    check_evaluation_config(cfg)


@hydra_main("docmnist_stage2", generic_experiment="stage2", check=check)
def main(cfg):
    from villa.evaluation.run import evaluate_from_config

    return evaluate_from_config(cfg)


if __name__ == "__main__":
    main()
