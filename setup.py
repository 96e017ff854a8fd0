from setuptools import find_packages, setup

setup(
    name="ms_ddpm",
    version="0.1.0",
    description="Denoising diffusion probabilistic models (DDPM, DDIM, score-based samplers) in MindSpore",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ms_ddpm", "ms_ddpm.*"]),
    package_data={
        # the real MNIST digits create_dataset("mnist") reads when no root is given (ms_ddpm/data/mnist5k/README.md)
        "ms_ddpm.data": ["mnist5k/*.gz", "mnist5k/README.md"],
        # the CPU kernels' C++ sources, compiled on first use (ms_ddpm/kernels/build.py)
        "ms_ddpm.kernels": ["csrc/*.cc", "csrc/*.h"],
    },
    # the Pythons MindSpore 2.7.1 / 2.8 publish wheels for
    python_requires=">=3.9,<3.13",
    install_requires=[
        # MindSpore 2.9 and 2.10 pick oneDNN's plain-layout CPU convolution: about 60x slower than 2.7.1/2.8.
        "mindspore>=2.7.1,<2.9",
        # MindSpore 2.7/2.8 wheels are compiled against NumPy 1.x and fail to import with NumPy 2.
        "numpy<2",
        "download",
        "matplotlib",
        "tqdm",
        "PyYAML",
        "scipy",  # matrix square root of the Frechet distance
        "safetensors",  # diffusers' weight files as NumPy, without torch: ms-ddpm export, from_pretrained, converters
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-xdist",  # the suite runs on two workers (setup.cfg): its tests are single-threaded
            "pytest-timeout",  # a test that hangs fails with its name instead of stalling the run (setup.cfg)
            # Reference implementations the tests compare against (same inputs, same weights).
            "torch==2.13.0",
            "diffusers",
            # The tutorials run top to bottom in the test suite.
            "nbclient",
            "nbformat",
            "ipykernel",
        ],
    },
    entry_points={"console_scripts": ["ms-ddpm=ms_ddpm.cli:main"]},
)
