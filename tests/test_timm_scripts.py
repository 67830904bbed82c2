"""timm's ``validate.py``, ``benchmark.py`` and ``train.py`` on a ``blockzoo_*`` model, offline.

The scripts live in timm's source repository, not in its wheel or sdist: set ``TIMM_SCRIPTS`` to
a directory holding them (a checkout of huggingface/pytorch-image-models) to run these tests;
without it they are skipped. The data is an ImageFolder of random images made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(os.environ.get("TIMM_SCRIPTS", "")) if os.environ.get("TIMM_SCRIPTS") else None
pytestmark = pytest.mark.skipif(
    SCRIPTS is None or not (SCRIPTS / "validate.py").is_file(),
    reason="set TIMM_SCRIPTS to a directory with timm's validate.py, benchmark.py, train.py",
)
ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = (
    "import runpy, sys\n"
    "from blockzoo.integrations.timm import register_models\n"
    "register_models(); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')\n"
)
MODEL = "blockzoo_resnet_cifar"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def run_script(script: str, *args: str, cwd: Path) -> str:
    launcher = cwd / "run.py"
    launcher.write_text(LAUNCHER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(launcher), str(SCRIPTS / script), *args],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_validate(data: Path, tmp_path: Path) -> None:
    stdout = run_script("validate.py", str(data), "--split", "validation", "--model", MODEL,
                        "--num-classes", "2", "-b", "4", "--workers", "0", "--device", "cpu",
                        cwd=tmp_path)
    result = json.loads(stdout[stdout.index("--result") + len("--result"):])
    assert result["model"] == MODEL and 0 <= result["top1"] <= 100
    assert result["img_size"] == 32 and result["interpolation"] == "bilinear"


def test_benchmark(tmp_path: Path) -> None:
    stdout = run_script("benchmark.py", "--model", MODEL, "--device", "cpu", "-b", "2",
                        "--img-size", "32", "--bench", "both", "--num-warm-iter", "1",
                        "--num-bench-iter", "5", cwd=tmp_path)
    assert "infer_samples_per_sec" in stdout and "train_samples_per_sec" in stdout


def test_train_one_epoch(data: Path, tmp_path: Path) -> None:
    run_script("train.py", "--data-dir", str(data), "--train-split", "train", "--val-split",
               "validation", "--model", MODEL, "--num-classes", "2", "-b", "4", "--epochs", "1",
               "--workers", "0", "--device", "cpu", "--img-size", "32",
               "--output", str(tmp_path / "out"), cwd=tmp_path)
    (run,) = (tmp_path / "out").iterdir()
    assert (run / "last.pth.tar").is_file() and (run / "summary.csv").is_file()
