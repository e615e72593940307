"""config.profile_steps: a 3-step run traces steps 2 and 3 (and only those) into workdir/profile
for TensorBoard; a bad value is named by validate (the trainer exits 2 with that line)."""
import gzip
import json
import re

import pytest

from tests.train.cli import run, train_args
from vflan_jax.data.pipeline import source_config
from vflan_jax.train import config as train_config


@pytest.mark.slow   # runs the trainer in a subprocess
def test_profile_steps_writes_a_trace_of_the_chosen_steps(tmp_path):
    workdir = tmp_path / "w"
    proc = run(train_args(workdir, tmp_path / "suite", steps=3, eval_max_examples=0, profile_steps="(2, 3)"))
    traces = list((workdir / "profile" / "plugins" / "profile").glob("*/*.trace.json.gz"))
    assert len(traces) == 1, proc.stderr[-3000:]   # consecutive steps: one trace
    assert list(traces[0].parent.glob("*.xplane.pb"))   # what TensorBoard's profile tab reads
    events = json.load(gzip.open(traces[0]))["traceEvents"]
    # The Python tracer names each call "$file:line function": TrainProgram.train_step ran twice inside it.
    calls = [e for e in events if re.fullmatch(r"\$program\.py:\d+ train_step", str(e.get("name")))]
    assert len(calls) == 2
    assert "profile of steps 2-3 written to" in proc.stderr


@pytest.mark.parametrize("value,ok", [((), True), ((1, 3), True), ((4,), True),
                                      ((0,), False), ((5,), False), ((2, "x"), False), ((1.5,), False),
                                      ((True,), False)])
def test_profile_steps_are_validated_by_name(tmp_path, value, ok):
    (tmp_path / "images").mkdir()
    (tmp_path / "d.json").write_text("[]")
    cfg = train_config.base_config()
    cfg.total_steps, cfg.tokenizer, cfg.global_batch_size, cfg.profile_steps = 4, str(tmp_path), 8, value
    cfg.data.sources.train = source_config(str(tmp_path / "d.json"), str(tmp_path / "images"))
    if ok:
        train_config.validate(cfg, num_devices=8, process_count=1)
    else:
        with pytest.raises(ValueError, match=r"^config profile_steps: must be step numbers in \[1, total_steps=4\]"):
            train_config.validate(cfg, num_devices=8, process_count=1)
