"""big_vision_cxr: PaliGemma-CXR in JAX/Flax, big_vision style."""
import pathlib
import setuptools

_ROOT = pathlib.Path(__file__).parent


def _requirements(name):
  lines = (_ROOT / name).read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith(("#", "-r"))]


setuptools.setup(
    name="big_vision_cxr",
    version="0.1.0",
    description="Multi-task PaliGemma fine-tuning for TB chest X-rays (JAX/Flax).",
    packages=setuptools.find_packages(include=["big_vision_cxr", "big_vision_cxr.*", "tfds_builders", "tfds_builders.*"]),
    package_data={"big_vision_cxr": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=_requirements("requirements.txt"),
    extras_require={"test": _requirements("requirements-test.txt")},
)
