"""Every shipped config parses and validates; impossible settings fail at start naming the field."""
import importlib.util
import json
import pathlib
import random

import pytest

from vflan_jax.models.config import get_preset
from vflan_jax.train import config as train_config, recipes

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))


def load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    """The files each recipe names, with one valid record each (validation checks they exist)."""
    root = tmp_path_factory.mktemp("data")
    record = [{"id": "1", "image": "a.jpg", "task_name": "t",
               "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}]
    for rel in ("vision-flan/vision_flan.json", "llava/llava_instruct_150k.json",
                "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(record))
    for rel in ("vision-flan/images", "llava/coco/train2017", "LLaVA-Pretrain/images"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    return root


def test_the_expected_configs_ship():
    expected = {"demo", "llava15_pretrain", "vflan_stage1", "vflan_stage2", "mixed_single_stage", "ablation_tasks"}
    assert expected <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_parses_and_validates(name, fake_data, tmp_path):
    c = load(name)
    for field in ("total_steps", "log_every_steps", "checkpoint_every_steps", "seed"):
        assert isinstance(c[field], int), field
    text = (REPO / "configs" / f"{name}.py").read_text()
    assert "python -m vflan_jax.train --config configs/" + name + ".py" in text, "docstring must carry the command"
    assert "runtime" in text.lower() or "minutes" in text.lower()
    with c.unlocked():
        for source in list(c.data.sources.values()) + list(c.eval_data.values()):
            if not source.image_folder.startswith("{"):   # recipe paths default to data/<dataset>/...
                source.paths = [str(fake_data / p.split("data/", 1)[-1]) for p in source.paths]
                source.image_folder = str(fake_data / source.image_folder.split("data/", 1)[-1])
        if c.synthetic_suite:
            from vflan_jax.data.synthetic import write_task_suite
            suite = write_task_suite(tmp_path / "suite", instances_per_task=2)
            train_config.substitute_paths(c, {"synthetic": suite.root})
        c.tokenizer = c.tokenizer or str(tmp_path)
    train_config.validate(c, num_devices=8, process_count=1)
    model = train_config.model_config(c)
    assert model.tokens_per_image > 0


@pytest.mark.parametrize("name,arg,size", [("vflan_stage1", "size=7b", "7b"), ("vflan_stage2", "size=13b", "13b")])
def test_size_argument_changes_the_model(name, arg, size):
    c = load(name, arg)
    assert train_config.model_config(c).text == get_preset(size).text


def test_recipe_numbers():
    s1, s2, pre = load("vflan_stage1"), load("vflan_stage2"), load("llava15_pretrain")
    assert (s1.optim.learning_rate, s1.global_batch_size, s1.total_steps) == (2e-5, 128, 13003)
    assert (s1.optim.warmup_ratio, s1.optim.weight_decay, s1.optim.max_grad_norm) == (0.03, 0.0, 1.0)
    assert (s1.data.max_length, s1.data.template, s1.data.image_aspect) == (2048, "vicuna_v1", "pad")
    assert (s2.optim.learning_rate, s2.global_batch_size, s2.total_steps) == (1e-5, 64, 128)
    assert s2.data.sources.llava.subset == 1000
    assert (pre.optim.learning_rate, pre.global_batch_size, tuple(pre.optim.trainable)) == (1e-3, 256, ("projector",))
    assert (pre.data.template, pre.data.image_aspect) == ("plain", "square")
    ab = load("ablation_tasks", "tasks=10,per_task=10000")
    vflan = ab.data.sources.vflan
    assert (vflan.budget_tasks, vflan.budget_per_task, ab.total_steps) == (10, 10000, 782)


def _demo(tmp_path):
    from vflan_jax.data.synthetic import write_task_suite
    c = load("demo")
    suite = write_task_suite(tmp_path / "suite", instances_per_task=2)
    with c.unlocked():
        train_config.substitute_paths(c, {"synthetic": suite.root})
    return c


@pytest.mark.parametrize("change,message", [
    (lambda c: setattr(c, "global_batch_size", 6),
     "config global_batch_size: 6 is not divisible by mesh data x fsdp = 4"),
    (lambda c: setattr(c.data, "template", "vicuna_v2"), "data config: template: 'vicuna_v2' is not one of"),
    (lambda c: setattr(c, "nonfinite", "ignore"), "config nonfinite: 'ignore' is not one of"),
    (lambda c: setattr(c.mesh, "tensor", 3), "config mesh: mesh shape"),
    (lambda c: setattr(c, "grad_accum_steps", 3), "config grad_accum_steps"),
    (lambda c: setattr(c.optim, "warmup_ratio", 1.5), "config optim.warmup_ratio"),
])
def test_impossible_configs_name_the_field(tmp_path, change, message):
    c = _demo(tmp_path)
    with c.unlocked():
        c.mesh.data, c.mesh.fsdp = 2, 2
        change(c)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        train_config.validate(c, num_devices=4, process_count=1)


def test_image_size_not_divisible_by_patch_names_the_field(tmp_path):
    c = _demo(tmp_path)
    with c.unlocked():
        c.model.overrides = {"vision": {"image_size": 60}}
    with pytest.raises(ValueError, match="config model: .*image_size=60 is not divisible by vision.patch_size=14"):
        train_config.model_config(c)


def test_init_from_with_other_shapes_names_the_fields():
    with pytest.raises(ValueError, match=r"model.text.hidden_size: config 128 vs checkpoint 512"):
        train_config.check_init_shapes(get_preset("tiny"), get_preset("small"), "ckpt/x")


def test_bad_config_argument_is_named():
    with pytest.raises(ValueError, match="size='70b'"):
        load("vflan_stage1", "size=70b")
    with pytest.raises(ValueError, match="'sise' is unknown"):
        load("vflan_stage1", "sise=7b")


def test_config_arguments_take_the_type_of_their_defaults():
    rng = random.Random(17)
    tasks, rate, name = rng.randint(1, 10**6), rng.uniform(-5, 5), f"run{rng.randint(0, 99)}"
    got = recipes.parse_arg(f"tasks={tasks},rate={rate!r},name={name},lora=1",
                            tasks=187, rate=0.5, name="x", lora=False, untouched=3)
    assert got == {"tasks": tasks, "rate": rate, "name": name, "lora": True, "untouched": 3}
    assert [type(got[k]) for k in ("tasks", "rate", "name", "lora")] == [int, float, str, bool]
    # a float default takes an integer spelling; a str default keeps digits as text
    assert recipes.parse_arg("rate=3,name=007", rate=0.5, name="x") == {"rate": 3.0, "name": "007"}


@pytest.mark.parametrize("text,value", [("1", True), ("true", True), ("Yes", True),
                                        ("0", False), ("FALSE", False), ("no", False)])
def test_boolean_config_arguments(text, value):
    assert recipes.parse_arg(f"lora={text}", lora=not value)["lora"] is value


@pytest.mark.parametrize("arg,message", [("tasks=ten", "tasks='ten': expected int, like the default 187"),
                                         ("tasks=1.5", "tasks='1.5': expected int"),
                                         ("rate=fast", "rate='fast': expected float"),
                                         ("lora=2", "lora='2': use 1 or 0")])
def test_a_config_argument_of_the_wrong_type_is_named(arg, message):
    with pytest.raises(ValueError, match=message):
        recipes.parse_arg(arg, tasks=187, rate=0.5, lora=False)


def test_recipes_read_typed_arguments():
    assert load("vflan_stage2", "num_conversations=500").data.sources.llava.subset == 500
    assert load("mixed_single_stage", "num_conversations=500").data.sources.llava.subset == 500
    assert load("demo", "lora=true").lora.rank == 64 and load("demo", "lora=0").lora.rank == load("demo").lora.rank == 0
    with pytest.raises(ValueError, match="per_task='many'"):
        load("ablation_tasks", "per_task=many")
