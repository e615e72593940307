"""Every numeric config field must be finite (issue 11 item 10): a nan learning rate would
otherwise surface later as a "non-finite loss" blamed on the batch's records."""
import math

import pytest

from vflan_jax.data.pipeline import source_config
from vflan_jax.train import config as train_config


def _valid(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "d.json").write_text("[]")
    c = train_config.base_config()
    c.tokenizer = str(tmp_path)
    c.data.sources.train = source_config(str(tmp_path / "d.json"), str(tmp_path / "images"))
    c.global_batch_size = 8
    return c


@pytest.mark.parametrize("field,value", [("optim.learning_rate", math.nan), ("optim.learning_rate", math.inf),
                                         ("optim.warmup_ratio", math.nan), ("checkpoint_timeout_s", -math.inf),
                                         ("data.max_skip_fraction", math.nan)])
def test_a_non_finite_number_is_named(tmp_path, field, value):
    c = _valid(tmp_path)
    train_config.validate(c, num_devices=8, process_count=1)   # valid as built
    node, _, leaf = field.rpartition(".")
    target = c
    for part in filter(None, node.split(".")):
        target = target[part]
    target[leaf] = value
    with pytest.raises(ValueError, match=rf"^config {field}: must be finite, got {value}$"):
        train_config.validate(c, num_devices=8, process_count=1)
