"""Serving: one backbone, a store of task adapters loaded on demand, mixed-task batches in one forward."""
