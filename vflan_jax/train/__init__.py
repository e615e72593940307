"""The trainer: `python -m vflan_jax.train --config configs/NAME.py[:arg] --workdir W` (see __main__.py).

    config.py    the config's fields, validation, model config, path substitution
    recipes.py   what configs/*.py share (presets, stage settings, command-line arguments)
    optim.py     trainable masks, optimizer, learning-rate schedules
    step.py      the jitted train step (loss, gradient accumulation, update)
    program.py   the step and the state constructor compiled with their shardings (train and aot)
    evaluate.py  evaluation on held-out tasks during and after training
    metrics.py   metrics.jsonl / TensorBoard, the console progress line, the loss curve
    flops.py     FLOPs per step, for MFU
"""
