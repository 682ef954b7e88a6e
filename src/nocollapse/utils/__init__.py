"""Leaf utilities that every layer may use and that import nothing else of nocollapse:
registries, torch.distributed helpers, schedules, optimisers, checkpoint I/O and the metrics log."""
