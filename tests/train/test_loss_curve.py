"""loss_curve.png draws the final evaluation (a metrics record with `eval` and no `loss`)."""
import numpy as np
from PIL import Image

from vflan_jax.train.metrics import MetricsWriter, loss_curve_series, plot_loss_curve, read_metrics


def test_final_evaluation_is_in_the_loss_curve(tmp_path):
    rng = np.random.default_rng(0)
    losses, evals = rng.uniform(1, 3, 4), rng.uniform(1, 3, 4)
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    for i, step in enumerate((10, 20, 30, 40)):
        record = {"loss": losses[i], "learning_rate": 1e-3 * (4 - i)}
        if step == 20:  # a mid-run evaluation rides on the step's record
            record["eval"] = {"heldout_loss": evals[0], "heldout_accuracy": 0.5, "val_loss": evals[1]}
        writer.write(step, record)
    writer.write(40, {"eval": {"heldout_loss": evals[2], "val_loss": evals[3], "heldout_per_task": {}}})  # final
    writer.close()

    series = loss_curve_series(read_metrics(writer.path))
    assert series["train loss (token mean)"] == ([10, 20, 30, 40], list(losses))
    assert series["learning rate"][1] == [4e-3, 3e-3, 2e-3, 1e-3]
    assert series["eval heldout_loss"] == ([20, 40], [evals[0], evals[2]])
    assert series["eval val_loss"] == ([20, 40], [evals[1], evals[3]])
    assert set(series) == {"train loss (token mean)", "learning rate", "eval heldout_loss", "eval val_loss"}

    png = tmp_path / "loss_curve.png"
    plot_loss_curve(writer.path, str(png))
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 100
