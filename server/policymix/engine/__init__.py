"""Engines: the native lockstep engine (PyTorch + transformers) behind one small client interface."""
