"""Fixtures shared by the data-layer tests (this helper's and the pipeline's)."""
import pytest

from vflan_jax.data import synthetic


@pytest.fixture(scope="session")
def synthetic_suite(tmp_path_factory):
    """The offline task suite + its LLaMA-style tokenizer, built once per session.

    Namespace with .root, .train_json, .val_json, .heldout_json, .chat_json, .image_folder,
    .tokenizer_dir (all str paths).
    """
    root = tmp_path_factory.mktemp("synthetic_suite")
    suite = synthetic.write_task_suite(root, instances_per_task=12, image_size=64, seed=0, chat_instances=12)
    synthetic.build_tokenizer(suite.tokenizer_dir, synthetic.suite_texts(suite))
    return suite


@pytest.fixture(scope="session")
def tokenizer(synthetic_suite):
    """The suite's tokenizer, loaded once (read-only in every test)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(synthetic_suite.tokenizer_dir)
