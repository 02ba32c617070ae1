"""The multitask network and its classification heads."""
