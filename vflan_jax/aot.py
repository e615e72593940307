"""Will a config fit its hardware? `python -m vflan_jax.aot --config configs/NAME.py[:arg] --topology v5p:2x2x2`.

Compiles the trainer's own programs (vflan_jax/train/program.py: the train step and the state
constructor, same shardings) for a target this machine need not have, from abstract inputs
(nothing is allocated), and prints their memory per device:

    --topology v5p:2x2x2   a TPU slice, compiled by the real TPU compiler (needs libtpu:
                           `pip install -e .[tpu]` or requirements-tpu.txt; no TPU needed)
    --topology cpu:8       8 simulated CPU devices

The batch is the config's largest: global_batch_size x data.max_length, K image slots per row.
Peak = arguments + outputs - donated (aliased) + temporaries, the compiler's own accounting.
Exit status (vflan_jax/cli.py): 0 fits; 1 does not fit ("does not fit: needs X GiB", also
when the compiler itself runs out of memory); 2 bad input (config, topology, libtpu missing).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from vflan_jax.cli import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, parse_absl_flags

GIB = 1024 ** 3
# HBM per chip as the TPU compiler reports it ("exceeds available HBM (95.74G)" for v5p);
# per-device memory is not queryable for topology devices ("only supported for addressable devices").
TPU_HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5litepod": 16.0, "v5p": 95.74, "v6e": 32.0}
# The per-task loss sums are [num_tasks] floats; their size does not matter to memory.
AOT_NUM_TASKS = 256

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).",
                                          lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology (v5p:2x2x2) or cpu:N simulated CPU devices.")
_MEMORY = flags.DEFINE_float("device_memory_gib", None, "Memory per device to check against (default: the "
                             "chip's HBM; cpu: host memory / N). E.g. 74.5 for an 80 GB GPU.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")


class BadInput(ValueError):
    pass


def target_devices(topology: str):
    """(devices, device memory in GiB or None) for 'v5p:2x2x2' or 'cpu:8'."""
    import jax
    kind, _, shape = topology.partition(":")
    if kind == "cpu":
        if not shape.isdigit() or int(shape) < 1:
            raise BadInput(f"--topology {topology}: cpu:N needs a device count, e.g. cpu:8")
        devices = jax.devices("cpu")
        if len(devices) != int(shape):
            raise BadInput(f"--topology {topology}: this process has {len(devices)} CPU devices")
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        return devices, total / len(devices)
    try:
        from jax.experimental import topologies
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # noqa: BLE001 - libtpu absent or an unknown name: one line either way
        import importlib.util
        if importlib.util.find_spec("libtpu") is None:
            raise BadInput(f"--topology {topology}: TPU topologies need libtpu "
                           "(pip install -e .[tpu], or -r requirements-tpu.txt)") from None
        raise BadInput(f"--topology {topology}: {str(e).splitlines()[0]}") from None
    return desc.devices, TPU_HBM_GIB.get(kind)


def _prepare_cpu_devices(topology: str) -> None:
    """cpu:N must be set before JAX starts its CPU backend (an inherited device-count flag is dropped)."""
    kind, _, n = (topology or "").partition(":")
    if kind != "cpu" or not n.isdigit():
        return
    os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(n))


def _shard_bytes(tree) -> int:
    import jax
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def measure(cfg, topology: str, device_memory_gib: float | None = None) -> dict:
    """Compiles both programs for the target; returns the report (sizes in bytes per device).
    A compile that runs out of memory gives {"fits": False, "needs_gib": ...}."""
    import jax

    from vflan_jax import parallel
    from vflan_jax.models.attention import resolve_implementation
    from vflan_jax.train import config as train_config
    from vflan_jax.train.program import abstract_batch, build_program, is_out_of_memory, needed_gib

    devices, memory_gib = target_devices(topology)
    memory_gib = device_memory_gib or memory_gib
    # 'auto' means the target's kernel (splash on TPU), not this machine's.
    cfg.model.attention_impl = resolve_implementation(cfg.model.attention_impl, platform=devices[0].platform)
    if not cfg.tokenizer and not cfg.synthetic_suite:
        cfg.tokenizer = "unused"   # aot reads no data and no tokenizer; validate() would ask for one
    try:
        try:
            train_config.validate(cfg, len(devices), 1)
        except ValueError as e:   # the data files need not exist where one compiles
            if not str(e).startswith("data config: sources"):
                raise
        model_cfg = train_config.model_config(cfg, None)
        mesh = parallel.make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices=devices)
        program = build_program(cfg, model_cfg, mesh, num_tasks=AOT_NUM_TASKS,
                                rules=train_config.sharding_rules(cfg))
    except ValueError as e:
        raise BadInput(str(e)) from None
    report = {"topology": topology, "devices": len(devices), "device_kind": devices[0].device_kind,
              "mesh": dict(mesh.shape), "global_batch_size": cfg.global_batch_size,
              "grad_accum_steps": cfg.grad_accum_steps, "max_length": cfg.data.max_length,
              "model": cfg.model.preset, "remat_policy": cfg.model.remat_policy,
              "attention_impl": cfg.model.attention_impl, "device_memory_gib": memory_gib,
              "parameters": _shard_bytes(program.abstract_state.params),
              "optimizer_state": _shard_bytes(program.abstract_state.opt_state)}
    for name, lower in (("state_constructor", program.lower_create_state),
                        ("train_step", lambda: program.lower_train_step(abstract_batch(cfg, model_cfg,
                                                                                        program.batch_sharding)))):
        try:
            report[name] = _memory(lower().compile())
        except jax.errors.JaxRuntimeError as e:
            if not is_out_of_memory(e):
                raise
            report.update(fits=False, failed=name, needs_gib=needed_gib(e), error=str(e).splitlines()[0][:300])
            return report
    step = report["train_step"]
    step["other_arguments"] = step["arguments"] - report["parameters"] - report["optimizer_state"]
    peak = max(step["peak"], report["state_constructor"]["peak"])
    report["peak"] = peak
    if memory_gib:
        report["fits"] = peak <= memory_gib * GIB
        report["headroom"] = 1 - peak / (memory_gib * GIB)
        if not report["fits"]:
            report["needs_gib"] = peak / GIB
    return report


def format_report(r: dict) -> str:
    def gib(b):
        return f"{b / GIB:9.2f} GiB" if b >= GIB / 10 else f"{b / 1024 ** 2:9.2f} MiB"

    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    lines = [f"{r['topology']}: {r['devices']} x {r['device_kind']}, mesh {mesh}; global batch "
             f"{r['global_batch_size']} x {r['max_length']} tokens, grad_accum_steps {r['grad_accum_steps']}, "
             f"remat {r['remat_policy']}, attention {r['attention_impl']}",
             "per device:",
             f"  parameters        {gib(r['parameters'])}",
             f"  optimizer state   {gib(r['optimizer_state'])}"]
    if "train_step" in r:
        s, c = r["train_step"], r["state_constructor"]
        lines += [f"  other arguments   {gib(s['other_arguments'])}",
                  f"  temporaries       {gib(s['temporaries'])}   (state constructor: {gib(c['temporaries']).strip()})",
                  f"  peak              {gib(r['peak'])}   (train step {gib(s['peak']).strip()}, "
                  f"state constructor {gib(c['peak']).strip()})"]
    memory = f"{r['device_memory_gib']:.2f} GiB" if r.get("device_memory_gib") else "unknown"
    lines.append(f"  device memory     {memory}")
    if r.get("fits") is True:
        lines.append(f"fits: yes, headroom {r['headroom']:.1%}")
    elif r.get("fits") is False:
        needs = f"{r['needs_gib']:.2f} GiB" if r.get("needs_gib") else "more than the device has"
        where = f" ({r['failed'].replace('_', ' ')} ran out at compile time)" if r.get("failed") else ""
        lines.append(f"does not fit: needs {needs}{where}")
    return "\n".join(lines)


def main(argv):
    del argv
    if not _TOPOLOGY.value:
        raise app.UsageError("--topology is required (v5p:2x2x2, cpu:8)")
    logging.getLogger().setLevel(logging.WARNING)
    from vflan_jax.train.program import MEMORY_FIELDS, DoesNotFit
    try:
        report = measure(_CONFIG.value, _TOPOLOGY.value, _MEMORY.value)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DoesNotFit as e:   # out of memory while lowering (compiling is measured, not raised)
        print(f"error: {e}", file=sys.stderr)   # "does not fit in device memory: ..., change ..."
        return EXIT_FAILURE
    print(json.dumps(report, indent=1) if _JSON.value else format_report(report), flush=True)
    if report.get("fits") is False:
        needs = f"{report['needs_gib']:.2f} GiB" if report.get("needs_gib") else "more than the device has"
        print(f"does not fit: needs {needs} per device; change " + "; ".join(MEMORY_FIELDS), file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _run():
    flags.mark_flags_as_required(["config"])
    # cpu:N is fixed before any backend starts; absl has not parsed flags yet, so read argv.
    for i, arg in enumerate(sys.argv):
        if arg.startswith("--topology"):
            following = sys.argv[i + 1] if i + 1 < len(sys.argv) else ""
            _prepare_cpu_devices(arg.split("=", 1)[1] if "=" in arg else following)
    app.run(main, flags_parser=parse_absl_flags)


if __name__ == "__main__":
    _run()
