"""Weights & Biases, in one place: whether a config logs to it, the logger that continues a run by its id, sample
tables, and summary values, also into a run that has finished."""

from pathlib import Path

from omegaconf import DictConfig
from torchtune import config, utils

log = utils.get_logger("INFO")


def uses_wandb(metric_logger) -> bool:
    """Whether a ``metric_logger`` section, or a logger built from one, is torchtune's WandBLogger."""
    if isinstance(metric_logger, DictConfig | dict):
        return str(metric_logger.get("_component_", "")).endswith("WandBLogger")
    return type(metric_logger).__name__ == "WandBLogger"


def build_logger(section: DictConfig, run_id: str | None):
    """The config's logger and its W&B run id (None for other loggers). With ``run_id`` a W&B run continues that
    run (same id, steps go on); its config may differ from the run's first (resume_from_checkpoint=True at
    least), which W&B must accept."""
    if not uses_wandb(section):
        return config.instantiate(section), None
    import wandb

    resume = {"id": run_id, "resume": "allow", "allow_val_change": True} if run_id else {}
    logger = config.instantiate(section, **resume)
    return logger, wandb.run.id if wandb.run is not None else None


def log_samples(metric_logger, step: int, rows: list[tuple[str, str]]) -> None:
    """Sample answers: a W&B table when W&B is the logger, lines in the log otherwise."""
    if not uses_wandb(metric_logger):
        for prompt, answer in rows:
            log.info(f"sample at step {step} | {prompt!r} -> {answer!r}")
        return
    import wandb

    table = wandb.Table(columns=["step", "prompt", "answer"], data=[[step, p, a] for p, a in rows])
    wandb.log({"samples": table, "global_step": step})  # torchtune's WandBLogger steps by global_step too


def update_summary(metric_logger, values: dict[str, float]) -> None:
    """Values into the summary of the running W&B run (nothing for other loggers)."""
    if uses_wandb(metric_logger):
        import wandb

        wandb.run.summary.update(values)


def update_finished_run(cfg: DictConfig, run_id: str | None, values: dict[str, float]) -> None:
    """Values into the summary of a training run that has ended, resumed by its id in the run's log folder."""
    if not uses_wandb(cfg.metric_logger):
        return
    import wandb

    project, folder = cfg.metric_logger.get("project"), Path(cfg.metric_logger.get("log_dir") or cfg.output_dir)
    run = wandb.init(project=project, dir=str(folder), id=run_id, resume="allow" if run_id else None, job_type="eval")
    run.summary.update(values)
    run.finish()
