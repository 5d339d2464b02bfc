"""``python -m villa.sweep``: the DocMNIST sample-complexity experiment (see villa/configs/sweep.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from villa.engine.hydra_app import hydra_main


def _given(key: str) -> bool:
    """Whether the command line sets ``key`` (Hydra's task overrides)."""
    from hydra.core.hydra_config import HydraConfig

    return any(o.split("=")[0].lstrip("+~") == key for o in HydraConfig.get().overrides.task)


@hydra_main(config_name="sweep")
def main(cfg: DictConfig) -> None:
    from villa.docmnist.complexity_sweep import format_results, format_summary, run_sweep
    from villa.storage.errors import VillaError

    if _given("seed") and _given("seeds"):
        raise VillaError("give seeds=[...] or its single-seed shorthand seed=N, not both")
    results = run_sweep(
        complexities=list(cfg.complexities),
        attribute_budget=cfg.attribute_budget,
        out_dir=cfg.out_dir,
        seeds=list(cfg.seeds),
        methods=list(cfg.methods),
        val_attribute_budget=cfg.val_attribute_budget,
        test_attribute_budget=cfg.test_attribute_budget,
        data_root=cfg.data_root,
        encoder=cfg.encoder,
        clip_weights=cfg.clip_weights,
        device=cfg.device,
        stage1=OmegaConf.to_container(cfg.stage1),
        stage2=OmegaConf.to_container(cfg.stage2),
        progress=cfg.progress,
        logger=OmegaConf.to_container(cfg.logger, resolve=True),
        tags=OmegaConf.to_container(cfg.tags, resolve=True),
    )
    print(format_results(results))
    summary = format_summary(results)
    if summary:
        print(summary)
    out = cfg.out_dir
    print(f"results: {out}/results.csv, {out}/summary.csv, {out}/differences.csv and {out}/results.png")


if __name__ == "__main__":
    main()
