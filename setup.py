"""Build hook. The pure-Python packages are described in pyproject.toml; the C++/CUDA kernels
(csrc/) are added here as pybind11 extensions once they exist."""
from setuptools import setup

setup()
