"""``python -m villa.predict model=PATH images=PATH_OR_GLOB queries='["a red star"]' out=DIR [key=value ...]``:
ground free-text queries in images (keys: ``villa/configs/predict.yaml``; outputs: :mod:`villa.inference.prediction`)."""

from villa.engine.hydra_app import hydra_main


@hydra_main(config_name="predict")
def main(cfg):
    from omegaconf import OmegaConf

    from villa.inference.model import load
    from villa.inference.prediction import predict_images
    from villa.storage.errors import print_villa_warnings

    print_villa_warnings()
    queries = OmegaConf.to_container(cfg.queries) if OmegaConf.is_config(cfg.queries) else cfg.queries
    images = OmegaConf.to_container(cfg.images) if OmegaConf.is_config(cfg.images) else cfg.images
    model = load(cfg.model, device=cfg.device)
    result = predict_images(
        model,
        images,
        queries,
        cfg.out,
        regions=str(cfg.regions),
        boxes_file=cfg.boxes,
        top_k=cfg.top_k,
        score_threshold=float(cfg.score_threshold),
        nms_iou=cfg.nms_iou,
        heatmap=bool(cfg.heatmap),
        heatmap_cells=int(cfg.heatmap_cells),
        heatmap_window=int(cfg.heatmap_window),
        draw=bool(cfg.draw),
        progress=bool(cfg.progress),
    )
    print(
        f"{len(result['annotations'])} boxes for {len(result['categories'])} queries in {len(result['images'])} "
        f"images -> {cfg.out}/predictions.json, predictions.csv"
        + (", drawn/" if cfg.draw else "")
        + (", heatmaps/" if cfg.heatmap else "")
    )
    return result


if __name__ == "__main__":
    main()
