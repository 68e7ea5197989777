from __future__ import annotations

import pytest

from tests.models import tiny_llama_kbit


@pytest.fixture(scope="session")
def kbit_dir(tmp_path_factory):
    """A saved full-precision tiny Llama (fp32) that the tests load quantised."""
    directory = tmp_path_factory.mktemp("kbit-base")
    tiny_llama_kbit().save_pretrained(directory)
    return directory
