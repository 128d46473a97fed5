"""Pretraining (and, later, distillation) engine: DeepSpeed set-up, the training step, the loop,
checkpoints in object storage, metrics, and the `pretrain` entry point."""
