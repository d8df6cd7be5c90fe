"""Package metadata. Dependencies are the tested stack; `make install` installs them in order
(torch first, mamba-ssm without its CUDA build last) from requirements/."""

from pathlib import Path

from setuptools import find_packages, setup


def _requirements(name: str) -> list[str]:
    lines = Path(__file__).with_name("requirements").joinpath(name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="megatron-elastic",
    version="0.1.0",
    description="Nested hybrid Mamba+attention LLMs on megatron-core (Nemotron Elastic)",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_elastic", "megatron_elastic.*"]),
    install_requires=_requirements("base.txt"),
    extras_require={"dev": _requirements("dev.txt")},
)
