import torch

# The suite runs tiny models: one thread is faster than several, and immune to OpenMP oversubscription when the
# machine is shared (measured: a tiny forward took 2 ms on one thread and 370 ms on two contended ones).
torch.set_num_threads(1)
