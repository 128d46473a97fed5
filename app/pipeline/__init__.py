"""The embedded pipeline: curate -> pretrain -> distill -> eval -> register as jobs."""
