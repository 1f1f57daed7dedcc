"""End-to-end runs of the commands in subprocesses (``python train.py``, ``-m siftguide.study``, DDP, real signals,
a non-editable install, the GPU bench's smoke size) and the cost axis beside a CPU hog. Every test here is marked
``e2e`` (the default run leaves them out; CI runs ``-m "e2e and not slow"``); the long ones are ``slow`` too."""
