"""vitkern: fused CUDA/Triton kernels for Vision Transformers.

The compiled CUDA backend (``vitkern._C`` from ``csrc/``) is not part of this
release yet; the package installs as pure Python and its Triton kernels are
JIT-compiled at first use.
"""
from setuptools import find_packages, setup

setup(
    name="vitkern",
    version="0.1.0",
    description="Fused CUDA/Triton kernels for Vision Transformers (ViT, Swin, PVT)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vitkern", "vitkern.*"]),
    install_requires=[
        "torch>=2.4",
        "numpy",
        # Triton ships with Linux CUDA builds of torch; CPU builds need it for
        # the interpreter (TRITON_INTERPRET=1), the only way to run kernels on CPU.
        "triton>=3.1; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "timm>=1.0.15"],
        "bench": ["pytest>=8", "pytest-benchmark>=4"],
    },
    entry_points={},
)
