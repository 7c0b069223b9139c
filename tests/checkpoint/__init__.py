"""Tests of posttrain.checkpoint."""
