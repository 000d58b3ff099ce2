"""The runtime layer below every stage: errors, I/O errors, atomic files, the workdir lock,
preemption, huge pages, progress, devices and checkpoints."""
