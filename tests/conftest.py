"""Fixtures shared by several test files: tiny metric models saved to a temporary folder, a
random-weight tiny-sd3 backbone, and a real small filesystem that fills up (small_disk)."""

import os
import subprocess

import pytest
import tiny_metric_models
import tiny_pipelines

import files
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


@pytest.fixture(autouse=True)
def no_run_kept_from_another_test():
    """files.on_interrupt describes the one run of a process; a test is a process of its own here."""
    yield
    files.ON_INTERRUPT.clear()


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(kb) -> a folder on a real filesystem of `kb` kB (a tmpfs mounted for the test, unmounted
    after it), which fills up as a user's disk does: the libraries meet their own ENOSPC and raise what they
    really raise. Mounting needs root (or CAP_SYS_ADMIN): elsewhere the test is skipped, saying so."""
    mounted = []

    def mount(kb=512):
        if os.geteuid() != 0:
            pytest.skip("a real full disk is a tmpfs mounted for the test, which needs root")
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)
