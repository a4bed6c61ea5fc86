"""Thin adapters from halo_ops to trainers and model libraries (``halo_ops.integrations``)."""
