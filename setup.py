from setuptools import find_packages, setup

setup(
    name="nanoalign",
    version="0.1.0",
    description="Minimal from-scratch alignment (SFT, reward model, PPO, DPO, RLAIF) in pure PyTorch",
    packages=find_packages(include=["nanoalign", "nanoalign.*"]),
    package_data={"nanoalign.world": ["constitution.txt"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "tokenizers", "safetensors", "numpy", "einops"],
    extras_require={"test": ["pytest", "hypothesis", "transformers", "mutmut", "matplotlib"], "plot": ["matplotlib"]},
)
