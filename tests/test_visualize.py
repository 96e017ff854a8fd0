"""Sample grids and the denoising animation."""
import subprocess
import sys

import numpy as np
from PIL import Image

from ms_ddpm.visualize import make_grid, save_denoising_animation, save_image_grid


def test_grid_layout_and_values(tmp_path):
    images = np.stack([np.full((1, 2, 3), v, np.float32) for v in (-1.0, 0.0, 1.0)])
    grid = make_grid(images, nrow=2, padding=1)
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 128 and grid[4, 1, 0] == 255 and grid[0, 0, 0] == 0
    save_image_grid(images, tmp_path / "grid.png", nrow=2)
    assert Image.open(tmp_path / "grid.png").size == (2 * (3 + 2) + 2, 2 * (2 + 2) + 2)  # default padding 2


def test_animation_has_one_frame_per_step(tmp_path):
    frames = [np.random.default_rng(i).uniform(-1, 1, (4, 3, 8, 8)) for i in range(6)]
    save_denoising_animation(frames, tmp_path / "chain.gif")
    assert Image.open(tmp_path / "chain.gif").n_frames == 6


def test_import_leaves_the_matplotlib_backend_alone():
    """A notebook's `%matplotlib inline` must survive importing the library."""
    code = ("import matplotlib; matplotlib.use('svg'); import ms_ddpm.visualize; "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()")
    subprocess.run([sys.executable, "-c", code], check=True)
