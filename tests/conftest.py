"""Fixtures shared by several test files: tiny metric models saved to a temporary folder, and a
random-weight tiny-sd3 backbone."""

import pytest
import tiny_metric_models
import tiny_pipelines

from shapes import backbones


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    return tiny_metric_models.save_clip(tmp_path_factory.mktemp("weights") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory):
    return tiny_metric_models.save_dino(tmp_path_factory.mktemp("dino") / "dino-vitb8")


@pytest.fixture(scope="module")
def tiny_sd3():
    return backbones.build_tiny("tiny-sd3")


@pytest.fixture(scope="session")
def stock_folder(tmp_path_factory):
    """stock_folder("sd3") -> the family's tiny stock pipeline saved in the hub's layout
    (tiny_pipelines.save_stock), written once per session and shared by every test file."""
    saved = {}

    def folder(family):
        if family not in saved:
            saved[family] = tiny_pipelines.save_stock(family, tmp_path_factory.mktemp("stock") / family)
        return saved[family]

    return folder
