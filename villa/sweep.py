"""``python -m villa.sweep``: the DocMNIST sample-complexity experiment (see villa/configs/sweep.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from villa.hydra_app import hydra_main


@hydra_main(config_name="sweep")
def main(cfg: DictConfig) -> None:
    from villa.complexity_sweep import format_results, run_sweep

    results = run_sweep(
        complexities=list(cfg.complexities),
        attribute_budget=cfg.attribute_budget,
        out_dir=cfg.out_dir,
        val_attribute_budget=cfg.val_attribute_budget,
        test_attribute_budget=cfg.test_attribute_budget,
        data_root=cfg.data_root,
        seed=cfg.seed,
        encoder=cfg.encoder,
        clip_weights=cfg.clip_weights,
        device=cfg.device,
        stage1=OmegaConf.to_container(cfg.stage1),
        stage2=OmegaConf.to_container(cfg.stage2),
        progress=cfg.progress,
    )
    print(format_results(results))
    print(f"results: {cfg.out_dir}/results.csv and {cfg.out_dir}/results.png")


if __name__ == "__main__":
    main()
