"""dinoctl: the DINOv2 recipe as containerised jobs (see docs/architecture.md)."""

__version__ = "0.1.0"  # = pyproject.toml's version and the chart's appVersion (a test checks)
IMAGE_REPOSITORY = "ghcr.io/dinoctl/dinoctl"
# The image scripts/build-images tags <version> (GPU); never :latest, which nothing builds.
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}"
