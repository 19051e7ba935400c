"""Package metadata for UniAttn (``pip install -e .``)."""

from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="uniattn",
    version="0.1.0",
    description="Post-train LLaMA, Mistral and Gemma-2 into SuperBlocks that share the attention Softmax (UniAttn)",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["uniattn", "uniattn.*"]),
    package_data={"uniattn": ["**/*.yaml", "**/*.jsonl", "**/*.json"]},
    install_requires=requirements,
)
