"""``python -m villa.export run_dir=RUN_DIR out=DIR [float16=true]``: a self-contained model folder that
``villa.load`` and ``python -m villa.predict`` open without the run or its dataset (:mod:`villa.inference.model_folder`)."""

from villa.engine.hydra_app import hydra_main


@hydra_main(config_name="export")
def main(cfg):
    from villa.inference.model import export_model
    from villa.storage.errors import print_villa_warnings

    print_villa_warnings()
    out = export_model(
        cfg.run_dir, cfg.out, float16=bool(cfg.float16), clip_weights=cfg.clip_weights, note=cfg.note
    )
    sizes = sorted((p.name, p.stat().st_size) for p in out.iterdir() if p.is_file())
    print(f"wrote {out}: " + ", ".join(f"{name} ({size / 2**20:.2f} MB)" for name, size in sizes))
    return out


if __name__ == "__main__":
    main()
