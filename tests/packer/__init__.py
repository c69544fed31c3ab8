"""Tests of the Packer stages (authorized-key-overlay, packer-template, packer-ami) and the RKE2 user-data."""
