"""Job specifications and the executors that run them (locally or as Kubeflow PyTorchJobs)."""

from app.launch.jobspec import JobSpec, JobSpecError, Resources

__all__ = ["JobSpec", "JobSpecError", "Resources"]
