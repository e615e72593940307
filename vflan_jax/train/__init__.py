"""The trainer: `python -m vflan_jax.train --config configs/NAME.py[:arg] --workdir W` (see __main__.py).

    config.py    the config's fields, validation, model config, path substitution
    recipes.py   what configs/*.py share (presets, stage settings, command-line arguments)
    optim.py     trainable masks, optimizer, learning-rate schedules
    step.py      the jitted train step (loss, gradient accumulation, update)
    program.py   the step and the state constructor compiled with their shardings (train and aot)
    evaluate.py  evaluation on held-out tasks during and after training
    metrics.py   metrics.jsonl / TensorBoard, the console progress line, the loss curve
    flops.py     FLOPs per step, for MFU
  the loop's parts (__main__.py reads top to bottom with them):
    inputs.py    config paths made absolute, the offline task suite, the tokenizer
    parameter_table.py  the start-up parameter table (clu.parameter_overview)
    window.py    the steps since the last log line -> one metrics.jsonl record
    cadence.py   due(step, every, total): when to log, evaluate, save
    finite.py    the non-finite loss check, one step late
    profile.py   config.profile_steps: traces of chosen steps for TensorBoard
    stopping.py  SIGTERM/SIGINT, the stop watchdog, an exit that does not wait for stuck threads
    finish.py    the end of a run (final eval, model/, summary.json, loss curve) and finished runs
"""
