"""A PNG of a run's training curves (loss above, learning rate below), for the model card and the run folder.

Drawn on a ``Figure`` with its own Agg canvas rather than through pyplot, so that plotting neither picks a GUI
backend nor leaves figures registered in pyplot's global state.
"""

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lora_tools.checkpoints import write_file

FIGSIZE = (8.0, 6.0)  # inches
DPI = 100  # so the PNG is 800 x 600 pixels
COLORS = {"loss": "tab:blue", "val_loss": "tab:orange", "lr": "tab:green"}


def write_training_plot(history: list[dict], out: Path, title: str = "") -> Path:
    """Plot per-step records (``step`` with any of ``loss``, ``val_loss``, ``lr``) to ``out``; return ``out``.

    A series no record has is left out, so a run without validation or a logged learning rate still gets a plot.
    """
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True)
    _plot(loss_ax, history, "loss", "training loss", "-")
    _plot(loss_ax, history, "val_loss", "validation loss", "o-")
    _finish(loss_ax, "loss")
    _plot(lr_ax, history, "lr", "learning rate", "-")
    _finish(lr_ax, "learning rate")
    lr_ax.set_xlabel("step")
    if title:
        fig.suptitle(title)

    # print_png, not savefig: rcParams such as savefig.bbox would change the pixel size
    return write_file(out, canvas.print_png)


def _plot(ax, history: list[dict], key: str, label: str, style: str) -> None:
    """One series, over only the steps whose record has it (validation runs on a few steps)."""
    points = [(record["step"], record[key]) for record in history if record.get(key) is not None]
    if points:
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, style, label=label, color=COLORS[key], markersize=4)


def _finish(ax, ylabel: str) -> None:
    """Label a panel, or say that nothing was recorded for it instead of leaving it silently empty."""
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.set_yticks([])  # the default 0..1 scale would look like data
        ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="gray")
