"""Hydra glue shared by every ``python -m villa.<entry>``: config location, resolvers, one-line errors."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from villa.errors import VillaError, run_entry
from villa.paths import project_dir

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def register_resolvers() -> None:
    """``${villa_project_dir:}`` resolves to PROJECT_DIR (env, then .env, then the repo root)."""
    OmegaConf.register_new_resolver("villa_project_dir", lambda: str(project_dir()), replace=True)


def hydra_main(
    default_experiment: str | None = None, config_name: str = "default"
) -> Callable[[Callable[[DictConfig], object]], Callable]:
    """Decorate ``main(cfg)`` as a Hydra app on ``villa/configs/<config_name>.yaml``.

    ``default_experiment`` is used when the command line names none, so ``python -m villa.stage1`` works.
    A :class:`VillaError` raised inside prints ``error: <message>`` and exits with 2.
    """

    def decorate(func: Callable[[DictConfig], object]) -> Callable[[], None]:
        @functools.wraps(func)
        def entry() -> None:
            register_resolvers()
            if default_experiment and not any(
                a.split("=")[0].lstrip("+~") == "experiment" for a in sys.argv[1:]
            ):
                sys.argv.append(f"experiment={default_experiment}")

            def task(cfg: DictConfig) -> None:
                run_entry(func, cfg)

            import hydra

            hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(task)()

        return entry

    return decorate


def compose(overrides: Sequence[str] = (), config_name: str = "default") -> DictConfig:
    """Compose the config as the command line would (for tests, notebooks and the sweep)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def to_container(cfg: DictConfig) -> dict:
    """Resolved plain-dict copy of a config (stored in checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def require_stage(cfg: DictConfig, stage: str) -> None:
    """Refuse an experiment meant for another entry point."""
    if cfg.get("stage") != stage:
        raise VillaError(
            f"experiment '{cfg.get('task_name')}' is a '{cfg.get('stage')}' experiment, but this command runs '{stage}'"
        )
