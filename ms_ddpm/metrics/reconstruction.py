"""How well an autoencoder reconstructs: PSNR."""
import numpy as np


def psnr(reconstructions, images):
    """Mean over images of the peak signal-to-noise ratio 10 log10(peak^2 / MSE) in dB, for images in [-1, 1]
    (peak-to-peak 2, the same figure as for images in [0, 1] with peak 1); reconstructions are clipped to [-1, 1]
    first, as saving them would. (N, C, H, W), (N, C, H, W) -> float."""
    diff = np.clip(reconstructions, -1.0, 1.0).astype(np.float64) - images.astype(np.float64)
    mse = (diff * diff).reshape(len(images), -1).mean(axis=1)
    return float(np.mean(10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))))
