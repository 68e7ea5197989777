"""The multi-task workflow on top of a composition: tasks and their data checks, mixture
sampling, task heads, the training loop with checkpoints and resume, and plots."""
