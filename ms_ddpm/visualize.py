"""Pictures of samples: a grid PNG and the denoising animation GIF of the annotated-diffusion tutorial."""
import math

import numpy as np
from matplotlib import animation, image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Figures are drawn on their own Agg canvas, never through pyplot: a library must not switch the global backend
# (that would silence a notebook's inline figures), and training runs have no display.


def to_uint8(images):
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip((images + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images, nrow=None, padding=2):
    """Tile (N, C, H, W) images in [-1, 1] into one (rows*(H+p)+p, nrow*(W+p)+p, C) uint8 image."""
    images = to_uint8(images)
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = img
    return grid


def rows_by_class(images, labels):
    """(N, C, H, W) images and their (N,) labels -> (images, nrow) arranged one row per class, classes in order of
    first appearance, rows padded with black images to the longest."""
    labels = np.asarray(labels)
    classes = list(dict.fromkeys(labels.tolist()))
    width = max(int((labels == k).sum()) for k in classes)
    blank = np.full_like(images[:1], -1.0)
    rows = []
    for k in classes:
        members = images[labels == k]
        rows.append(np.concatenate([members] + [blank] * (width - len(members))))
    return np.concatenate(rows), width


def save_image_grid(images, path, nrow=None, labels=None):
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid; with their (N,) class labels, one row per class."""
    if labels is not None:
        images, nrow = rows_by_class(np.asarray(images), labels)
    grid = make_grid(images, nrow)
    image.imsave(path, grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)


def save_denoising_animation(frames, path, nrow=None, fps=20):
    """Write a GIF of the reverse chain: `frames` is a list of (N, C, H, W) arrays in [-1, 1], noise first."""
    grids = [make_grid(f, nrow) for f in frames]
    fig = Figure(figsize=(4, 4 * grids[0].shape[0] / grids[0].shape[1]))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    show = [[ax.imshow(g[..., 0] if g.shape[-1] == 1 else g, cmap="gray", vmin=0, vmax=255, animated=True)]
            for g in grids]
    animation.ArtistAnimation(fig, show, interval=1000 // fps, repeat_delay=2000).save(
        path, writer=animation.PillowWriter(fps=fps))
